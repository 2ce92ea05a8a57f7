"""NodeRecord <-> the protobuf that carries it: NodeStatus (router API) and NodeEvent (WatchNodes).

Converting a record never raises: one record a protobuf cannot hold (a u64 overflow, a lone surrogate)
would otherwise end WatchNodes for every node. Records are validated where they are made (a node's
hello, services/wire/control.py); what still does not fit here is clamped and logged.
"""

from __future__ import annotations

import logging
import math

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
_U32_MAX, _U64_MAX = 2**32 - 1, 2**64 - 1

log = logging.getLogger(__name__)


def node_status_pb(node: NodeRecord) -> router_pb2.NodeStatus:
    status = router_pb2.NodeStatus(
        node_id=_text(node.node_id),
        kind=KINDS.get(node.kind, common_pb2.NODE_KIND_UNSPECIFIED),
        device=_text(node.device),
        memory_bytes=_unsigned(node.memory_bytes, _U64_MAX, node, "memory_bytes"),
        speed=_speed(node),
        state=STATES.get(node.state, router_pb2.NODE_STATE_GONE),
        shard_id=_text(node.shard_id),
        gateway_id=_text(node.gateway_id),
    )
    if node.layers is not None:
        start, end = node.layers
        status.layers.start = _unsigned(start, _U32_MAX, node, "layers")
        status.layers.end = _unsigned(end, _U32_MAX, node, "layers")
    return status


def node_event_pb(node: NodeRecord) -> gateway_pb2.NodeEvent:
    return gateway_pb2.NodeEvent(
        node=node_status_pb(node),
        gateway_address=_text(node.gateway_address),
        version=_unsigned(node.version, _U64_MAX, node, "version"),
    )


def _unsigned(value: object, limit: int, node: NodeRecord, field: str) -> int:
    """An int in [0, limit]; anything else is clamped (or 0) and logged."""
    number = value if isinstance(value, int) and not isinstance(value, bool) else 0
    clamped = min(max(number, 0), limit)
    if clamped != value:
        log.warning("node_status_clamped", extra={"node": _text(node.node_id), "field": field, "value": repr(value)})
    return clamped


def _speed(node: NodeRecord) -> float:
    """A finite speed >= 0; a record holding anything else says 0 (placement gives it no work)."""
    speed = node.speed
    if isinstance(speed, int | float) and not isinstance(speed, bool) and math.isfinite(speed) and speed >= 0:
        return float(speed)
    log.warning("node_status_clamped", extra={"node": _text(node.node_id), "field": "speed", "value": repr(speed)})
    return 0.0


def _text(value: object) -> str:
    """A string protobuf can encode: lone surrogates become backslash escapes."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


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
