"""Prometheus: the /metrics endpoint and the gRPC server metrics every service exports."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

# Explicit buckets, seconds: loopback calls are sub-millisecond, generation streams last seconds.
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
    60,
)

GRPC_HANDLED = Counter(
    "synapse_grpc_server_handled_total",
    "gRPC calls finished by this server, by service, method and status code.",
    ["service", "method", "code"],
)
GRPC_DURATION = Histogram(
    "synapse_grpc_server_handling_seconds",
    "Time from a gRPC call's arrival to its end (for streams: the whole stream), seconds.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS_S,
)


def start_metrics_server(port: int | None, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on a background thread; returns the bound port (None when disabled)."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics_serving", extra={"port": bound})
    return bound
