"""The node registry: who is connected where, with what shard; in memory, or in Redis for several gateways."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from services.common.errors import Unavailable
from services.common.nodes import NodeRecord

log = logging.getLogger(__name__)

OFFENSE_MEMORY_S = 24 * 3600.0  # offenses older than a day no longer lengthen a quarantine


class RegistryUnavailable(Unavailable):
    """The shared registry (Redis) cannot be reached now: what needs it is refused, to be tried again later."""


class Registry(Protocol):
    """Where a gateway puts its nodes' records and every watcher reads them: memory or Redis."""

    async def start(self, gateway_id: str, address: str) -> None: ...

    async def close(self) -> None: ...

    async def put(self, record: NodeRecord) -> None:
        """Store (or, when the record is gone, drop) a record and tell every watcher. A record of this gateway's
        own node is never refused: kept here while the store is unreachable, written when it is back."""

    async def get(self, node_id: str) -> NodeRecord | None: ...

    async def all(self) -> list[NodeRecord]:
        """Every live record."""

    def watch(self) -> AsyncIterator[NodeRecord]:
        """Every live record, then every change, until the caller stops iterating."""

    async def quarantine(self, node_id: str, reason: str, base_s: float, max_s: float) -> float:
        """Keep the node out for base_s, doubling with each offense of the last day up to max_s; the seconds."""

    async def quarantined(self, node_id: str) -> str | None:
        """Why, and for how much longer, the node is kept out; None when it may join. RegistryUnavailable
        when that cannot be known now (the shared store is away): the node may not join yet."""


def quarantine_seconds(offenses: int, base_s: float, max_s: float) -> float:
    """The backoff of a node's n-th offense: base_s, doubling each time, at most max_s."""
    return min(max_s, base_s * 2 ** min(max(offenses - 1, 0), 32))


def describe_quarantine(reason: str, remaining_s: float) -> str:
    return f"quarantined for {remaining_s:.0f} s more: {reason}"


class MemoryRegistry:
    """One gateway's own nodes, in this process (the embedded default)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._subscribers: set[asyncio.Queue[NodeRecord]] = set()
        self._quarantine: dict[str, tuple[float, str]] = {}  # node id -> (monotonic end, reason)
        self._offenses: dict[str, list[float]] = {}  # node id -> monotonic times of its offenses

    async def start(self, gateway_id: str, address: str) -> None:
        del gateway_id, address

    async def close(self) -> None:
        pass

    async def put(self, record: NodeRecord) -> None:
        if record.state == "gone":
            self._nodes.pop(record.node_id, None)  # watchers still get the event below
        else:
            self._nodes[record.node_id] = record
        for queue in self._subscribers:
            queue.put_nowait(record)

    async def get(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    async def all(self) -> list[NodeRecord]:
        return [record for record in self._nodes.values() if record.state != "gone"]

    async def quarantine(self, node_id: str, reason: str, base_s: float, max_s: float) -> float:
        now = time.monotonic()
        offenses = [t for t in self._offenses.get(node_id, []) if now - t < OFFENSE_MEMORY_S] + [now]
        self._offenses[node_id] = offenses
        seconds = quarantine_seconds(len(offenses), base_s, max_s)
        self._quarantine[node_id] = (now + seconds, reason)
        return seconds

    async def quarantined(self, node_id: str) -> str | None:
        end, reason = self._quarantine.get(node_id, (0.0, ""))
        remaining = end - time.monotonic()
        return describe_quarantine(reason, remaining) if remaining > 0 else None

    async def watch(self) -> AsyncIterator[NodeRecord]:
        """Every current node, then every change, until the caller stops iterating."""
        queue: asyncio.Queue[NodeRecord] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            for record in await self.all():
                yield record
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
