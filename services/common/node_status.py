"""NodeStatus protobuf <-> the plain fields every service keeps of a node (kind and state as words)."""

from __future__ import annotations

from typing import Any, Protocol

from services.common.pb import common_pb2, router_pb2

KINDS = {"native": common_pb2.NODE_KIND_NATIVE, "web": common_pb2.NODE_KIND_WEB}
STATES = {
    "joined": router_pb2.NODE_STATE_JOINED,
    "loading": router_pb2.NODE_STATE_LOADING,
    "ready": router_pb2.NODE_STATE_READY,
    "gone": router_pb2.NODE_STATE_GONE,
}
KIND_NAMES = {value: name for name, value in KINDS.items()}
STATE_NAMES = {value: name for name, value in STATES.items()}


class NodeLike(Protocol):
    node_id: str
    kind: str
    device: str
    memory_bytes: int
    speed: float
    state: str
    layers: tuple[int, int] | None
    shard_id: str
    gateway_id: str


def node_status_pb(node: NodeLike) -> router_pb2.NodeStatus:
    """The gateway's NodeRecord or the router's NodeView as a NodeStatus."""
    status = router_pb2.NodeStatus(
        node_id=node.node_id,
        kind=KINDS.get(node.kind, common_pb2.NODE_KIND_UNSPECIFIED),
        device=node.device,
        memory_bytes=node.memory_bytes,
        speed=node.speed,
        state=STATES[node.state],
        shard_id=node.shard_id,
        gateway_id=node.gateway_id,
    )
    if node.layers is not None:
        status.layers.start, status.layers.end = node.layers
    return status


def node_fields(status: router_pb2.NodeStatus) -> dict[str, Any]:
    """A NodeStatus as keyword fields (unknown kinds read as native, unknown states as gone)."""
    return dict(
        node_id=status.node_id,
        kind=KIND_NAMES.get(status.kind, "native"),
        device=status.device,
        memory_bytes=status.memory_bytes,
        speed=status.speed,
        state=STATE_NAMES.get(status.state, "gone"),
        layers=(status.layers.start, status.layers.end) if status.HasField("layers") else None,
        shard_id=status.shard_id,
        gateway_id=status.gateway_id,
    )
