"""Prometheus metrics of a native node: the KV caches it holds (what a leak shows up in)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Gauge

from services.node.worker import StageWorker

KV_CACHED_REQUESTS = Gauge(
    "synapse_node_kv_cached_requests",
    "Requests whose KV cache this node holds now (0 once every request has finished and been released).",
)
KV_SLOTS_IN_USE = Gauge(
    "synapse_node_kv_slots_in_use",
    "KV cache slots of the loaded stage taken now (equals kv_cached_requests but while a released request's "
    "last step still runs; more means a slot leaked).",
)
KV_SLOTS = Gauge("synapse_node_kv_slots", "KV cache slots of the loaded stage (most requests held at once).")


def follow(worker: Callable[[], StageWorker | None]) -> None:
    """Read the gauges from the node's current worker (none before the first shard: 0) at every scrape."""

    def read(what: Callable[[StageWorker], int]) -> Callable[[], int]:
        return lambda: 0 if (current := worker()) is None else what(current)

    KV_CACHED_REQUESTS.set_function(read(lambda current: current.cached_requests))
    KV_SLOTS_IN_USE.set_function(read(lambda current: current.engine.pool.slots - current.engine.pool.free_slots))
    KV_SLOTS.set_function(read(lambda current: current.engine.pool.slots))
