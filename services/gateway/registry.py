"""The node registry: who is connected where, with what shard; in memory, or in Redis for several gateways."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

log = logging.getLogger(__name__)

NodeState = Literal["joined", "loading", "ready", "gone"]
NODES_KEY = "synapse:nodes"
EVENTS_CHANNEL = "synapse:node-events"
GATEWAY_KEY = "synapse:gateway:{}"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    kind: Literal["native", "web"]
    device: str
    memory_bytes: int
    speed: float
    gateway_id: str
    gateway_address: str
    state: NodeState = "joined"
    layers: tuple[int, int] | None = None
    shard_id: str = ""
    # Monotonic per node (wall-clock ns at the change): readers keep the newest record they see.
    version: int = field(default_factory=time.time_ns)

    def changed(self, **changes: object) -> NodeRecord:
        return replace(self, version=max(time.time_ns(), self.version + 1), **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeRecord:
        data = json.loads(text)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)


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
