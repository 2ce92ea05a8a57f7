"""What the node endpoint refuses, and the limits it counts: one Refusal type, close codes, rate and address limits.

Pure: no sockets. websocket_server.py raises and reports Refusals in one place (docs/wire-protocol.md,
"Refusals and limits").
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Literal

# WebSocket close codes the gateway uses; 4000-4999 are the application's own.
CLOSE_POLICY = 1008  # malformed or unexpected input: this connection only
CLOSE_TOO_BIG = 1009  # a message over max_frame_bytes (websockets closes it before we see it)
CLOSE_TRY_AGAIN_LATER = 1013  # too many connections from this address, or the shared registry (Redis) is away
CLOSE_UNAUTHORIZED = 4001  # the join token is missing, forged, expired or for another node
CLOSE_RATE_LIMITED = 4029  # more messages per second than max_messages_per_s allows

# The `reason` label of synapse_gateway_rejected_messages_total: low cardinality, one per cause.
Reason = Literal[
    "hello_timeout",  # no first message within hello_timeout_s
    "bad_hello",  # the first message is not a valid hello (binary, another kind, a bad field, another protocol)
    "join_token",  # the hello's join token is refused
    "control",  # a malformed control message after welcome
    "frame",  # a malformed binary message (SYN1), or one with no step in flight
    "too_big",  # a message over max_frame_bytes (closed with 1009)
    "rate_limited",  # over max_messages_per_s
    "too_many_connections",  # over max_connections_per_address
    "unasked_state",  # ready or progress for a shard the gateway did not assign (the connection stays)
    "quarantined",  # the node lied in an answer not long ago (services/gateway/hub.py): refused at hello
    "registry_unavailable",  # Redis cannot be reached, so the hello cannot be checked against the quarantine
]


class Refusal(Exception):
    """The gateway refuses a connection or one message: why (for the metric), what to tell the node, how to close.

    close_code None refuses the message and keeps the connection (the node is told, not dropped).
    """

    def __init__(self, reason: Reason, message: str, close_code: int | None = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.close_code = close_code


@dataclass
class TokenBucket:
    """`rate` messages per second on average, bursts of up to `burst`: one token per message."""

    rate: float  # tokens added per second
    burst: float  # most tokens held
    tokens: float = field(init=False)
    updated: float = field(init=False)  # time.monotonic() of the last refill

    def __post_init__(self) -> None:
        self.tokens, self.updated = self.burst, time.monotonic()

    def take(self, now: float | None = None) -> bool:
        """Spend one token; False when none is left (the message is over the limit)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class AddressSlots:
    """Open connections per client address; at most `limit` each (0 = no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: collections.Counter[str] = collections.Counter()

    def acquire(self, address: str) -> None:
        """Count one more connection from `address`, or raise Refusal when it already has `limit`."""
        if self.limit and self.open[address] >= self.limit:
            raise Refusal(
                "too_many_connections",
                f"too many connections from {address}: {self.limit} are open "
                "(SYNAPSE_GATEWAY_MAX_CONNECTIONS_PER_ADDRESS); close one or try again later",
                CLOSE_TRY_AGAIN_LATER,
            )
        self.open[address] += 1

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
