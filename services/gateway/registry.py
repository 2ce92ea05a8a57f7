"""The node registry: who is connected where, with what shard; in memory, or in Redis for several gateways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from services.common.nodes import NodeRecord

log = logging.getLogger(__name__)


class Registry(Protocol):
    """Where a gateway puts its nodes' records and every watcher reads them: memory or Redis."""

    async def start(self, gateway_id: str, address: str) -> None: ...

    async def close(self) -> None: ...

    async def put(self, record: NodeRecord) -> None:
        """Store (or, when the record is gone, drop) a record and tell every watcher."""

    async def get(self, node_id: str) -> NodeRecord | None: ...

    async def all(self) -> list[NodeRecord]:
        """Every live record."""

    def watch(self) -> AsyncIterator[NodeRecord]:
        """Every live record, then every change, until the caller stops iterating."""


class MemoryRegistry:
    """One gateway's own nodes, in this process (the embedded default)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._subscribers: set[asyncio.Queue[NodeRecord]] = set()

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
