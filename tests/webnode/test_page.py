"""The web node page in headless Chromium against a real gateway and a real sharder (both in-process).

Everything goes through the real protocol: AssignShard over the gateway's gRPC, steps over its Run stream.
Each stage's output is checked against the PyTorch reference; then the IndexedDB cache, and bad input:
garbage frames, a corrupt shard, impossible steps, GPU errors, a browser without WebGPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from services.common.gpt2.model import GPT2Stage, KVCache
from services.common.pb import common_pb2, gateway_pb2, sharder_pb2, sharder_pb2_grpc
from services.common.server import channel
from services.sharder.__main__ import start_sharder
from services.sharder.catalog import Catalog
from services.sharder.http_server import start_http
from services.sharder.settings import SharderSettings
from services.sharder.shards import read_shard
from services.wire import syn1
from services.wire.gateway_client import GatewayClient
from services.wire.steps import Step, StepFailed, TokenInput
from tests.checkpoints import load_reference, make_random_checkpoint
from tests.integration.gateway_fixtures import RunningGateway, frames_step, running_gateway, stage, token_step
from tests.webnode.conftest import NodePage, OpenPage, page_url

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

# GPT-2's real vocabulary (so the LM head and the 3-pass top-K have GPT-2's width) on a tiny body.
SHAPE = dict(n_layer=4, n_head=4, n_embd=64, vocab_size=50257, n_positions=64)
TOP_K = 5
MAX_RELATIVE_ERROR = 1e-3
FAST = dict(speed=50)  # skip the start-up benchmark (test_hello_reports_benchmark_and_adapter runs it)


@dataclass
class Sharder:
    stub: sharder_pb2_grpc.ShardServiceStub
    catalog: Catalog


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=11, **SHAPE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sharder(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sharder]:
    """The real sharder writing float16 shards (the default): the page unpacks them to f32 on the GPU."""
    settings = SharderSettings(
        host="127.0.0.1", port=0, http_host="127.0.0.1", http_port=0, metrics_port=None, model=str(checkpoint_dir),
        shards_dir=tmp_path_factory.mktemp("shards"), dtype="float16", shutdown_grace_s=0.2,
    )  # fmt: skip
    server, runner, catalog = await start_sharder(settings)
    upstream = channel(server.address)
    yield Sharder(sharder_pb2_grpc.ShardServiceStub(upstream), catalog)
    await upstream.close()
    await server.stop()
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway(heartbeat_s=1.0, heartbeat_timeout_s=5.0, step_timeout_s=60.0) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(gateway: RunningGateway) -> AsyncIterator[GatewayClient]:
    """The router's own client for the gateway's Run stream."""
    client = GatewayClient(gateway.address)
    yield client
    await client.close()


async def plan(sharder: Sharder, nodes: int) -> list[sharder_pb2.Assignment]:
    capacities = [common_pb2.NodeCapacity(node_id=f"n{i}", memory_bytes=1 << 30, speed=100.0) for i in range(nodes)]
    response = await sharder.stub.Plan(sharder_pb2.PlanRequest(nodes=capacities), timeout=60)
    return list(response.assignments)


async def assign(
    gateway: RunningGateway,
    node: str,
    assignment: sharder_pb2.Assignment,
    *,
    top_k: int,
    dtype: int = common_pb2.DTYPE_FLOAT32,
    **urls: str,
) -> None:
    request = gateway_pb2.AssignShardRequest(
        node_id=node, shard_id=assignment.shard_id, layers=assignment.layers,
        shard_url=urls.get("shard_url", assignment.shard_url),
        manifest_url=urls.get("manifest_url", assignment.manifest_url),
        sha256=assignment.sha256, size_bytes=assignment.size_bytes, top_k=top_k, activation_dtype=dtype,
    )  # fmt: skip
    await gateway.stub.AssignShard(request, timeout=10)


async def assign_and_wait(page: NodePage, gateway: RunningGateway, node: str, assignment, **options) -> dict:
    loads = (await page.state())["loads"]
    await assign(gateway, node, assignment, **options)
    return await page.wait_for(f"s.state === 'ready' && s.loads === {loads + 1}", 120)


def reference_stage(sharder: Sharder, assignment: sharder_pb2.Assignment) -> GPT2Stage:
    """GPT2Stage in float32 on the shard's own (f16-rounded) weights."""
    manifest = sharder.catalog.manifest(assignment.shard_id)
    tensors = read_shard(manifest, sharder.catalog.folder)
    return GPT2Stage.from_tensors(manifest.config, manifest.layer_start, manifest.layer_end, tensors)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected)) / np.max(np.abs(expected)))


