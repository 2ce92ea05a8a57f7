"""Domain errors, each carrying the gRPC status it maps to (mapped in one place: services.common.server).

Pure modules raise these without importing grpc; the status is the name of a grpc.StatusCode member.
Messages say what is wrong and what to do next.
"""

from __future__ import annotations


class SynapseError(Exception):
    """Base of every error Synapse raises on purpose."""

    status: str = "INTERNAL"  # a grpc.StatusCode name; per class, or per instance (UpstreamError)


class Internal(SynapseError):
    """A bug or broken invariant; the message says where. Never retried."""

    status = "INTERNAL"


class Unauthenticated(SynapseError):
    """The caller sent no credentials, or ones that are not valid."""

    status = "UNAUTHENTICATED"


class UpstreamError(SynapseError):
    """A service this one called answered with an error: its status and message reach our caller as they were."""

    def __init__(self, service: str, status: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.status = status


class InvalidArgument(SynapseError, ValueError):
    """The caller sent something malformed or out of range; retrying the same input will fail again."""

    status = "INVALID_ARGUMENT"


class NotFound(SynapseError, LookupError):
    """A named thing (model, shard, request, node) does not exist."""

    status = "NOT_FOUND"


class FailedPrecondition(SynapseError):
    """The system is not in a state where this can run (e.g. a plan that cannot fit)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(SynapseError):
    """Not enough memory, capacity or quota for this request."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(SynapseError):
    """A needed part (node, pipeline, upstream service) is not reachable now; retrying later may work."""

    status = "UNAVAILABLE"


class DataLoss(SynapseError):
    """Stored or transferred bytes are corrupt: sha256 mismatch, truncated file, bad header."""

    status = "DATA_LOSS"


class DeadlineExceeded(SynapseError, TimeoutError):
    """The caller's deadline passed before the work finished."""

    status = "DEADLINE_EXCEEDED"


class Cancelled(SynapseError):
    """The request was cancelled (client went away)."""

    status = "CANCELLED"
