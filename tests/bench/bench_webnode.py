"""Prefill and decode step times of the web node (headless Chromium, WebGPU on the CPU) next to the native node.

    python tests/bench/bench_webnode.py [--parts 1] [--steps 4] [--prefills 1] [--dtype float16] [--baseline DIR]

Full-size GPT-2 124M with random weights (no download), cut into `--parts` even shards. For each shard:
the page loads it through a real gateway (in-process) from the sharder's HTTP server and serves steps
sent over the gateway's Run stream; the native node's StageWorker runs the same frames in this process.
Prints, per shard, ms per prefill of a 4-token and a 10-token prompt and per decode step (batch of one
request, median; each shape run once first, so pipelines are built before the timing), the node-reported
compute time, the page's load time, and both start-up speed benchmarks. With --baseline DIR (the webnode/
folder of another version, e.g. `git archive <commit> webnode | tar -x -C /tmp/old`), a second page runs that
version from its own gateway, and the two pages take turns step by step, so a busy machine slows both alike.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from playwright.async_api import Browser, Page, async_playwright

from services.common.gpt2.model import GPT2Stage
from services.common.model_config_pb import model_config_to_pb
from services.common.pb import common_pb2, gateway_pb2
from services.node.benchmark import measure_speed
from services.node.worker import StageWorker
from services.sharder.http_server import make_app, start_http
from services.sharder.random_weights import known_shape, random_checkpoint
from services.sharder.shards import ShardManifest, even_ranges, read_shard, write_shards
from services.wire import syn1
from services.wire.gateway_client import GatewayClient
from services.wire.steps import Step, StepFailed
from tests.integration.gateway_fixtures import RunningGateway, running_gateway, stage
from tests.webnode.conftest import CHROMIUM, CHROMIUM_ARGS, page_url

# "The quick brown fox jumps over the lazy dog." (10 tokens) and its first 4: the two prefill shapes.
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
PREFILL_LENGTHS = (4, 10)
TOP_K = 64
NATIVE_STEPS = 16


@dataclass
class Timings:
    """ms per step of one node for one shard: prefill by prompt length, decode; round trip and node compute."""

    prefill: dict[int, list[float]] = field(default_factory=dict)
    decode: list[float] = field(default_factory=list)
    prefill_compute: dict[int, list[float]] = field(default_factory=dict)
    decode_compute: list[float] = field(default_factory=list)
    load_s: float = 0.0


class ShardFolder:
    """What the sharder's HTTP app reads of its Catalog, for shards already written to one folder."""

    def __init__(self, folder: Path, manifests: list[ShardManifest]) -> None:
        self.folder = folder
        self.by_id = {manifest.shard_id: manifest for manifest in manifests}

    def manifest(self, shard_id: str) -> ShardManifest:
        return self.by_id[shard_id]

    def shard_path(self, manifest: ShardManifest) -> Path:
        return self.folder / manifest.file


def step_frames(manifest: ShardManifest, request_id: int, position: int, tokens: list[int]) -> bytes:
    """The step message a stage gets: TOKENS on the first stage, else f16 activations (what the router sends)."""
    if manifest.is_first:
        return syn1.encode(syn1.Frame.tokens(request_id, position, tokens))
    hidden = np.random.default_rng(position).standard_normal((len(tokens), manifest.config.n_embd)).astype(np.float32)
    return syn1.encode(syn1.Frame.activation(request_id, position, hidden), syn1.DType.F16)


StepFunction = Callable[[int, int, list[int]], Awaitable[tuple[float, float]]]


async def time_steps(runs: list[StepFunction], steps: int, prefills: int) -> list[Timings]:
    """Each prefill length once untimed, then `prefills` timed each (new request ids), then decode steps;
    every step is run by each of `runs` in turn."""
    timings = [Timings() for _ in runs]

    async def each(request_id: int, position: int, tokens: list[int]) -> list[tuple[float, float]]:
        return [await run(request_id, position, tokens) for run in runs]

    request_id = 1
    for length in PREFILL_LENGTHS:
        await each(request_id, 0, PROMPT[:length])  # warm-up: pipelines of this shape are built here
        request_id += 1
        for _ in range(prefills):
            for timing, (round_trip, compute) in zip(timings, await each(request_id, 0, PROMPT[:length]), strict=True):
                timing.prefill.setdefault(length, []).append(round_trip)
                timing.prefill_compute.setdefault(length, []).append(compute)
            request_id += 1
    decoding = request_id - 1  # the last prefilled request continues
    start = PREFILL_LENGTHS[-1]
    for index in range(steps + 1):
        results = await each(decoding, start + index, [PROMPT[index % len(PROMPT)]])
        if index > 0:  # the first decode step builds the decode pipelines
            for timing, (round_trip, compute) in zip(timings, results, strict=True):
                timing.decode.append(round_trip)
                timing.decode_compute.append(compute)
    return timings


