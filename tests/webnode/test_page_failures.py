"""The web node page in headless Chromium against bad input: garbage frames, a corrupt shard, impossible steps,
GPU errors, a browser without WebGPU. A real gateway and sharder (in-process), and fake gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import pytest_asyncio
import torch
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from services.sharder.http_server import start_http
from services.wire import syn1
from services.wire.steps import StepFailed
from tests.integration.gateway_fixtures import frames_step, stage, token_step
from tests.polling import eventually
from tests.webnode.conftest import OpenPage, Sharder, page_url
from tests.webnode.page_steps import (
    FAST,
    MAX_RELATIVE_ERROR,
    TOP_K,
    assign,
    assign_and_wait,
    plan,
    reference_stage,
    relative_error,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


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
        assert len(page.websockets) == 3, page.websockets  # the third connection is kept: no fourth
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
    def joined_again() -> bool:
        connection = gateway.hub.connections.get(node)
        return connection is not None and connection.record.state == "joined"

    await eventually(joined_again, 10, "the page joining again after leaving")
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
            # "left" is shown only once the connection has stopped for good: its socket closed and no
            # reconnect scheduled (connection.js), so from here on nothing can open another one.
            state = await page.wait_for("s.state === 'error' && s.connection.startsWith('left')")
            assert expected in state["error"] and expected in await page.page.inner_text("#error")
            assert state["sessions"] == 1 and len(page.websockets) == 1, "a node whose GPU failed does not rejoin"
        await eventually(lambda: node not in gateway.hub.connections, 5, "the real gateway seeing the node leave")
        await eventually(lambda: bool(fake.close_codes), 5, "the fake gateway seeing the socket close")
    (messages,) = fake.received  # one connection: no reconnect
    said = [message for message in messages if isinstance(message, dict) and message["kind"] != "heartbeat"]
    assert [message["kind"] for message in said] == ["hello", "error", "bye"], messages
    assert said[1]["fatal"] is True and expected in said[1]["message"]
    assert fake.close_codes == [1000]


async def test_without_webgpu_the_page_says_so_and_does_not_join(open_page: OpenPage, gateway) -> None:
    page = await open_page(page_url(gateway.ws_port, node_id="web-nogpu"), init_script="delete Navigator.prototype.gpu")
    # boot() sets "unsupported" and returns: no node and no connection exist, so none can open later.
    state = await page.wait_for("s.state === 'unsupported'")
    assert "no WebGPU" in state["error"]
    assert "No WebGPU" in await page.page.inner_text("#state")
    assert await page.page.is_visible("#error")
    assert state["connection"] == "not connected" and state["sessions"] == 0
    assert page.websockets == [] and "web-nogpu" not in gateway.hub.connections
