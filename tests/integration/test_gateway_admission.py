"""What the gateway's node endpoint refuses, for real over WebSocket: lying hellos, state changes it did not ask for,
floods, too many connections, oversized messages; each refusal logged and counted once, and nothing else disturbed."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect

from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import CHANNEL_OPTIONS
from services.gateway.admission import CLOSE_POLICY, CLOSE_RATE_LIMITED, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN_LATER
from services.wire import syn1
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    FakeNode,
    RunningGateway,
    closed_with,
    head,
    hello,
    run_client,
    running_gateway,
    stage,
    token_step,
    watching,
)
from tests.polling import eventually

REJECTED = "synapse_gateway_rejected_messages_total"
# The fake nodes' model, as the router sends it with an assignment.
FAKE_CONFIG = common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64)


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value(REJECTED, {"reason": reason}) or 0.0


async def assert_serves(gateway: RunningGateway, node_id: str) -> None:
    """`node_id` (a FakeNode computing `head`) still answers a step."""
    async with run_client(gateway) as client:
        result = await client.step(token_step([stage(node_id, 0, 2)], 1, 0, [41]), 5)
    (frame,) = syn1.decode_frames(result.frames)
    assert frame.token_ids[0, 0] == 42


async def assign(gateway: RunningGateway, node_id: str, shard_id: str, start: int, end: int) -> None:
    request = gateway_pb2.AssignShardRequest(
        node_id=node_id, shard_id=shard_id, shard_url="http://s/x", manifest_url="http://s/m", sha256="ab" * 32,
        size_bytes=10, activation_dtype=common_pb2.DTYPE_FLOAT16, config=FAKE_CONFIG,
    )  # fmt: skip
    request.layers.start, request.layers.end = start, end
    await gateway.stub.AssignShard(request, timeout=5)


@pytest.mark.timeout(30)
async def test_rogue_hellos_are_refused_and_watch_nodes_carries_on() -> None:
    """The issue's rogue nodes: memory_bytes 2^64 once broke WatchNodes for good, speed Infinity every re-plan."""
    async with running_gateway() as gateway, watching(gateway) as watch:
        for rogue in [hello("rogue-big", memory_bytes=2**64), {**hello("rogue-inf"), "speed": 1e999}]:
            websocket = await connect(gateway.ws_url, close_timeout=1)
            await websocket.send(json.dumps(rogue).replace("1e+999", "1e999"))
            received, code = await closed_with(websocket)
            assert code == CLOSE_POLICY and received[0]["fatal"] is True, received
        node = await FakeNode.join(gateway.ws_url, "good", compute=head)
        await watch.until("good", "joined")
        assert not [event for event in watch.events if event.node.node_id.startswith("rogue")]
        await assert_serves(gateway, "good")
        await node.close()
        await watch.until("good", "gone")


@pytest.mark.timeout(30)
async def test_ready_without_an_assignment_is_refused_and_the_node_stays_joined() -> None:
    """Once accepted as holding [0, 6) and sent steps; now told no, its record unchanged, its connection kept."""
    async with running_gateway() as gateway, watching(gateway) as watch:
        node = await FakeNode.join(gateway.ws_url, "liar")
        await watch.until("liar", "joined")
        await node.send_json(kind="ready", shard_id="gpt2-0-6", layers=[0, 6])
        error = await node.next_control()
        assert error["kind"] == "error" and error["fatal"] is False, error
        assert "ready for layers [0, 6] of shard 'gpt2-0-6' refused" in error["message"]
        assert "assigned this node nothing" in error["message"]
        record = gateway.hub.connections["liar"].record
        assert (record.state, record.layers, record.shard_id) == ("joined", None, "")
        await node.send_json(kind="heartbeat")  # still connected and served
        assert "ready" not in watch.states("liar") and "liar" in gateway.hub.connections
        await node.close()


@pytest.mark.timeout(30)
async def test_only_the_assigned_shard_and_layers_become_ready() -> None:
    async with running_gateway() as gateway, watching(gateway) as watch:
        node = await FakeNode.join(gateway.ws_url, "n1")
        await assign(gateway, "n1", "tiny-0-2", 0, 2)
        assert (await node.next_control())["kind"] == "assign"
        await watch.until("n1", "loading")
        unasked = [
            ({"kind": "ready", "shard_id": "tiny-0-2", "layers": [0, 6]}, "ready for layers [0, 6]"),
            ({"kind": "ready", "shard_id": "other", "layers": [0, 2]}, "shard 'other' refused"),
            ({"kind": "progress", "shard_id": "other", "done_bytes": 1, "total_bytes": 2}, "progress for shard"),
        ]
        for message, expected in unasked:
            await node.send_json(**message)
            error = await node.next_control()
            assert error["fatal"] is False and expected in error["message"], error
            assert "'tiny-0-2' layers [0, 2] (loading)" in error["message"]
        await node.send_json(kind="progress", shard_id="tiny-0-2", done_bytes=5, total_bytes=10)
        await node.send_json(kind="ready", shard_id="tiny-0-2", layers=[0, 2])
        ready = await watch.until("n1", "ready")
        assert (ready.node.layers.start, ready.node.layers.end) == (0, 2)
        await node.send_json(kind="ready", shard_id="tiny-0-2", layers=[0, 2])  # again: accepted, no new event
        await node.send_json(kind="bye")
        await watch.until("n1", "gone")
        assert watch.states("n1") == ["joined", "loading", "ready", "gone"]
        assert node.control.empty(), "an assigned progress or ready was refused"