@dataclass
class Scenario:
    """The same steps on the page (through the gateway) and on the reference stage, request by request."""

    client: GatewayClient
    node: str
    reference: GPT2Stage
    caches: dict[int, KVCache] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    async def step(self, new: dict[int, object]) -> list[tuple[syn1.Frame, torch.Tensor]]:
        """new: request id -> token ids (first stage) or activations (T, n_embd); (page frame, reference)."""
        ref = self.reference
        route = [stage(self.node, ref.start, ref.end)]
        positions = {rid: self.lengths.get(rid, 0) for rid in new}
        if ref.is_first:
            tokens_in = tuple(TokenInput(rid, positions[rid], tokens) for rid, tokens in new.items())
            request = Step(tuple(route), tokens=tokens_in)
            inputs = [torch.tensor(tokens) for tokens in new.values()]
        else:
            frames = [syn1.Frame.activation(rid, positions[rid], hidden) for rid, hidden in new.items()]
            request = frames_step(route, syn1.encode_frames(frames))
            inputs = [torch.from_numpy(hidden) for hidden in new.values()]
        response = await self.client.step(request, 120)
        caches = [self.caches.setdefault(rid, ref.new_cache()) for rid in new]
        expected = ref(inputs, caches, last_only=True)
        for rid, tokens in new.items():
            self.lengths[rid] = positions[rid] + len(tokens)
        frames = syn1.decode_frames(response.frames)
        assert [frame.request_id for frame in frames] == list(new)
        for frame, rid in zip(frames, new, strict=True):
            last = positions[rid] + len(new[rid]) - 1
            assert frame.position == (last if ref.is_last else positions[rid])
        return list(zip(frames, expected, strict=True))

    async def run(self, first_id: int, hidden_rng: np.random.Generator | None = None):
        """Prefill two requests (7 and 3 tokens) in one step, then 3 decode steps of both; every pair."""
        lengths = {first_id: 7, first_id + 1: 3}
        pairs = []
        for step in range(4):
            new = {}
            for rid, length in lengths.items():
                rows = length if step == 0 else 1
                if self.reference.is_first:
                    new[rid] = [int(t) for t in (np.arange(rows) * 4099 + 31 * rid + 997 * step) % SHAPE["vocab_size"]]
                else:
                    new[rid] = hidden_rng.standard_normal((rows, SHAPE["n_embd"])).astype(np.float32)
            pairs += await self.step(new)
        return pairs


# ---- numerics -------------------------------------------------------------------------------------


async def test_hello_reports_benchmark_and_adapter(open_page: OpenPage, gateway: RunningGateway) -> None:
    """Without ?speed= the page runs its benchmark; hello carries it, the adapter and the probed memory."""
    page = await open_page(page_url(gateway.ws_port, node_id="web-hello"))
    state = await page.wait_for("s.state === 'joined'", 120)
    assert state["speed"] > 0 and state["memoryBytes"] >= 16 << 20
    assert state["cpu"] == ("swiftshader" in state["device"]), "SwiftShader is a fallback (CPU) adapter"
    record = gateway.hub.connections["web-hello"].record
    assert record.kind == "web" and record.device.startswith("WebGPU") and record.device == state["device"]
    assert record.speed == pytest.approx(state["speed"]) and record.memory_bytes == state["memoryBytes"]
    text = await page.page.inner_text("body")
    assert "Joined" in text and "web-hello" in text and "layer passes/s" in text