def native_timings(manifest: ShardManifest, folder: Path, steps: int, prefills: int) -> Timings:
    """StageWorker (GPT2Stage, float32, CPU): decode + forward + encode of the same frames."""
    tensors = {name: torch.from_numpy(array) for name, array in read_shard(manifest, folder).items()}
    model = GPT2Stage.from_tensors(manifest.config, manifest.layer_start, manifest.layer_end, tensors)
    worker = StageWorker(model, top_k=TOP_K, activation_dtype="float16", max_batch=64)

    async def run(request_id: int, position: int, tokens: list[int]) -> tuple[float, float]:
        started = time.perf_counter()
        worker.encode(worker.run(syn1.decode_frames(step_frames(manifest, request_id, position, tokens))))
        elapsed = (time.perf_counter() - started) * 1e3
        return elapsed, elapsed

    # cheap here: more steps, a steadier median
    return asyncio.run(time_steps([run], max(steps, NATIVE_STEPS), max(prefills, 4)))[0]


def page_step(client: GatewayClient, node: str, manifest: ShardManifest) -> StepFunction:
    """One step on the page through the gateway: (round trip ms, node-reported compute ms)."""
    route = [stage(node, manifest.layer_start, manifest.layer_end)]

    async def run(request_id: int, position: int, tokens: list[int]) -> tuple[float, float]:
        frames = step_frames(manifest, request_id, position, tokens)
        try:
            response = await client.step(Step(tuple(route), frames=frames), 600)
        except StepFailed as error:
            raise SystemExit(f"step failed on the page: {error}") from None
        return response.hops[0].round_trip_ms, response.hops[0].compute_ms

    return run


async def load_on_page(
    gateway: RunningGateway, page: Page, node: str, manifest: ShardManifest, base_url: str, loads: int
) -> float:
    """Assign `manifest` to the page and wait until it has loaded it; seconds taken."""
    started = time.perf_counter()
    await gateway.stub.AssignShard(
        gateway_pb2.AssignShardRequest(
            config=model_config_to_pb(manifest.config), node_id=node, shard_id=manifest.shard_id,
            layers=common_pb2.LayerRange(start=manifest.layer_start, end=manifest.layer_end),
            shard_url=f"{base_url}/shards/{manifest.file}", manifest_url=f"{base_url}/shards/{manifest.shard_id}.json",
            sha256=manifest.sha256, size_bytes=manifest.byte_size, top_k=TOP_K,
            activation_dtype=common_pb2.DTYPE_FLOAT16,
        ), timeout=30,
    )  # fmt: skip
    await page.wait_for_function(f"window.synapse.loads === {loads} || window.synapse.error", timeout=600_000)
    error = await page.evaluate("window.synapse.error")
    if error:
        raise SystemExit(f"the page failed to load {manifest.shard_id}: {error}")
    return time.perf_counter() - started


@dataclass
class BenchPage:
    """A page serving steps from its own gateway (the version that gateway serves)."""

    name: str
    gateway: RunningGateway
    page: Page
    client: GatewayClient
    state: dict = field(default_factory=dict)


async def open_bench_page(stack: contextlib.AsyncExitStack, browser: Browser, name: str, webnode: Path | None):
    overrides = {"webnode_dir": webnode} if webnode else {}
    gateway = await stack.enter_async_context(
        running_gateway(step_timeout_s=600.0, heartbeat_timeout_s=30.0, **overrides)
    )
    page = await browser.new_page()
    await page.goto(page_url(gateway.ws_port, node_id=name))
    await page.wait_for_function("window.synapse && window.synapse.state === 'joined'", timeout=300_000)
    client = GatewayClient(gateway.address)
    stack.push_async_callback(client.close)
    return BenchPage(name, gateway, page, client, await page.evaluate("JSON.parse(JSON.stringify(window.synapse))"))


