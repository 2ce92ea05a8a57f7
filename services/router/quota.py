"""How many Generate streams each client holds at once, and the refusal past the limit."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import grpc

from services.common.errors import ResourceExhausted
from services.common.server import AUTHORIZATION_KEY


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for quotas: the API token when the call carries one (a service behind one address
    may hold many), else the peer's host (`ipv4:10.0.0.5`, without the port, which changes per connection)."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_KEY and value:
            return f"token:{hash(str(value)) & 0xFFFFFFFF:08x}"
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class StreamQuota:
    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.held: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One stream for `client` while the block runs; RESOURCE_EXHAUSTED if it already holds its limit."""
        if self.held[client] >= self.per_client:
            raise ResourceExhausted(
                f"{client} already has {self.held[client]} Generate streams open, the limit "
                "(SYNAPSE_ROUTER_MAX_STREAMS_PER_CLIENT); wait for one to finish"
            )
        self.held[client] += 1
        try:
            yield
        finally:
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]
