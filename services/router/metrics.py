"""Prometheus metrics of the router: time to first token, time per output token, overhead, outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS_S

TTFT = Histogram(
    "synapse_router_time_to_first_token_seconds",
    "Request arrival to first token, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
TPOT = Histogram(
    "synapse_router_time_per_output_token_seconds",
    "Time between a request's tokens, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
STEP_SECONDS = Histogram(
    "synapse_router_step_seconds", "Wall time of one pipeline step, seconds.", buckets=LATENCY_BUCKETS_S
)
STEP_COMPUTE_SECONDS = Histogram(
    "synapse_router_step_compute_seconds",
    "Sum of the nodes' compute time in one step, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
STEP_OVERHEAD_SECONDS = Histogram(
    "synapse_router_step_overhead_seconds",
    "Step wall time minus node compute: network, queueing, serialization, orchestration, seconds.",
    buckets=LATENCY_BUCKETS_S,
)
SAMPLE_SECONDS = Histogram(
    "synapse_router_sample_seconds",
    "Time the router spends turning one step's answers into tokens (sampling, drafts), seconds.",
    buckets=LATENCY_BUCKETS_S,
)
TOKENS = Counter("synapse_router_tokens_total", "Tokens processed, by kind (prompt, generated).", ["kind"])
REQUESTS = Counter("synapse_router_requests_total", "Finished Generate requests, by outcome.", ["outcome"])
ACTIVE = Gauge("synapse_router_active_requests", "Generate requests in flight.")
BATCH_SIZE = Histogram(
    "synapse_router_step_batch_size", "Requests per pipeline step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
FAILOVERS = Counter("synapse_router_failovers_total", "Requests replayed onto another pipeline after a node failed.")
REPLANS = Counter("synapse_router_replans_total", "Plans asked of the sharder.")
PIPELINES = Gauge("synapse_router_pipelines", "Complete pipelines available.")
SPEC_DRAFTED = Counter(
    "synapse_router_spec_draft_tokens_total", "Speculative draft tokens sent (prompt lookup), summed over steps."
)
SPEC_ACCEPTED = Counter(
    "synapse_router_spec_accepted_tokens_total", "Draft tokens the pipeline's answer confirmed (kept as output)."
)
LOAD_TIMEOUTS = Counter(
    "synapse_router_load_timeouts_total", "Nodes planned around because they did not finish loading in time."
)
