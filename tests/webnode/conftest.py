"""Fixtures of the web node tests: wgpu-py devices for the WGSL kernel tests; for the page tests one headless
Chromium per test module (Playwright, Debian's chromium), WebGPU on the CPU through SwiftShader, pages with their
console, network and WebSocket logs kept for assertions; and an in-process sharder (of a tiny GPT-2 with GPT-2's
vocabulary) and gateway, one per module.

Tests that use the browser fixtures run on the module's event loop: put
`pytestmark = pytest.mark.asyncio(loop_scope="module")` in the module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import wgpu
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Request, async_playwright

from services.bench.browser import CHROMIUM, CHROMIUM_ARGS
from services.common.pb import sharder_pb2_grpc
from services.common.server import channel
from services.sharder.__main__ import start_sharder
from services.sharder.catalog import Catalog
from services.sharder.settings import SharderSettings
from services.wire.gateway_client import GatewayClient
from tests.checkpoints import make_random_checkpoint
from tests.integration.gateway_fixtures import RunningGateway, running_gateway
from tests.webnode.wgsl_runner import NoAdapter, WgslRunner, request_adapter, request_f16_adapter

# The page tests' model: GPT-2's real vocabulary (so the LM head and the 3-pass top-K have GPT-2's width) on a
# tiny body.
SHAPE = dict(n_layer=4, n_head=4, n_embd=64, vocab_size=50257, n_positions=64)

PROBE_URL = "http://localhost/__webgpu_probe__"  # answered by a route: a secure context without a server
PROBE_SCRIPT = """async () => {
  if (!navigator.gpu) return "navigator.gpu is missing";
  const adapter = await navigator.gpu.requestAdapter();
  return adapter ? "" : "navigator.gpu.requestAdapter() returned null";
}"""


# ---- wgpu-py, for the kernel tests ----


@pytest.fixture(scope="module")
def adapter() -> wgpu.GPUAdapter:
    try:
        return request_adapter()
    except NoAdapter as error:
        print(f"skipping the WGSL kernel tests: {error}")
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def gpu(adapter: wgpu.GPUAdapter) -> WgslRunner:
    return WgslRunner(adapter)


@pytest.fixture(scope="module")
def gpu_f16() -> WgslRunner:
    """A device with shader-f16. It fails rather than skips: setup installs lavapipe, which has it."""
    return WgslRunner(request_f16_adapter(), shader_f16=True)


# ---- Chromium, for the page tests ----


@dataclass
class NodePage:
    """A page (in its own browser context) with what it logged and every URL it requested."""

    page: Page
    context: BrowserContext
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)  # URL of every WebSocket the page opened

    async def state(self) -> dict:
        return await self.page.evaluate("JSON.parse(JSON.stringify(window.synapse ?? null))")

    async def wait_for(self, condition: str, timeout_s: float = 60.0) -> dict:
        """Wait until the JS expression `condition` over `s` (= window.synapse) is true; the state then."""
        script = f"() => {{ const s = window.synapse; return Boolean(s && ({condition})); }}"
        try:
            await self.page.wait_for_function(script, timeout=timeout_s * 1000, polling=50)
        except Exception as error:
            state = json.dumps(await self.state(), indent=1)[:3000]
            logs = "\n".join(self.console[-30:])
            raise AssertionError(
                f"page never satisfied {condition!r}: {error}\nstate: {state}\nconsole:\n{logs}"
            ) from None
        return await self.state()

    def shard_requests(self) -> list[str]:
        return [url for url in self.requests if url.split("?")[0].endswith(".safetensors")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium with WebGPU; the module's tests skip (saying why) when it offers no adapter."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            reason = await _webgpu_missing(browser)
            if reason:
                print(f"skipping the browser tests: Chromium offers no WebGPU adapter here: {reason}")
                pytest.skip(f"Chromium offers no WebGPU adapter: {reason}")
            yield browser
        finally:
            await browser.close()


async def _webgpu_missing(browser: Browser) -> str:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.route(PROBE_URL, lambda route: route.fulfill(body="<!doctype html>", content_type="text/html"))
        await page.goto(PROBE_URL)
        return await page.evaluate(PROBE_SCRIPT)
    finally:
        await context.close()


OpenPage = Callable[..., Awaitable[NodePage]]


@pytest_asyncio.fixture(loop_scope="module")
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """open_page(url, init_script=None): a new context and page at `url`; all closed after the test."""
    pages: list[NodePage] = []

    async def open_(url: str, init_script: str | None = None) -> NodePage:
        context = await browser.new_context()
        if init_script:
            await context.add_init_script(init_script)
        page = await context.new_page()
        node_page = NodePage(page, context)
        page.on("console", lambda message: node_page.console.append(_console_line(message)))
        page.on("pageerror", lambda error: node_page.console.append(f"pageerror: {error}"))
        page.on("request", lambda request: node_page.requests.append(_request_url(request)))
        page.on("websocket", lambda websocket: node_page.websockets.append(websocket.url))
        pages.append(node_page)
        await page.goto(url)
        return node_page

    yield open_
    for node_page in pages:
        await node_page.context.close()


def _console_line(message: ConsoleMessage) -> str:
    return f"{message.type}: {message.text}"


def _request_url(request: Request) -> str:
    return request.url


def page_url(ws_port: int, **query: object) -> str:
    """The web node page as a gateway serves it, from http://localhost (a secure context)."""
    text = "&".join(f"{key}={value}" for key, value in query.items())
    return f"http://localhost:{ws_port}/" + (f"?{text}" if text else "")


# ---- the services the pages talk to ----


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
