"""Prometheus metrics of the gateway: nodes online, and every hop's time split into compute and overhead."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS_S

BYTES_BUCKETS = (64, 128, 256, 512, 1024, 1600, 2048, 4096, 16384, 65536, 262144, 1048576)

NODES_ONLINE = Gauge("synapse_gateway_nodes_online", "Nodes connected to this gateway, by kind.", ["kind"])
NODE_EVENTS = Counter("synapse_gateway_node_events_total", "Node joins, readiness and departures, by event.", ["event"])
HOP_ROUND_TRIP = Histogram(
    "synapse_gateway_hop_round_trip_seconds",
    "Gateway -> node -> gateway time of one step on one stage, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
HOP_COMPUTE = Histogram(
    "synapse_gateway_hop_compute_seconds",
    "Node-reported forward time of one step, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
HOP_OVERHEAD = Histogram(
    "synapse_gateway_hop_overhead_seconds",
    "Round trip minus node compute, split by part: serialize (SYN1 both sides), queue (node), network (rest).",
    ["part"],
    buckets=LATENCY_BUCKETS_S,
)
HOP_BYTES_PER_TOKEN = Histogram(
    "synapse_gateway_hop_wire_bytes_per_token",
    "Bytes on the WebSocket per token per hop, by direction (to_node, from_node).",
    ["direction"],
    buckets=BYTES_BUCKETS,
)
HOP_BYTES = Counter("synapse_gateway_hop_bytes_total", "Bytes moved to and from nodes.", ["direction"])
STEPS = Counter("synapse_gateway_steps_total", "Route steps run by this gateway, by outcome.", ["outcome"])
REJECTED = Counter(
    "synapse_gateway_rejected_messages_total",
    "Connections and messages the node endpoint refused, by reason (services/gateway/admission.py, Reason).",
    ["reason"],
)
QUARANTINES = Counter(
    "synapse_gateway_quarantines_total",
    "Nodes kept out for a backoff, by cause: answer (for work not given, wrong shape, NaN/Inf) or "
    "disagreement (a verification recomputed its step elsewhere and got other numbers).",
    ["cause"],
)
VERIFICATIONS = Counter(
    "synapse_gateway_verifications_total",
    "Stages recomputed on verifiers, by outcome: agreed, outvoted (a node quarantined), unresolved (two answers "
    "differ, no majority), incomplete (a verifier could not answer).",
    ["outcome"],
)
