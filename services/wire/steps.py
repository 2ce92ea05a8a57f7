"""One pipeline step as the router, the gateways and their Run streams see it: route, input, result, failure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import Unavailable


@dataclass(frozen=True, slots=True)
class Stage:
    """One node of a route and the layers the route expects it to hold."""

    node_id: str
    layers: tuple[int, int]  # half-open [start, end)
    gateway_address: str = ""  # gRPC host:port of the node's gateway; empty = the gateway running the step
    verifiers: tuple[str, ...] = ()  # nodes on that gateway with the same layers, recomputing verified requests


@dataclass(frozen=True, slots=True)
class TokenInput:
    """One request's token ids into the first stage."""

    request_id: int  # the SYN1 request id (u32), stable for the request's life
    position: int  # sequence position of the first token (= tokens the stages' caches hold)
    token_ids: Sequence[int]
    predicted: bool = False  # the ids after the first are a draft: the last stage answers every row


@dataclass(frozen=True, slots=True)
class Step:
    """Run `route` in order: on `tokens` when it starts at layer 0, else on `frames` (SYN1 activations)."""

    route: tuple[Stage, ...]
    tokens: tuple[TokenInput, ...] = ()
    frames: bytes = b""
    verify: frozenset[int] = frozenset()  # request ids every stage with verifiers recomputes there


@dataclass(frozen=True, slots=True)
class Hop:
    """Timing and bytes of one gateway -> node -> gateway hop, in milliseconds and bytes."""

    node_id: str
    round_trip_ms: float  # as the gateway saw it
    compute_ms: float  # the node's forward pass, as it reported
    queue_ms: float  # waiting in the node's queue, as it reported
    node_serialize_ms: float  # SYN1 decode + encode on the node
    gateway_serialize_ms: float  # SYN1 encode on the gateway for this hop
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True, slots=True)
class StepResult:
    """The last stage's SYN1 OUTPUT or LOGITS frames (one per request) and every hop in route order."""

    frames: bytes
    hops: tuple[Hop, ...]


class StepFailed(Unavailable):
    """A step did not complete. `node_id` names the node at fault, if one is; `node_gone` says whether that
    node left or stopped answering (route around it) or is alive but could not run this step."""

    def __init__(self, message: str, *, node_id: str = "", node_gone: bool = False) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.node_gone = node_gone

    @classmethod
    def gone(cls, node_id: str, why: str) -> StepFailed:
        return cls(f"node {node_id} is gone: {why}", node_id=node_id, node_gone=True)

    @classmethod
    def on_node(cls, node_id: str, why: str) -> StepFailed:
        return cls(f"node {node_id} failed a step: {why}", node_id=node_id)