async def test_every_stage_matches_pytorch(open_page: OpenPage, gateway, sharder, client) -> None:
    """First, middle and last stage of a 3-stage plan on one page: activations, full logits, top-K, wire dtypes."""
    node = "web-stages"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    first, middle, last = await plan(sharder, 3)
    assert first.layers.start == 0 and last.layers.end == SHAPE["n_layer"] and middle.layers.start > 0
    rng = np.random.default_rng(5)
    errors = {}
    for name, assignment in (("first", first), ("middle", middle)):
        state = await assign_and_wait(page, gateway, node, assignment, top_k=0)
        assert state["layers"] == [assignment.layers.start, assignment.layers.end]
        scenario = Scenario(client, node, reference_stage(sharder, assignment))
        pairs = await scenario.run(100, rng)
        for frame, _ in pairs:
            assert frame.msg_type is syn1.MessageType.ACTIVATION and frame.array.dtype == np.float32
        errors[name] = max(relative_error(frame.to_float32(), expected) for frame, expected in pairs)

    await assign_and_wait(page, gateway, node, last, top_k=0)
    scenario = Scenario(client, node, reference_stage(sharder, last))
    pairs = await scenario.run(200, rng)
    for frame, _ in pairs:
        assert frame.msg_type is syn1.MessageType.LOGITS and frame.array.shape == (1, SHAPE["vocab_size"])
    errors["last, logits"] = max(relative_error(frame.to_float32(), expected) for frame, expected in pairs)

    await assign_and_wait(page, gateway, node, last, top_k=TOP_K)  # same shard: nothing reloaded
    scenario = Scenario(client, node, reference_stage(sharder, last))
    for frame, expected in await scenario.run(300, rng):
        assert frame.msg_type is syn1.MessageType.OUTPUT and frame.array.shape == (1, TOP_K)
        values, ids = torch.topk(expected[0], TOP_K)
        assert frame.token_ids[0].tolist() == ids.tolist()
        errors["last, top-k"] = max(errors.get("last, top-k", 0.0), relative_error(frame.to_float32()[0], values))
    print("max relative errors against GPT2Stage (float32, same f16 weights):", errors)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors
    assert (await page.state())["downloads"] == 3, "a re-assigned shard that is loaded is not fetched again"

    # Wire dtypes of the activations a stage sends on: f16 and int8 round what f32 sends.
    for dtype, tolerance in ((common_pb2.DTYPE_FLOAT16, 2e-3), (common_pb2.DTYPE_INT8, 1 / 127)):
        await assign_and_wait(page, gateway, node, first, top_k=0, dtype=dtype)
        scenario = Scenario(client, node, reference_stage(sharder, first))
        frame, expected = (await scenario.step({400 + dtype: [5, 6, 7, 8]}))[0]
        assert frame.array.dtype == (np.float16 if dtype == common_pb2.DTYPE_FLOAT16 else np.int8)
        assert relative_error(frame.to_float32(), expected) <= tolerance