async def bench_pages(
    manifests: list[ShardManifest], base_url: str, steps: int, prefills: int, baseline: Path | None
) -> tuple[list[BenchPage], list[list[Timings]]]:
    """Per page (this version, then the baseline's if given), per shard: its timings."""
    results: list[list[Timings]] = []
    async with contextlib.AsyncExitStack() as stack, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        stack.push_async_callback(browser.close)
        pages = [await open_bench_page(stack, browser, "web-bench", None)]
        if baseline:
            pages.append(await open_bench_page(stack, browser, "web-baseline", baseline))
        for index, manifest in enumerate(manifests):
            loads = [await load_on_page(p.gateway, p.page, p.name, manifest, base_url, index + 1) for p in pages]
            runs = [page_step(p.client, p.name, manifest) for p in pages]
            timings = await time_steps(runs, steps, prefills)
            for timing, load_s in zip(timings, loads, strict=True):
                timing.load_s = load_s
            results.append(timings)
    return pages, [list(per_page) for per_page in zip(*results, strict=True)]


def print_table(manifests: list[ShardManifest], rows: list[tuple[str, list[Timings]]]) -> None:
    """rows: (node name, its timings per shard)."""
    median = statistics.median
    columns = [f"prefill {n}" for n in PREFILL_LENGTHS] + ["decode"]
    print(f"{'shard':<36}{'node':<14}" + "".join(f"{c + ' ms':>18}" for c in columns) + f"{'load s':>9}")
    for index, manifest in enumerate(manifests):
        for name, per_shard in rows:
            timings = per_shard[index]
            cells = [median(timings.prefill[n]) for n in PREFILL_LENGTHS] + [median(timings.decode)]
            computes = [median(timings.prefill_compute[n]) for n in PREFILL_LENGTHS] + [median(timings.decode_compute)]
            text = "".join(
                f"{f'{cell:,.0f} ({compute:,.0f})':>18}" for cell, compute in zip(cells, computes, strict=True)
            )
            load = f"{timings.load_s:>9.1f}" if name != "native" else ""
            print(f"{manifest.shard_id:<36}{name:<14}{text}{load}")
    print("(round trip through the gateway, in brackets the node-reported compute; native: in-process, both equal)")


def describe_page(name: str, state: dict) -> str:
    kind = "a CPU adapter: matvec for every row count" if state.get("cpu") else "kernels as for a GPU"
    compute = "shader-f16" if state["f16"] else "f32 compute"
    return f"{name}: {state['device']} ({compute}; {kind}); start-up speed {state['speed']:.1f} layer passes/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=1, help="even shards of the 12 layers (1 = whole model)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed per shard (after one warm-up)")
    parser.add_argument("--prefills", type=int, default=1, help="timed prefills of each length (after a warm-up)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="shard dtype")
    parser.add_argument("--baseline", type=Path, help="webnode/ folder of another version, run turn about")
    args = parser.parse_args()
    config = known_shape("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(config, "gpt2")
        folder = Path(tmp) / "shards"
        manifests = write_shards(checkpoint, even_ranges(config.n_layer, args.parts), folder, dtype=args.dtype)
        del checkpoint
        native_speed = measure_speed(torch.device("cpu"), torch.float32)
        native = [native_timings(manifest, folder, args.steps, args.prefills) for manifest in manifests]

        async def serve_and_bench() -> tuple[list[BenchPage], list[list[Timings]]]:
            runner, port = await start_http(make_app(ShardFolder(folder, manifests)), "127.0.0.1", 0)
            try:
                base_url = f"http://127.0.0.1:{port}"
                return await bench_pages(manifests, base_url, args.steps, args.prefills, args.baseline)
            finally:
                await runner.cleanup()

        pages, timings = asyncio.run(serve_and_bench())

    command = f"--parts {args.parts} --steps {args.steps} --prefills {args.prefills} --dtype {args.dtype}"
    print(
        f"$ python tests/bench/bench_webnode.py {command}" + (f" --baseline {args.baseline}" if args.baseline else "")
    )
    print(
        f"GPT-2 124M (random weights), {args.dtype} shards, one request a step, top-{TOP_K} on the last stage; "
        f"medians of {args.prefills} prefills and {args.steps} decode steps (native: {max(args.prefills, 4)} and "
        f"{max(args.steps, NATIVE_STEPS)}); torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"native start-up speed {native_speed:.1f} GPT-2 layer passes/s")
    names = ["web", "web baseline"]
    for name, page in zip(names, pages, strict=False):
        print(describe_page(name, page.state))
    print_table(manifests, [("native", native), *zip(names, timings, strict=False)])


if __name__ == "__main__":
    main()
