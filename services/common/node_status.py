"""NodeRecord <-> the protobuf that carries it: NodeStatus (router API) and NodeEvent (WatchNodes)."""

from __future__ import annotations

from services.common.nodes import NodeKind, NodeRecord, NodeState
from services.common.pb import common_pb2, gateway_pb2, router_pb2

KINDS: dict[NodeKind, int] = {"native": common_pb2.NODE_KIND_NATIVE, "web": common_pb2.NODE_KIND_WEB}
STATES: dict[NodeState, int] = {
    "joined": router_pb2.NODE_STATE_JOINED,
    "loading": router_pb2.NODE_STATE_LOADING,
    "ready": router_pb2.NODE_STATE_READY,
    "gone": router_pb2.NODE_STATE_GONE,
}
KIND_NAMES: dict[int, NodeKind] = {value: name for name, value in KINDS.items()}
STATE_NAMES: dict[int, NodeState] = {value: name for name, value in STATES.items()}


def node_status_pb(node: NodeRecord) -> router_pb2.NodeStatus:
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


def node_event_pb(node: NodeRecord) -> gateway_pb2.NodeEvent:
    return gateway_pb2.NodeEvent(node=node_status_pb(node), gateway_address=node.gateway_address, version=node.version)


def node_from_event(event: gateway_pb2.NodeEvent) -> NodeRecord:
    """A WatchNodes event as a record (unknown kinds read as native, unknown states as gone)."""
    status = event.node
    return NodeRecord(
        node_id=status.node_id,
        kind=KIND_NAMES.get(status.kind, "native"),
        device=status.device,
        memory_bytes=status.memory_bytes,
        speed=status.speed,
        state=STATE_NAMES.get(status.state, "gone"),
        layers=(status.layers.start, status.layers.end) if status.HasField("layers") else None,
        shard_id=status.shard_id,
        gateway_id=status.gateway_id,
        gateway_address=event.gateway_address,
        version=event.version,
    )