async def test_whole_model_in_pieces_matches_transformers(
    open_page: OpenPage, gateway, sharder, client, checkpoint_dir: Path
) -> None:
    """One shard [0, n_layer) with wte bound in 4 pieces: logits and greedy tokens of transformers.

    With cpu=0 the page picks kernels as on a GPU: the 25-row prefill takes the tiled matmul, decode matvec.
    """
    node = "web-whole"
    page = await open_page(page_url(gateway.ws_port, node_id=node, max_binding_mib=4, cpu=0, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    await assign_and_wait(page, gateway, node, whole, top_k=0)
    model = load_reference(checkpoint_dir)
    model.load_state_dict({name: t.half().float() for name, t in model.state_dict().items()})  # the shard's f16
    scenario = Scenario(client, node, reference_stage(sharder, whole))
    sequences = {1: [464, 2068, 7586, 21831], 2: [50256], 3: [(index * 997) % 50257 for index in range(20)]}
    worst = 0.0
    for _ in range(4):  # prefill both, then 3 greedy decode steps, batched
        new = {rid: tokens[scenario.lengths.get(rid, 0) :] for rid, tokens in sequences.items()}
        for frame, _expected in await scenario.step(new):
            tokens = sequences[frame.request_id]
            with torch.no_grad():
                expected = model(torch.tensor([tokens])).logits[0, -1]
            worst = max(worst, relative_error(frame.to_float32()[0], expected))
            tokens.append(int(np.argmax(frame.to_float32()[0])))
            assert tokens[-1] == int(torch.argmax(expected))
    print(f"whole model, wte in 4 pieces: max relative logit error {worst:.2e} against transformers")
    assert worst <= MAX_RELATIVE_ERROR


# ---- the IndexedDB cache --------------------------------------------------------------------------


async def test_reload_takes_the_shard_from_indexeddb(open_page: OpenPage, gateway, sharder, client) -> None:
    node = "web-cache"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    state = await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    assert state["downloads"] == 1 and state["cacheHits"] == 0
    assert len(page.shard_requests()) == 1
    seen = len(page.requests)

    await page.page.reload()
    await page.wait_for("s.state === 'joined'")
    state = await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    assert state["downloads"] == 0 and state["cacheHits"] == 1
    after = page.requests[seen:]
    assert not [url for url in after if ".safetensors" in url or "/shards/" in url], after
    assert any(url.endswith("/js/main.js") for url in after), "the reload did load the page again"
    pairs = await Scenario(client, node, reference_stage(sharder, whole)).run(500)
    for frame, expected in pairs:
        assert frame.token_ids[0].tolist() == torch.topk(expected[0], TOP_K).indices.tolist()


# ---- bad input ------------------------------------------------------------------------------------


@dataclass
class FakeGateway:
    """Records what the page sends. With `garbage`, sends garbage on the first connection and drops the
    second (as a gateway that shuts down); later connections are kept."""

    garbage: bool = True
    received: list[list[object]] = field(default_factory=list)  # per connection: what the page sent
    close_codes: list[int | None] = field(default_factory=list)

    async def handle(self, websocket: ServerConnection) -> None:
        messages: list[object] = []
        self.received.append(messages)
        hello = json.loads(await websocket.recv())
        messages.append(hello)
        await websocket.send(json.dumps({"kind": "welcome", "gateway_id": "fake", "heartbeat_s": 1.0}))
        if self.garbage and len(self.received) == 1:
            await websocket.send(b"SYN2" + bytes(40))  # not SYN1: bad magic
        elif self.garbage and len(self.received) == 2:
            await websocket.close(1001, "going away")  # as a gateway that shuts down
        with contextlib.suppress(Exception):
            async for message in websocket:
                messages.append(json.loads(message) if isinstance(message, str) else message)
        self.close_codes.append(websocket.close_code)


async def test_garbage_frames_are_reported_the_page_leaves_and_reconnects(open_page: OpenPage, gateway) -> None:
    fake = FakeGateway()
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        page = await open_page(
            page_url(gateway.ws_port, node_id="web-garbage", gateway=f"ws://127.0.0.1:{port}/ws", **FAST)
        )
        state = await page.wait_for("s.errors.some((e) => e.message.includes('bad frames'))")
        assert "bad magic" in state["error"]
        assert await page.page.is_visible("#error") and "bad magic" in await page.page.inner_text("#error")
        await page.wait_for("s.sessions === 3", 30)  # it reconnected after its close and after the drop
    first = fake.received[0]
    assert first[0]["kind"] == "hello" and first[0]["node_kind"] == "web" and first[0]["node_id"] == "web-garbage"
    errors = [m for m in first if isinstance(m, dict) and m.get("kind") == "error"]
    assert len(errors) == 1 and errors[0]["fatal"] is True and "bad magic" in errors[0]["message"]
    assert fake.close_codes[0] == 4007
    assert [messages[0]["kind"] for messages in fake.received] == ["hello"] * 3
    assert fake.close_codes[1] == 1001


@pytest_asyncio.fixture(loop_scope="module")
async def corrupt_server(sharder: Sharder) -> AsyncIterator[str]:
    """Serves the whole-model shard's real manifest, and its file with one byte flipped."""

    async def manifest(request: web.Request) -> web.Response:
        (shard,) = [m for m in sharder.catalog.manifests() if m.is_first and m.is_last]
        body = sharder.catalog.manifest_path(shard).read_bytes()
        return web.Response(body=body, content_type="application/json", headers={"Access-Control-Allow-Origin": "*"})

    async def shard_file(request: web.Request) -> web.Response:
        (shard,) = [m for m in sharder.catalog.manifests() if m.is_first and m.is_last]
        data = bytearray(sharder.catalog.shard_path(shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        return web.Response(body=bytes(data), headers={"Access-Control-Allow-Origin": "*"})

    app = web.Application()
    app.router.add_get("/manifest.json", manifest)
    app.router.add_get("/shard.safetensors", shard_file)
    runner, port = await start_http(app, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_corrupt_shard_is_reported_not_cached_and_the_node_leaves_cleanly_then_rejoins(
    open_page: OpenPage, gateway, sharder, corrupt_server: str
) -> None:
    node = "web-corrupt"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    urls = dict(shard_url=f"{corrupt_server}/shard.safetensors", manifest_url=f"{corrupt_server}/manifest.json")
    await assign(gateway, node, whole, top_k=TOP_K, **urls)
    state = await page.wait_for("s.error !== null && s.error.includes('sha256')")
    assert whole.sha256 in state["error"] and "not cached" in state["error"]
    assert state["loads"] == 0
    assert "sha256 mismatch" in await page.page.inner_text("#error")
    # A clean leave (error, bye, close: the router re-plans without it), then a new join after the backoff.
    for _ in range(200):
        connection = gateway.hub.connections.get(node)
        if connection is not None and connection.record.state == "joined":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the page did not join again after leaving")
    # The real shard still loads: downloaded again, as nothing corrupt was cached.
    await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    assert [url for url in page.shard_requests() if url.startswith(whole.shard_url)], page.requests


async def test_impossible_steps_fail_alone_and_the_node_stays(open_page: OpenPage, gateway, sharder, client) -> None:
    node = "web-steps"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    first = (await plan(sharder, 3))[0]
    await assign_and_wait(page, gateway, node, first, top_k=0)
    route = [stage(node, first.layers.start, first.layers.end)]
    cases = {
        "replay from position 0": token_step(route, 9, 5, [1, 2]),  # continues a request it never saw
        "outside [0, 50257)": token_step(route, 9, 0, [50257]),
        "takes TOKENS frames": frames_step(
            route, syn1.encode(syn1.Frame.activation(9, 0, np.zeros((1, 64), np.float32)))
        ),
        "exceed the model's 64 positions": token_step(route, 9, 0, list(range(65))),
    }
    for expected, request in cases.items():
        with pytest.raises(StepFailed) as failed:
            await client.step(request, 60)
        assert failed.value.node_id == node and expected in str(failed.value), failed.value
    response = await client.step(token_step(route, 9, 0, [1, 2, 3]), 60)
    assert syn1.decode_frames(response.frames)[0].rows == 3
    # Steps queued while one runs are batched; a bad one among them fails alone, in its place in the order.
    reference = reference_stage(sharder, first)
    requests = [token_step(route, 20, 0, [4, 5]), token_step(route, 21, 3, [6]), token_step(route, 22, 0, [7, 8, 9])]
    replies = await asyncio.gather(*(client.step(request, 60) for request in requests), return_exceptions=True)
    first_reply, bad, last_reply = replies
    assert isinstance(bad, StepFailed) and "replay from position 0" in str(bad)
    for reply, tokens in ((first_reply, [4, 5]), (last_reply, [7, 8, 9])):
        assert not isinstance(reply, BaseException), reply
        (expected,) = reference([torch.tensor(tokens)], [reference.new_cache()])
        assert relative_error(syn1.decode_frames(reply.frames)[0].to_float32(), expected) <= MAX_RELATIVE_ERROR
    state = await page.state()
    assert state["state"] == "ready" and state["error"] is None
    assert state["stepsServed"] == 3, "the bad steps were not served"


GPU_FAILURES = {
    "uncaptured": "device.createBuffer({ size: 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.MAP_WRITE })",
    "GPU device lost": "device.destroy()",
}


@pytest.mark.parametrize("expected", GPU_FAILURES)
async def test_gpu_failure_is_reported_and_the_node_leaves(open_page: OpenPage, gateway, expected: str) -> None:
    """The page sends error (fatal) + bye, closes, and never rejoins; the real gateway, too, sees it go."""
    fake = FakeGateway(garbage=False)
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        for url in (f"ws://127.0.0.1:{port}/ws", ""):
            node = f"web-gpu-{len(url)}-{expected.split()[-1].lower()}"
            page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST, **({"gateway": url} if url else {})))
            await page.wait_for("s.state === 'joined'")
            # The GPU process reports errors when the page next talks to it: onSubmittedWorkDone makes it talk.
            script = f"{GPU_FAILURES[expected]}; await device.queue.onSubmittedWorkDone();"
            await page.page.evaluate(f"async () => {{ const device = window.synapse.gpu.device; {script} }}")
            state = await page.wait_for("s.state === 'error' && s.connection.startsWith('left')")
            assert expected in state["error"] and expected in await page.page.inner_text("#error")
        for _ in range(100):
            if node not in gateway.hub.connections and fake.close_codes:
                break
            await asyncio.sleep(0.05)
        assert node not in gateway.hub.connections, "the real gateway saw the node leave"
        await asyncio.sleep(1.5)
        assert (await page.state())["sessions"] == 1, "a node whose GPU failed does not rejoin"
    (messages,) = fake.received  # one connection: no reconnect
    said = [message for message in messages if isinstance(message, dict) and message["kind"] != "heartbeat"]
    assert [message["kind"] for message in said] == ["hello", "error", "bye"], messages
    assert said[1]["fatal"] is True and expected in said[1]["message"]
    assert fake.close_codes == [1000]


async def test_without_webgpu_the_page_says_so_and_does_not_join(open_page: OpenPage, gateway) -> None:
    page = await open_page(page_url(gateway.ws_port, node_id="web-nogpu"), init_script="delete Navigator.prototype.gpu")
    state = await page.wait_for("s.state === 'unsupported'")
    assert "no WebGPU" in state["error"]
    assert "No WebGPU" in await page.page.inner_text("#state")
    assert await page.page.is_visible("#error")
    await asyncio.sleep(0.5)
    assert "web-nogpu" not in gateway.hub.connections