@pytest.mark.timeout(30)
async def test_a_flood_of_messages_closes_only_that_connection_with_4029() -> None:
    async with running_gateway(max_messages_per_s=20, max_message_burst=10) as gateway:
        good = await FakeNode.join(gateway.ws_url, "good", compute=head)
        flooder = await FakeNode.join(gateway.ws_url, "flooder")
        for _ in range(50):
            await flooder.send_json(kind="heartbeat")
        error = await flooder.next_control()
        await asyncio.wait_for(flooder.websocket.wait_closed(), 5)
        assert flooder.websocket.close_code == CLOSE_RATE_LIMITED
        assert "more than 20 messages/s (bursts of 10)" in error["message"] and error["fatal"] is True
        await eventually(lambda: "flooder" not in gateway.hub.connections, 5, "the flooder leaving")
        await assert_serves(gateway, "good")
        newcomer = await FakeNode.join(gateway.ws_url, "newcomer")
        await newcomer.close()
        await good.close()


@pytest.mark.timeout(30)
async def test_connections_per_address_are_limited_with_1013() -> None:
    async with running_gateway(max_connections_per_address=3) as gateway:
        good = await FakeNode.join(gateway.ws_url, "good", compute=head)
        other = await FakeNode.join(gateway.ws_url, "other")
        silent = await connect(gateway.ws_url, close_timeout=1)  # no hello yet: it holds a slot all the same
        refused = await connect(gateway.ws_url, close_timeout=1)
        received, code = await closed_with(refused)
        assert code == CLOSE_TRY_AGAIN_LATER
        assert "too many connections from 127.0.0.1: 3 are open" in received[0]["message"], received
        await assert_serves(gateway, "good")
        await silent.close()
        await eventually(lambda: gateway.endpoint.addresses.open["127.0.0.1"] == 2, 5, "the slot freed")
        late = await FakeNode.join(gateway.ws_url, "late")
        for node in (late, other, good):
            await node.close()
        await eventually(lambda: not gateway.endpoint.addresses.open, 5, "every slot freed")


@pytest.mark.timeout(60)
async def test_every_refusal_is_logged_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.gateway.websocket_server")
    reasons = ["hello_timeout", "bad_hello", "control", "frame", "too_big", "rate_limited",
               "too_many_connections", "unasked_state"]  # fmt: skip
    before = {reason: rejected(reason) for reason in reasons}
    settings = dict(hello_timeout_s=0.3, max_frame_bytes=4096, max_messages_per_s=5, max_message_burst=5)
    async with running_gateway(max_connections_per_address=2, **settings) as gateway:
        silent = await connect(gateway.ws_url, close_timeout=1)
        await closed_with(silent)  # hello_timeout
        for first in [b"binary", '{"kind": "bye"}']:  # bad_hello twice, before hello
            websocket = await connect(gateway.ws_url, close_timeout=1)
            await websocket.send(first)
            await closed_with(websocket)
        for node_id, message in [("c", "{oops"), ("f", b"not SYN1"), ("big", b"\0" * 5000)]:
            node = await FakeNode.join(gateway.ws_url, node_id)
            await node.websocket.send(message)
            await asyncio.wait_for(node.websocket.wait_closed(), 5)
        node = await FakeNode.join(gateway.ws_url, "unasked")
        await node.send_json(kind="ready", shard_id="s", layers=[0, 1])
        await node.next_control()
        blocker = await FakeNode.join(gateway.ws_url, "blocker")
        extra = await connect(gateway.ws_url, close_timeout=1)
        await closed_with(extra)  # too_many_connections
        await blocker.close()
        for _ in range(10):
            await node.send_json(kind="heartbeat")
        await asyncio.wait_for(node.websocket.wait_closed(), 5)  # rate_limited
        await eventually(lambda: not gateway.hub.connections, 5, "every node leaving")
    counted = {reason: rejected(reason) - before[reason] for reason in reasons}
    assert counted == {**dict.fromkeys(reasons, 1), "bad_hello": 2}
    logged = [record for record in caplog.records if record.getMessage() == "node_message_rejected"]
    assert sorted(record.reason for record in logged) == sorted([*reasons, "bad_hello"])
    big = next(record for record in logged if record.reason == "too_big")
    assert big.node == "big" and big.address == "127.0.0.1" and "exceeds limit of 4096 bytes" in big.error
    assert next(record for record in logged if record.reason == "hello_timeout").node == "-"
    assert CLOSE_TOO_BIG == 1009


@pytest.mark.timeout(60)
async def test_a_stream_that_waits_long_survives_the_clients_keepalive_pings() -> None:
    """A call with no data for a long time (a step a browser computes for minutes, a quiet WatchNodes): the
    client pings it, and the server must not answer GOAWAY too_many_pings. Pings here come every second (the
    client's floor); gRPC's default server answered the third with GOAWAY."""
    pinging = {"grpc.keepalive_time_ms": 1000, "grpc.http2.max_pings_without_data": 0}
    options = [*(o for o in CHANNEL_OPTIONS if o[0] not in pinging), *pinging.items()]
    async with running_gateway() as gateway, grpc.aio.insecure_channel(gateway.address, options=options) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).WatchNodes(gateway_pb2.WatchNodesRequest())
        await asyncio.sleep(6)  # six pings without data
        node = await FakeNode.join(gateway.ws_url, "late")
        event = await asyncio.wait_for(call.read(), 10)
        assert event.node.node_id == "late"
        call.cancel()
        await node.close()
