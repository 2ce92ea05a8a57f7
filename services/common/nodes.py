"""The record of one compute node that the gateways keep and the router follows: one type for both."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

NodeKind = Literal["native", "web"]
NodeState = Literal["joined", "loading", "ready", "gone"]


@dataclass(frozen=True)
class NodeRecord:
    """Who a node is, where it is connected, and what it holds. Immutable: change it with `changed()`."""

    node_id: str
    kind: NodeKind
    device: str
    memory_bytes: int
    speed: float  # GPT-2 124M layer decode steps per second (the node's start-up benchmark)
    gateway_id: str
    gateway_address: str  # gRPC host:port of the gateway the node is connected to
    state: NodeState = "joined"
    layers: tuple[int, int] | None = None  # half-open [start, end)
    shard_id: str = ""
    # Monotonic per node (wall-clock ns at the change): readers keep the newest record they see.
    version: int = field(default_factory=time.time_ns)

    @property
    def live(self) -> bool:
        return self.state != "gone"

    def changed(self, **changes: object) -> NodeRecord:
        """A copy with these fields changed and a version newer than this one."""
        return replace(self, version=max(time.time_ns(), self.version + 1), **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeRecord:
        data = json.loads(text)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)
