"""The gateway's Prometheus metrics, scraped over HTTP from /metrics after real traffic through a gateway.

The prometheus registry is process-global, so every check compares a scrape after the traffic with one before.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import start_metrics_server
from services.common.pb import common_pb2, gateway_pb2
from services.wire import syn1
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    FAKE_STATS_MS,
    FakeNode,
    RunningGateway,
    embed,
    head,
    run_client,
    running_gateway,
    stage,
    token_step,
)
from tests.polling import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

STATS_BYTES = syn1.HEADER_SIZE + 4 * len(FAKE_STATS_MS)
OUTPUT_BYTES = syn1.HEADER_SIZE + 2 * (4 + 4)  # top-2: i32 ids + f32 values


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Delta:
    """after - before of one sample (0 where a sample did not exist yet)."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.after, f"{name}{labels} is not exported"
        return self.after[key] - self.before.get(key, 0.0)


@pytest.mark.timeout(60)
async def test_gateway_metrics_after_real_traffic() -> None:
    port = start_metrics_server(0, host="127.0.0.1")
    assert port
    async with running_gateway() as gateway:
        before = await scrape(port)
        first = await FakeNode.join(gateway.ws_url, "metrics-first", node_kind="web", compute=embed)
        last = await FakeNode.join(gateway.ws_url, "metrics-last", compute=head)
        online = Delta(before, await scrape(port))
        assert online("synapse_gateway_nodes_online", kind="web") == 1
        assert online("synapse_gateway_nodes_online", kind="native") == 1
        assert online("synapse_gateway_nodes_online_by_device", kind="web", device="cpu") == 1
        assert online("synapse_gateway_node_events_total", event="joined") == 2

        async with run_client(gateway) as client:
            decode = token_step([stage("metrics-first", 0, 1), stage("metrics-last", 1, 2)], 1, 9, [42])
            prefill = token_step([stage("metrics-last", 0, 2)], 2, 0, [1, 2, 3, 4])
            await asyncio.gather(client.step(decode, 5), client.step(prefill, 5))  # StepFailed would raise
        for node_id in ("metrics-last", "nobody"):
            request = gateway_pb2.AssignShardRequest(
                node_id=node_id, activation_dtype=common_pb2.DTYPE_FLOAT16, layers={"start": 1, "end": 2},
                config=common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64),
            )  # fmt: skip
            if node_id == "nobody":
                with pytest.raises(grpc.aio.AioRpcError):
                    await gateway.stub.AssignShard(request, timeout=5)
            else:
                await gateway.stub.AssignShard(request, timeout=5)
        await first.close()
        await last.close()
        await _until_left(gateway, {"metrics-first", "metrics-last"})
        delta = Delta(before, await scrape(port))

    hops, compute_s, queue_s, serialize_s = 3, *(ms / 1e3 for ms in FAKE_STATS_MS)
    assert delta("synapse_gateway_hop_round_trip_seconds_count") == hops
    assert 0 < delta("synapse_gateway_hop_round_trip_seconds_sum") < 5
    assert delta("synapse_gateway_hop_compute_seconds_sum") == pytest.approx(hops * compute_s)
    assert delta("synapse_gateway_node_compute_seconds_count", node="metrics-last") == 2  # both steps end there
    assert delta("synapse_gateway_node_compute_seconds_sum", node="metrics-first") == pytest.approx(compute_s)
    for part in ("serialize", "queue", "network"):
        assert delta("synapse_gateway_hop_overhead_seconds_count", part=part) == hops
    assert delta("synapse_gateway_hop_overhead_seconds_sum", part="queue") == pytest.approx(hops * queue_s)
    assert delta("synapse_gateway_hop_overhead_seconds_sum", part="serialize") >= hops * serialize_s * 0.999
    assert delta("synapse_gateway_hop_overhead_seconds_sum", part="network") >= 0
    # Per token per hop: 1 token in (28 B), its activation on (24 + 4 * FAKE_HIDDEN B), 4 tokens in (40 B / 4).
    activation_bytes = syn1.HEADER_SIZE + 4 * FAKE_HIDDEN
    to_node = [28, activation_bytes, 40 / 4]
    from_node = [STATS_BYTES + activation_bytes, STATS_BYTES + OUTPUT_BYTES, (STATS_BYTES + OUTPUT_BYTES) / 4]
    assert delta("synapse_gateway_hop_wire_bytes_per_token_count", direction="to_node") == hops
    assert delta("synapse_gateway_hop_wire_bytes_per_token_sum", direction="to_node") == sum(to_node)
    assert delta("synapse_gateway_hop_wire_bytes_per_token_sum", direction="from_node") == sum(from_node)
    assert delta("synapse_gateway_hop_wire_bytes_per_token_bucket", direction="to_node", le="64.0") == hops
    assert delta("synapse_gateway_hop_bytes_total", direction="to_node") == 28 + activation_bytes + 40
    assert delta("synapse_gateway_steps_total", outcome="ok") == 2
    assert delta("synapse_gateway_nodes_online", kind="web") == 0
    assert delta("synapse_gateway_nodes_online", kind="native") == 0
    assert delta("synapse_gateway_nodes_online_by_device", kind="native", device="cpu") == 0
    assert delta("synapse_gateway_node_events_total", event="gone") == 2
    handled = "synapse_grpc_server_handled_total"
    assert delta(handled, service="gateway", method="AssignShard", code="OK") == 1
    assert delta(handled, service="gateway", method="AssignShard", code="UNAVAILABLE") == 1
    assert delta("synapse_grpc_server_handling_seconds_count", service="gateway", method="AssignShard") == 2


@pytest.mark.timeout(60)
async def test_rejected_messages_are_counted_by_reason() -> None:
    port = start_metrics_server(0, host="127.0.0.1")
    assert port
    async with running_gateway() as gateway:
        before = await scrape(port)
        for node_id, message in [("bad-text", "{oops"), ("bad-frame", b"not SYN1 at all, not even close")]:
            node = await FakeNode.join(gateway.ws_url, node_id)
            await node.websocket.send(message)
            await asyncio.wait_for(node.websocket.wait_closed(), 5)
        await _until_left(gateway, {"bad-text", "bad-frame"})
        delta = Delta(before, await scrape(port))
    assert delta("synapse_gateway_rejected_messages_total", reason="control") == 1
    assert delta("synapse_gateway_rejected_messages_total", reason="frame") == 1


async def _until_left(gateway: RunningGateway, node_ids: set[str]) -> None:
    await eventually(lambda: not node_ids & set(gateway.hub.connections), 5, f"{node_ids} leaving")
