"""The gateway in-process on port 0, with real WebSocket clients as nodes: handshake, node events, refusal of
malformed input, heartbeats, the Run stream, two gateways on one Redis, static files and TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from services.cli import main as synapse
from services.common.pb import common_pb2, gateway_pb2
from services.gateway import redis_registry
from services.gateway.websocket_server import CLOSE_POLICY
from services.launcher import free_port
from services.wire import syn1
from services.wire.steps import StepFailed, StepResult
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    FAKE_STATS_MS,
    FakeNode,
    RunningGateway,
    closed_with,
    embed,
    head,
    hello,
    make_agent,
    reply_bytes,
    run_client,
    running_agent,
    running_gateway,
    stage,
    token_step,
    watching,
)
from tests.polling import eventually
from tests.redis_server import redis_server


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway() as running:
        yield running


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


# The shape the fake nodes' model has, as the router would send it with an assignment.
FAKE_CONFIG = common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64)


def output_of(result: StepResult) -> syn1.Frame:
    (frame,) = syn1.decode_frames(result.frames)
    assert frame.msg_type is syn1.MessageType.OUTPUT
    return frame


async def assert_serves(gateway: RunningGateway, node_id: str) -> None:
    """`node_id` (a FakeNode computing `head`) still answers a step."""
    async with run_client(gateway) as client:
        response = await client.step(token_step([stage(node_id, 0, 2)], 1, 0, [41]), 5)
    assert output_of(response).token_ids[0, 0] == 42


# --- handshake and node events -------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_hello_gets_welcome_and_watch_sees_joined_loading_ready_gone(gateway: RunningGateway) -> None:
    node = await FakeNode.join(gateway.ws_url, "node-a", node_kind="web", device="webgpu: test adapter")
    assert node.welcome == {
        "kind": "welcome", "gateway_id": gateway.hub.gateway_id, "heartbeat_s": gateway.settings.heartbeat_s,
    }  # fmt: skip
    async with watching(gateway) as watch:
        joined = await watch.until("node-a", "joined")
        assert joined.gateway_address == gateway.address
        assert joined.node.device == "webgpu: test adapter" and joined.node.memory_bytes == 1 << 30
        request = gateway_pb2.AssignShardRequest(
            node_id="node-a", shard_id="tiny-0-2", shard_url="http://shards/s", manifest_url="http://shards/m",
            sha256="ab" * 32, size_bytes=1234, top_k=8, activation_dtype=common_pb2.DTYPE_FLOAT16, config=FAKE_CONFIG,
        )  # fmt: skip
        request.layers.start, request.layers.end = 0, 2
        await gateway.stub.AssignShard(request, timeout=5)
        assign = await node.next_control()
        assert assign["kind"] == "assign" and assign["layers"] == [0, 2] and assign["top_k"] == 8
        assert assign["sha256"] == "ab" * 32 and assign["activation_dtype"] == "float16"
        loading = await watch.until("node-a", "loading")
        assert (loading.node.layers.start, loading.node.layers.end) == (0, 2)
        await node.send_json(kind="progress", shard_id="tiny-0-2", done_bytes=600, total_bytes=1234)
        await node.send_json(kind="ready", shard_id="tiny-0-2", layers=[0, 2])
        ready = await watch.until("node-a", "ready")
        assert ready.node.shard_id == "tiny-0-2"
        await node.send_json(kind="bye", reason="test over")
        await watch.until("node-a", "gone")
        events = [event for event in watch.events if event.node.node_id == "node-a"]
    assert [e.node.state for e in events] == sorted(e.node.state for e in events)
    assert watch.states("node-a") == ["joined", "loading", "ready", "gone"]
    versions = [event.version for event in events]
    assert versions == sorted(set(versions)), "versions must increase with every change"
    assert "node-a" not in gateway.hub.connections


@pytest.mark.timeout(30)
async def test_assign_to_an_unknown_node_is_unavailable(gateway: RunningGateway) -> None:
    request = gateway_pb2.AssignShardRequest(
        node_id="nobody", shard_id="s", activation_dtype=common_pb2.DTYPE_INT8, config=FAKE_CONFIG
    )
    request.layers.start, request.layers.end = 0, 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.AssignShard(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nobody" in caught.value.details()


@pytest.mark.timeout(30)
async def test_assign_without_an_activation_dtype_is_invalid(gateway: RunningGateway) -> None:
    """No silent default: the router always names the wire dtype it wants."""
    node = await FakeNode.join(gateway.ws_url, "picky")
    request = gateway_pb2.AssignShardRequest(node_id="picky", shard_id="s", config=FAKE_CONFIG)
    request.layers.start, request.layers.end = 0, 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.AssignShard(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activation_dtype 0" in caught.value.details() and "DTYPE_FLOAT16" in caught.value.details()
    await node.close()


@pytest.mark.timeout(30)
async def test_same_node_id_again_replaces_the_old_connection(gateway: RunningGateway) -> None:
    old = await FakeNode.join(gateway.ws_url, "twin")
    new = await FakeNode.join(gateway.ws_url, "twin", compute=head)
    await asyncio.wait_for(old.websocket.wait_closed(), 5)
    assert old.websocket.close_code == 4000
    await assert_serves(gateway, "twin")
    await new.close()


# --- malformed input: that connection only ---------------------------------------------------------

AFTER_WELCOME = {
    "non-JSON text": ("{not json", "not JSON"),
    "JSON that is not an object": ("[1, 2]", '"kind"'),
    "JSON without kind": ('{"node_id": "x"}', '"kind"'),
    "unknown kind": ('{"kind": "teleport"}', "'teleport'"),
    "progress with a negative count": (
        '{"kind": "progress", "shard_id": "s", "done_bytes": -1, "total_bytes": 9}',
        "done_bytes",
    ),
    "hello twice": (json.dumps(hello("bad")), "hello sent twice"),
    "step reply with no step in flight": (reply_bytes([head(syn1.Frame.tokens(1, 0, [1]))]), "no step in flight"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", AFTER_WELCOME)
async def test_malformed_message_closes_only_that_connection(gateway: RunningGateway, case: str) -> None:
    message, expected = AFTER_WELCOME[case]
    good = await FakeNode.join(gateway.ws_url, "good", compute=head)
    bad = await FakeNode.join(gateway.ws_url, "bad")
    await bad.websocket.send(message)
    error = await bad.next_control()
    await asyncio.wait_for(bad.websocket.wait_closed(), 5)
    assert error["kind"] == "error" and error["fatal"] is True
    assert expected in error["message"], error
    assert bad.websocket.close_code == CLOSE_POLICY
    await _assert_gateway_unharmed(gateway, "bad")
    await good.close()


def _garbage(frame: syn1.Frame) -> bytes:
    del frame
    return b"\x00\x01garbage that is not SYN1" * 3


def _no_stats(frame: syn1.Frame) -> bytes:
    return syn1.encode(head(frame))


def _truncated(frame: syn1.Frame) -> bytes:
    return reply_bytes([head(frame)])[:-5]


def _stats_only(frame: syn1.Frame) -> bytes:
    del frame
    return syn1.encode(syn1.Frame.stats(np.array([FAKE_STATS_MS], dtype=np.float32)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make_reply", "expected"),
    [(_garbage, "bad magic"), (_no_stats, "STATS frame"), (_truncated, "truncated"), (_stats_only, "got none")],
    ids=["garbage", "no STATS frame", "truncated output", "STATS only"],
)
async def test_malformed_step_reply_fails_the_step_and_closes_only_that_connection(
    gateway: RunningGateway, make_reply, expected: str
) -> None:
    good = await FakeNode.join(gateway.ws_url, "good", compute=head)
    bad = await FakeNode.join(gateway.ws_url, "bad")
    async with run_client(gateway) as client:
        step = asyncio.create_task(client.step(token_step([stage("bad", 0, 2)], 3, 0, [7]), 5))
        (frame,) = syn1.decode_frames(await bad.next_step())
        await bad.websocket.send(make_reply(frame))
        with pytest.raises(StepFailed) as failed:
            await step
    assert failed.value.node_id == "bad" and "malformed" in str(failed.value)
    error = await bad.next_control()
    assert error["kind"] == "error" and expected in error["message"], error
    await asyncio.wait_for(bad.websocket.wait_closed(), 5)
    assert bad.websocket.close_code == CLOSE_POLICY
    await _assert_gateway_unharmed(gateway, "bad")
    await good.close()


INSTEAD_OF_HELLO = {
    "binary": (b"SYN1" + bytes(20), "must be a JSON hello"),
    "non-JSON text": ("hello?", "not JSON"),
    "another kind": ('{"kind": "ready", "shard_id": "s", "layers": [0, 1]}', "must be hello"),
    "hello with zero memory": (json.dumps(hello("x", memory_bytes=0)), "memory_bytes"),
    "hello with an unknown node kind": (json.dumps(hello("x", node_kind="toaster")), "node_kind"),
    "hello without node_id": (json.dumps({**hello("x"), "node_id": ""}), "node_id"),
    "hello of another protocol": (json.dumps(hello("x", protocol=99)), "protocol 99"),
    "hello with memory_bytes 2^64": (json.dumps(hello("x", memory_bytes=2**64)), "memory_bytes"),
    "hello with speed 1e999": (json.dumps(hello("x"))[:-1] + ', "speed": 1e999}', "speed"),
    "hello with speed NaN": (json.dumps(hello("x", speed=float("nan"))), "NaN is not a JSON value"),
    "hello with an unsafe node_id": (json.dumps(hello("x y\nnode_joined")), "node_id"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", INSTEAD_OF_HELLO)
async def test_bad_first_message_is_refused(gateway: RunningGateway, case: str) -> None:
    message, expected = INSTEAD_OF_HELLO[case]
    good = await FakeNode.join(gateway.ws_url, "good", compute=head)
    websocket = await connect(gateway.ws_url, close_timeout=1)
    await websocket.send(message)
    received, code = await closed_with(websocket)
    assert code == CLOSE_POLICY
    assert len(received) == 1 and received[0]["kind"] == "error", received
    assert expected in received[0]["message"]
    assert set(gateway.hub.connections) == {"good"}
    await _assert_gateway_unharmed(gateway, "x")
    await good.close()


@pytest.mark.timeout(30)
async def test_connection_that_never_says_hello_is_refused() -> None:
    async with running_gateway(hello_timeout_s=0.2) as gateway:
        websocket = await connect(gateway.ws_url, close_timeout=1)
        received, code = await closed_with(websocket)
    assert code == CLOSE_POLICY
    assert received == [{"kind": "error", "message": "no hello within 0.2 s of connecting", "fatal": True}]


@pytest.mark.timeout(30)
async def test_message_above_max_frame_bytes_closes_with_1009() -> None:
    async with running_gateway(max_frame_bytes=4096) as gateway:
        node = await FakeNode.join(gateway.ws_url, "big")
        await node.websocket.send(b"\0" * 5000)
        await asyncio.wait_for(node.websocket.wait_closed(), 5)
        assert node.websocket.close_code == 1009
        await eventually(lambda: "big" not in gateway.hub.connections, 5, "the oversized node leaving")


@pytest.mark.timeout(30)
async def test_node_errors_keep_it_unless_fatal(gateway: RunningGateway) -> None:
    node = await FakeNode.join(gateway.ws_url, "fragile", compute=head)
    await node.send_json(kind="error", message="shard download failed: sha256 mismatch")
    await assert_serves(gateway, "fragile")
    async with watching(gateway) as watch:
        await watch.until("fragile", "joined")  # the watch is subscribed
        await node.send_json(kind="error", message="WebGPU device lost", fatal=True)
        await watch.until("fragile", "gone")
    await asyncio.wait_for(node.websocket.wait_closed(), 5)


async def _assert_gateway_unharmed(gateway: RunningGateway, refused: str) -> None:
    """The refused node is gone, "good" still computes, and a new node is still welcomed."""
    await eventually(lambda: refused not in gateway.hub.connections, 5, f"{refused} leaving")
    await assert_serves(gateway, "good")
    newcomer = await FakeNode.join(gateway.ws_url, "newcomer")
    assert "newcomer" in gateway.hub.connections
    await newcomer.close()


# --- heartbeats ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_node_that_stops_answering_pings_is_gone_and_its_step_fails() -> None:
    heartbeat_s, timeout_s = 0.2, 0.5
    async with running_gateway(heartbeat_s=heartbeat_s, heartbeat_timeout_s=timeout_s) as gateway:
        alive = await FakeNode.join(gateway.ws_url, "good", compute=head)
        deaf = await FakeNode.join(gateway.ws_url, "deaf")
        async with watching(gateway) as watch, run_client(gateway) as client:
            await watch.until("deaf", "joined")  # the watch is subscribed
            step = asyncio.create_task(client.step(token_step([stage("deaf", 0, 2)], 5, 0, [1]), 30))
            await deaf.next_step()
            deaf.websocket.transport.pause_reading()  # no more pongs, and the step is never answered
            with pytest.raises(StepFailed) as failed:
                await step
            await watch.until("deaf", "gone", timeout_s=5)
            assert failed.value.node_id == "deaf" and failed.value.node_gone
            assert "deaf" in str(failed.value) and "gone" in str(failed.value)
            # The live node keeps answering the gateway's pings and steps meanwhile, and is never gone.
            good = gateway.hub.connections["good"].websocket
            for _ in range(3):
                await asyncio.wait_for(await good.ping(), 5 * timeout_s)
                await assert_serves(gateway, "good")
            assert "gone" not in watch.states("good")
        deaf.websocket.transport.resume_reading()
        await deaf.close()
        await alive.close()


@pytest.mark.timeout(30)
async def test_step_that_is_never_answered_times_out_and_closes_the_node() -> None:
    async with running_gateway(step_timeout_s=0.3) as gateway:
        silent = await FakeNode.join(gateway.ws_url, "silent")
        async with run_client(gateway) as client:
            with pytest.raises(StepFailed) as failed:
                await client.step(token_step([stage("silent", 0, 2)], 5, 0, [1]), 5)
        assert failed.value.node_id == "silent" and "no answer to a step" in str(failed.value)
        await asyncio.wait_for(silent.websocket.wait_closed(), 5)
        assert silent.websocket.close_code == 1011
        assert "silent" not in gateway.hub.connections


# --- the Run stream -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_step_through_one_stage_fills_the_hop_timing(gateway: RunningGateway) -> None:
    await FakeNode.join(gateway.ws_url, "solo", compute=head)
    tokens = syn1.Frame.tokens(9, 0, [3, 5, 7])
    async with run_client(gateway) as client:
        response = await client.step(token_step([stage("solo", 0, 2)], 9, 0, [3, 5, 7]), 5)
    output = output_of(response)
    assert (output.request_id, output.position, output.token_ids[0, 0]) == (9, 2, 8)
    (hop,) = response.hops
    assert hop.node_id == "solo"
    compute_ms, queue_ms, serialize_ms = FAKE_STATS_MS
    assert (hop.compute_ms, hop.queue_ms, hop.node_serialize_ms) == (compute_ms, queue_ms, serialize_ms)
    assert 0 < hop.round_trip_ms < 5000 and hop.gateway_serialize_ms >= 0
    assert hop.bytes_sent == len(syn1.encode(tokens))
    assert hop.bytes_received == len(reply_bytes([head(tokens)]))


@pytest.mark.timeout(30)
async def test_step_through_two_stages_moves_activations_between_them(gateway: RunningGateway) -> None:
    await FakeNode.join(gateway.ws_url, "first", compute=embed)
    await FakeNode.join(gateway.ws_url, "last", compute=head)
    route = [stage("first", 0, 1), stage("last", 1, 2)]
    async with run_client(gateway) as client:
        prefill, decode = await asyncio.gather(
            client.step(token_step(route, 1, 0, [4, 11]), 5), client.step(token_step(route, 2, 6, [20]), 5)
        )
    assert output_of(prefill).token_ids[0, 0] == 12 and output_of(prefill).position == 1
    assert output_of(decode).token_ids[0, 0] == 21 and output_of(decode).position == 6
    assert [hop.node_id for hop in prefill.hops] == ["first", "last"]
    stats_size = syn1.HEADER_SIZE + 4 * len(FAKE_STATS_MS)
    activation_size = syn1.HEADER_SIZE + 2 * FAKE_HIDDEN * 4  # 2 rows of f32
    assert prefill.hops[0].bytes_received == stats_size + activation_size
    assert prefill.hops[1].bytes_sent == activation_size
    assert prefill.hops[1].gateway_serialize_ms == 0  # only the first hop encodes token ids


@pytest.mark.timeout(30)
async def test_step_failed_from_a_node_is_a_step_error_and_the_node_stays(gateway: RunningGateway) -> None:
    flaky = await FakeNode.join(gateway.ws_url, "flaky")
    route = [stage("flaky", 0, 2)]
    async with run_client(gateway) as client:
        step = asyncio.create_task(client.step(token_step(route, 3, 4, [1]), 5))
        await flaky.next_step()
        await flaky.send_json(kind="step_failed", message="request 3 continues at position 4; replay it")
        with pytest.raises(StepFailed) as failed:
            await step
        assert failed.value.node_id == "flaky" and "replay it" in str(failed.value) and not failed.value.node_gone
        step = asyncio.create_task(client.step(token_step(route, 3, 0, [1, 2, 3, 4, 5]), 5))
        (frame,) = syn1.decode_frames(await flaky.next_step())
        await flaky.websocket.send(reply_bytes([head(frame)]))
        assert output_of(await step).token_ids[0, 0] == 6
    assert "flaky" in gateway.hub.connections


@pytest.mark.timeout(30)
async def test_step_to_a_node_that_is_not_connected_names_it(gateway: RunningGateway) -> None:
    async with run_client(gateway) as client:
        with pytest.raises(StepFailed) as failed:
            await client.step(token_step([stage("ghost", 0, 2)], 1, 0, [1]), 5)
    assert failed.value.node_id == "ghost" and "not connected" in str(failed.value)


@pytest.mark.timeout(30)
async def test_release_reaches_the_nodes_as_a_release_message(gateway: RunningGateway) -> None:
    first = await FakeNode.join(gateway.ws_url, "first")
    last = await FakeNode.join(gateway.ws_url, "last")
    async with run_client(gateway) as client:
        await client.release([3, 4], ["first", "last", "ghost"])
        assert await first.next_control() == {"kind": "release", "request_ids": [3, 4]}
        assert await last.next_control() == {"kind": "release", "request_ids": [3, 4]}


# --- two gateways on one Redis ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_two_gateways_share_nodes_and_forward_steps(redis_url: str) -> None:
    async with (
        running_gateway(redis_url=redis_url, gateway_id="gw-a") as gateway_a,
        running_gateway(redis_url=redis_url, gateway_id="gw-b") as gateway_b,
        watching(gateway_a) as watch,
    ):
        await FakeNode.join(gateway_a.ws_url, "a-first", compute=embed)
        await FakeNode.join(gateway_b.ws_url, "b-last", compute=head)
        joined = await watch.until("b-last", "joined")
        assert joined.gateway_address == gateway_b.address and joined.node.gateway_id == "gw-b"
        await watch.until("a-first", "joined")
        route = [stage("a-first", 0, 1), stage("b-last", 1, 2, gateway_b.address)]
        async with run_client(gateway_a) as client:
            across = await client.step(token_step(route, 1, 0, [30]), 5)
            # A route that starts on gateway B: gateway A forwards the token ids themselves.
            remote = await client.step(token_step([stage("b-last", 0, 2, gateway_b.address)], 2, 0, [50]), 5)
        assert output_of(across).token_ids[0, 0] == 31
        assert [hop.node_id for hop in across.hops] == ["a-first", "b-last"]
        assert output_of(remote).token_ids[0, 0] == 51 and remote.hops[0].node_id == "b-last"
        await gateway_b.stop()  # an orderly stop: its nodes are marked gone at once
        await watch.until("b-last", "gone", timeout_s=5)
        assert "gone" not in watch.states("a-first")


@pytest.mark.timeout(60)
async def test_nodes_of_a_gateway_that_died_are_reaped(redis_url: str, tmp_path: Path) -> None:
    """A gateway killed with SIGKILL marks nothing gone itself: its liveness key expires and a peer reaps."""
    grpc_port, ws_port = free_port(), free_port()
    env = {**os.environ, "SYNAPSE_REDIS_URL": redis_url, "SYNAPSE_GATEWAY_PORT": str(grpc_port),
           "SYNAPSE_GATEWAY_WS_PORT": str(ws_port), "SYNAPSE_GATEWAY_GATEWAY_ID": "doomed",
           "SYNAPSE_GATEWAY_LOG_FORMAT": "json"}  # fmt: skip
    log_path = tmp_path / "doomed.log"
    with log_path.open("wb") as log_file:
        doomed = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        async with (
            running_gateway(redis_url=redis_url, gateway_id="survivor") as survivor,
            watching(survivor) as watch,
        ):
            node = await _join_when_listening(f"ws://127.0.0.1:{ws_port}/ws", "orphan", doomed, log_path)
            await watch.until("orphan", "joined")
            os.killpg(doomed.pid, signal.SIGKILL)
            killed = time.monotonic()
            limit_s = redis_registry.LIVENESS_TTL_S + 2 * redis_registry.LIVENESS_PERIOD_S + 2
            gone = await watch.until("orphan", "gone", timeout_s=limit_s)
            assert gone.node.gateway_id == "doomed"
            assert time.monotonic() - killed >= 1.0, "gone before the liveness key could expire"
            await node.close()
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(10)


async def _join_when_listening(url: str, node_id: str, process: subprocess.Popen, log_path: Path) -> FakeNode:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await FakeNode.join(url, node_id)
        except OSError:
            assert process.poll() is None, f"gateway exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"gateway not listening:\n{log_path.read_text()[-3000:]}"
            await asyncio.sleep(0.1)


# --- static files --------------------------------------------------------------------------------


async def http_get(port: int, raw_path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET with the path exactly as given (clients would normalise `..`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.timeout(30)
async def test_static_files_of_the_web_node(tmp_path: Path) -> None:
    web = tmp_path / "webnode"
    (web / "kernels").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>node</title>")
    (web / "app.js").write_text("export const answer = 42;")
    (web / "kernels" / "matmul.wgsl").write_text("@compute @workgroup_size(1) fn main() {}")
    (tmp_path / "settings.py").write_text("SECRET = 1")
    async with running_gateway(webnode_dir=web) as gateway:
        port = gateway.ws_port
        status, headers, body = await http_get(port, "/")
        assert (status, headers["content-type"], body) == (200, "text/html", b"<!doctype html><title>node</title>")
        status, headers, body = await http_get(port, "/app.js?v=3")
        assert (status, headers["content-type"], body) == (200, "text/javascript", b"export const answer = 42;")
        status, headers, _ = await http_get(port, "/kernels/matmul.wgsl")
        assert (status, headers["content-type"]) == (200, "text/plain")
        for path in ["/missing.js", "/kernels", "/../settings.py", "/kernels/../../settings.py",
                     "/%2e%2e/settings.py", "/..%2fsettings.py", "/%2E%2E%2Fsettings.py", "//etc/passwd",
                     "/ws"]:  # fmt: skip
            status, _, body = await http_get(port, path)
            assert status == 404, path
            assert b"SECRET" not in body


# --- TLS -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_certs_pair_serves_wss_to_a_node_that_trusts_it(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tls"
    assert synapse(["certs", "--out", str(folder), "--host", "gpu-box.lan", "--host", "192.168.1.20"]) == 0
    printed = capsys.readouterr().out
    cert_path, key_path = folder / "gateway-cert.pem", folder / "gateway-key.pem"
    assert f"SYNAPSE_GATEWAY_TLS_CERT={cert_path.resolve()}" in printed
    assert f"SYNAPSE_GATEWAY_TLS_KEY={key_path.resolve()}" in printed
    assert f"SYNAPSE_NODE_TLS_CA={cert_path.resolve()}" in printed
    assert key_path.stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gpu-box.lan", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.168.1.20", "127.0.0.1"]
    assert synapse(["certs", "--out", str(folder)]) == 2, "an existing pair is kept without --force"

    async with running_gateway(tls_cert=cert_path, tls_key=key_path) as gateway:
        assert gateway.ws_url.startswith("wss://")
        agent = make_agent(gateway.ws_url, "secure", tmp_path / "cache", tls_ca=cert_path)
        async with watching(gateway) as watch, running_agent(agent):
            await watch.until("secure", "joined")
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the pair
            await connect(gateway.ws_url, ssl=ssl.create_default_context(), open_timeout=3)
        with pytest.raises(InvalidHandshake):  # plain WebSocket to the TLS port
            await connect(gateway.ws_url.replace("wss://", "ws://"), open_timeout=3)
        localhost = make_agent(gateway.ws_url.replace("127.0.0.1", "localhost"), "by-name", tmp_path / "c2",
                               tls_ca=cert_path)  # fmt: skip
        async with running_agent(localhost):
            assert "by-name" in gateway.hub.connections
