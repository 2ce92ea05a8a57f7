"""A real NodeAgent against a real gateway and a real sharder: shard download, sha256 check, cache, steps,
corrupt downloads, reconnecting, and freeing KV caches."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from services.common.pb import common_pb2, gateway_pb2, sharder_pb2, sharder_pb2_grpc
from services.common.server import channel
from services.sharder.__main__ import start_sharder
from services.sharder.catalog import Catalog
from services.sharder.http_server import start_http
from services.sharder.settings import SharderSettings
from services.wire import syn1
from services.wire.steps import StepFailed
from tests.checkpoints import load_reference, make_random_checkpoint
from tests.integration.gateway_fixtures import (
    RunningGateway,
    make_agent,
    run_client,
    running_agent,
    running_gateway,
    stage,
    start_running_gateway,
    token_step,
    watching,
)
from tests.polling import eventually

TOP_K = 5


@dataclass
class Sharder:
    stub: sharder_pb2_grpc.ShardServiceStub
    catalog: Catalog


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=3)


@pytest.fixture
async def sharder(checkpoint_dir: Path, tmp_path: Path) -> AsyncIterator[Sharder]:
    settings = SharderSettings(
        host="127.0.0.1", port=0, http_host="127.0.0.1", http_port=0, metrics_port=None, model=str(checkpoint_dir),
        shards_dir=tmp_path / "shards", dtype="float32", shutdown_grace_s=0.2,
    )  # fmt: skip
    server, runner, catalog = await start_sharder(settings)
    upstream = channel(server.address)
    yield Sharder(sharder_pb2_grpc.ShardServiceStub(upstream), catalog)
    await upstream.close()
    await server.stop()
    await runner.cleanup()


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway() as running:
        yield running


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    """Records of one event (the log message), from every logger."""
    caplog.set_level(logging.INFO)
    yield lambda event: [record for record in caplog.records if record.getMessage() == event]


@dataclass(frozen=True)
class Planned:
    """One node's assignment and the model's shape, as the router would send them."""

    assignment: sharder_pb2.Assignment
    config: common_pb2.ModelConfig

    @property
    def sha256(self) -> str:
        return self.assignment.sha256

    @property
    def shard_id(self) -> str:
        return self.assignment.shard_id


async def plan_one(sharder: Sharder, node_id: str) -> Planned:
    nodes = [common_pb2.NodeCapacity(node_id=node_id, memory_bytes=1 << 30, speed=100.0)]
    plan = await sharder.stub.Plan(sharder_pb2.PlanRequest(nodes=nodes), timeout=30)
    (assignment,) = plan.assignments
    return Planned(assignment, plan.config)


async def assign(gateway: RunningGateway, planned: Planned, node_id: str, **urls: str) -> None:
    assignment = planned.assignment
    request = gateway_pb2.AssignShardRequest(
        config=planned.config,
        node_id=node_id, shard_id=assignment.shard_id, layers=assignment.layers,
        shard_url=urls.get("shard_url", assignment.shard_url),
        manifest_url=urls.get("manifest_url", assignment.manifest_url), sha256=assignment.sha256,
        size_bytes=assignment.size_bytes, top_k=TOP_K, activation_dtype=common_pb2.DTYPE_FLOAT32,
    )  # fmt: skip
    await gateway.stub.AssignShard(request, timeout=5)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(90)
async def test_agent_downloads_verifies_caches_and_serves(
    gateway: RunningGateway, sharder: Sharder, checkpoint_dir: Path, tmp_path: Path, logs
) -> None:
    cache_dir = tmp_path / "cache"
    assignment = await plan_one(sharder, "native-1")
    async with watching(gateway) as watch:
        async with running_agent(make_agent(gateway.ws_url, "native-1", cache_dir)) as agent:
            await assign(gateway, assignment, "native-1")
            ready = await watch.until("native-1", "ready", timeout_s=30)
            assert (ready.node.layers.start, ready.node.layers.end) == (0, 2)
            assert ready.node.shard_id == assignment.shard_id
            (cached,) = (cache_dir / assignment.sha256).glob("*.safetensors")
            assert sha256_of(cached) == assignment.sha256
            assert len(logs("shard_downloaded")) == 1
            await _step_matches_reference(gateway, checkpoint_dir)
            assert agent.worker is not None and agent.worker.cached_requests == 1
        await watch.until("native-1", "gone")
        stamp = cached.stat().st_mtime_ns

        # A fresh agent on the same cache folder: nothing downloaded again.
        async with running_agent(make_agent(gateway.ws_url, "native-2", cache_dir)):
            await assign(gateway, assignment, "native-2")
            await watch.until("native-2", "ready", timeout_s=30)
    assert len(logs("shard_downloaded")) == 1 and len(logs("shard_cached")) == 1
    assert cached.stat().st_mtime_ns == stamp
    assert not list(cache_dir.rglob("*.part"))


async def _step_matches_reference(gateway: RunningGateway, checkpoint_dir: Path) -> None:
    prompt = [5, 17, 3, 60]
    async with run_client(gateway) as client:
        response = await client.step(token_step([stage("native-1", 0, 2)], 7, 0, prompt), 30)
    (output,) = syn1.decode_frames(response.frames)
    assert (output.msg_type, output.request_id, output.position) == (syn1.MessageType.OUTPUT, 7, len(prompt) - 1)
    with torch.no_grad():
        logits = load_reference(checkpoint_dir)(torch.tensor([prompt])).logits[0, -1]
    values, ids = torch.topk(logits, TOP_K)
    assert output.token_ids[0].tolist() == ids.tolist()
    torch.testing.assert_close(torch.tensor(output.to_float32()[0]), values, rtol=1e-3, atol=1e-3)
    (hop,) = response.hops
    assert hop.node_id == "native-1" and hop.compute_ms > 0 and hop.round_trip_ms >= hop.compute_ms


@pytest.fixture
async def corrupt_server(sharder: Sharder) -> AsyncIterator[str]:
    """Serves the real manifest of the whole-model shard, and its file with one byte flipped."""

    async def manifest(request: web.Request) -> web.Response:
        (shard,) = sharder.catalog.manifests()
        return web.Response(body=sharder.catalog.manifest_path(shard).read_bytes(), content_type="application/json")

    async def shard_file(request: web.Request) -> web.Response:
        (shard,) = sharder.catalog.manifests()
        data = bytearray(sharder.catalog.shard_path(shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        return web.Response(body=bytes(data), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/manifest.json", manifest)
    app.router.add_get("/shard.safetensors", shard_file)
    runner, port = await start_http(app, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.timeout(90)
async def test_corrupt_download_is_reported_the_node_leaves_cleanly_and_rejoins(
    gateway: RunningGateway, sharder: Sharder, corrupt_server: str, tmp_path: Path, logs
) -> None:
    cache_dir = tmp_path / "cache"
    assignment = await plan_one(sharder, "native-1")
    agent = make_agent(gateway.ws_url, "native-1", cache_dir, reconnect_min_s=0.05, reconnect_max_s=0.2)
    async with running_agent(agent), watching(gateway) as watch:
        urls = dict(manifest_url=f"{corrupt_server}/manifest.json", shard_url=f"{corrupt_server}/shard.safetensors")
        await assign(gateway, assignment, "native-1", **urls)
        await eventually(lambda: bool(logs("node_error")), 30, "the node's error at the gateway")
        (error,) = logs("node_error")
        assert "sha256" in error.error and assignment.sha256 in error.error
        assert error.node == "native-1"
        await watch.until("native-1", "gone", timeout_s=10)  # left, so the router re-plans without it
        assert "ready" not in watch.states("native-1")
        assert not list(cache_dir.rglob("*.safetensors*")), "nothing corrupt may stay in the cache"
        # It joins again by itself, and then loads the real shard.
        await eventually(lambda: watch.states("native-1")[-1] == "joined", 10, "the node joining again")
        await assign(gateway, assignment, "native-1")
        await watch.until("native-1", "ready", timeout_s=30)


@pytest.mark.timeout(60)
async def test_agent_reconnects_with_backoff_and_says_hello_again(tmp_path: Path, logs) -> None:
    first = await start_running_gateway()
    port = first.ws_port
    try:
        agent = make_agent(first.ws_url, "roamer", tmp_path / "cache", reconnect_min_s=0.05, reconnect_max_s=0.4)
        async with running_agent(agent):
            assert "roamer" in first.hub.connections
            await first.stop()
            await eventually(lambda: not agent.connected.is_set(), 5, "the agent noticing the gateway left")
            await eventually(lambda: len(logs("gateway_unreachable")) >= 3, 10, "three failed reconnects")
            async with running_gateway(ws_port=port) as second:
                await asyncio.wait_for(agent.connected.wait(), 5)
                await eventually(lambda: "roamer" in second.hub.connections, 5, "hello to the new gateway")
    finally:
        await first.stop()
    delays = [record.retry_s for record in logs("gateway_unreachable")]
    assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0], delays
    assert max(delays) <= 0.4
    assert len(logs("gateway_joined")) == 2


@pytest.mark.timeout(60)
async def test_agent_fails_over_to_its_next_gateway_url_in_turn(tmp_path: Path, logs) -> None:
    """Two gateway URLs: when the first gateway goes the node joins the second; with both gone it tries them in
    turn, the delay doubling after each round in which every URL failed."""
    first, second = await start_running_gateway(), await start_running_gateway()
    try:
        urls = f"{first.ws_url},{second.ws_url}"
        agent = make_agent(urls, "roamer", tmp_path / "cache", reconnect_min_s=0.05, reconnect_max_s=0.4)
        async with running_agent(agent):
            assert "roamer" in first.hub.connections
            await first.stop()
            await eventually(lambda: "roamer" in second.hub.connections, 5, "the node on its second gateway")
            await second.stop()
            await eventually(lambda: len(logs("gateway_unreachable")) >= 8, 10, "tries while both are down")
    finally:
        await first.stop()
        await second.stop()
    assert [record.url for record in logs("gateway_joined")] == [first.ws_url, second.ws_url]
    tries = logs("gateway_unreachable")[:8]
    assert [record.url for record in tries] == [first.ws_url, second.ws_url] * 4
    # The welcome on the second URL reset the delay; its drop and the first URL's refusal make a round, so the
    # delay doubles from there, each round (both URLs) at one delay, up to reconnect_max_s.
    assert [record.retry_s for record in tries] == [0.05, 0.1, 0.1, 0.2, 0.2, 0.4, 0.4, 0.4]


@pytest.mark.timeout(30)
async def test_agent_logs_an_error_from_the_gateway_and_reconnects(tmp_path: Path, logs) -> None:
    """A gateway that refuses the node (error, then close 1008): the agent keeps running and comes back."""
    hellos: list[dict] = []

    async def refusing(websocket: ServerConnection) -> None:
        hellos.append(json.loads(await websocket.recv()))
        await websocket.send(json.dumps({"kind": "welcome", "gateway_id": "strict", "heartbeat_s": 1.0}))
        await websocket.send(json.dumps({"kind": "error", "message": "go away", "fatal": True}))
        await websocket.close(1008, "go away")

    async with serve(refusing, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        agent = make_agent(f"ws://127.0.0.1:{port}/ws", "stubborn", tmp_path / "cache")
        async with running_agent(agent):
            await eventually(lambda: len(hellos) >= 2, 10, "a second hello after the refusal")
    assert [record.error for record in logs("gateway_error")][:1] == ["go away"]
    assert all(hello["node_id"] == "stubborn" and hello["kind"] == "hello" for hello in hellos)


@pytest.mark.timeout(90)
async def test_kv_caches_are_freed_on_release_and_when_idle(
    gateway: RunningGateway, sharder: Sharder, tmp_path: Path
) -> None:
    assignment = await plan_one(sharder, "native-1")
    agent = make_agent(gateway.ws_url, "native-1", tmp_path / "cache", idle_timeout_s=1.0)
    async with running_agent(agent), watching(gateway) as watch, run_client(gateway) as client:
        await assign(gateway, assignment, "native-1")
        await watch.until("native-1", "ready", timeout_s=30)
        route = [stage("native-1", 0, 2)]
        for request_id in (1, 2):
            await client.step(token_step(route, request_id, 0, [1, 2, 3]), 30)
        assert agent.worker.cached_requests == 2
        await client.release([1], ["native-1"])
        await eventually(lambda: agent.worker.cached_requests == 1, 5, "request 1 released")
        # Request 2 is never released: the idle sweep frees it after idle_timeout_s.
        await eventually(lambda: agent.worker.cached_requests == 0, 5, "request 2 expired")
        # A step that continues a freed request is refused (step_failed), and the node stays.
        with pytest.raises(StepFailed) as failed:
            await client.step(token_step(route, 2, 3, [4]), 30)
        assert failed.value.node_id == "native-1" and "replay from position 0" in str(failed.value)
        assert "native-1" in gateway.hub.connections


@pytest.mark.timeout(30)
async def test_step_before_any_shard_is_a_step_error(gateway: RunningGateway, tmp_path: Path) -> None:
    async with running_agent(make_agent(gateway.ws_url, "empty", tmp_path / "cache")), run_client(gateway) as client:
        with pytest.raises(StepFailed) as failed:
            await client.step(token_step([stage("empty", 0, 2)], 1, 0, [1]), 10)
    assert failed.value.node_id == "empty" and "before any shard" in str(failed.value)
