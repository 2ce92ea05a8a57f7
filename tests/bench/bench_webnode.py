"""Prefill and decode step times of the web node (headless Chromium, WebGPU on the CPU) next to the native node.

    python tests/bench/bench_webnode.py [--parts 1] [--steps 4] [--prefills 1] [--dtype float16]

Full-size GPT-2 124M with random weights (no download), cut into `--parts` even shards. For each shard:
the page loads it through a real gateway (in-process) from the sharder's HTTP server and serves steps
sent over the gateway's Run stream; the native node's StageWorker runs the same frames in this process.
Prints, per shard, ms per prefill of a 4-token and a 10-token prompt and per decode step (batch of one
request, median; each shape run once first, so pipelines are built before the timing), the node-reported
compute time, the page's load time, and both start-up speed benchmarks. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
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

from playwright.async_api import Page, async_playwright

from services.common.gpt2.model import GPT2Stage
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


async def time_steps(run: StepFunction, steps: int, prefills: int) -> Timings:
    """Each prefill length once untimed, then `prefills` timed each (new request ids), then decode steps."""
    timings = Timings()
    request_id = 1
    for length in PREFILL_LENGTHS:
        await run(request_id, 0, PROMPT[:length])  # warm-up: pipelines of this shape are built here
        request_id += 1
        for _ in range(prefills):
            round_trip, compute = await run(request_id, 0, PROMPT[:length])
            timings.prefill.setdefault(length, []).append(round_trip)
            timings.prefill_compute.setdefault(length, []).append(compute)
            request_id += 1
    decoding = request_id - 1  # the last prefilled request continues
    start = PREFILL_LENGTHS[-1]
    for index in range(steps + 1):
        round_trip, compute = await run(decoding, start + index, [PROMPT[index % len(PROMPT)]])
        if index > 0:  # the first decode step builds the decode pipelines
            timings.decode.append(round_trip)
            timings.decode_compute.append(compute)
    return timings


def native_timings(manifest: ShardManifest, folder: Path, steps: int, prefills: int) -> Timings:
    """StageWorker (GPT2Stage, float32, CPU): decode + forward + encode of the same frames."""
    tensors = read_shard(manifest, folder)
    model = GPT2Stage.from_tensors(manifest.config, manifest.layer_start, manifest.layer_end, tensors)
    worker = StageWorker(model, top_k=TOP_K, activation_dtype="float16", max_batch=64)

    async def run(request_id: int, position: int, tokens: list[int]) -> tuple[float, float]:
        started = time.perf_counter()
        worker.encode(worker.run(syn1.decode_frames(step_frames(manifest, request_id, position, tokens))))
        elapsed = (time.perf_counter() - started) * 1e3
        return elapsed, elapsed

    # cheap here: more steps, a steadier median
    return asyncio.run(time_steps(run, max(steps, NATIVE_STEPS), max(prefills, 4)))


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
    gateway: RunningGateway, page: Page, manifest: ShardManifest, base_url: str, loads: int
) -> float:
    """Assign `manifest` to the page and wait until it has loaded it; seconds taken."""
    started = time.perf_counter()
    await gateway.stub.AssignShard(
        gateway_pb2.AssignShardRequest(
            node_id="web-bench", shard_id=manifest.shard_id,
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


async def bench_page(manifests: list[ShardManifest], base_url: str, steps: int, prefills: int) -> tuple[dict, list]:
    results = []
    async with running_gateway(step_timeout_s=600.0, heartbeat_timeout_s=30.0) as gateway, async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        await page.goto(page_url(gateway.ws_port, node_id="web-bench"))
        await page.wait_for_function("window.synapse && window.synapse.state === 'joined'", timeout=300_000)
        state = await page.evaluate("JSON.parse(JSON.stringify(window.synapse))")
        client = GatewayClient(gateway.address)
        try:
            for index, manifest in enumerate(manifests):
                load_s = await load_on_page(gateway, page, manifest, base_url, index + 1)
                timings = await time_steps(page_step(client, "web-bench", manifest), steps, prefills)
                timings.load_s = load_s
                results.append(timings)
        finally:
            await client.close()
            await browser.close()
    return state, results


def print_table(manifests: list[ShardManifest], native: list[Timings], page: list[Timings]) -> None:
    median = statistics.median
    columns = [f"prefill {n}" for n in PREFILL_LENGTHS] + ["decode"]
    print(f"{'shard':<36}{'node':<8}" + "".join(f"{c + ' ms':>16}" for c in columns) + f"{'load s':>9}")
    for manifest, native_result, page_result in zip(manifests, native, page, strict=True):
        for name, timings in (("native", native_result), ("web", page_result)):
            cells = [median(timings.prefill[n]) for n in PREFILL_LENGTHS] + [median(timings.decode)]
            computes = [median(timings.prefill_compute[n]) for n in PREFILL_LENGTHS] + [median(timings.decode_compute)]
            text = "".join(
                f"{f'{cell:,.0f} ({compute:,.0f})':>16}" for cell, compute in zip(cells, computes, strict=True)
            )
            load = f"{timings.load_s:>9.1f}" if name == "web" else ""
            print(f"{manifest.shard_id:<36}{name:<8}{text}{load}")
    print("(round trip through the gateway, in brackets the node-reported compute; native: in-process, both equal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=1, help="even shards of the 12 layers (1 = whole model)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed per shard (after one warm-up)")
    parser.add_argument("--prefills", type=int, default=1, help="timed prefills of each length (after a warm-up)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="shard dtype")
    args = parser.parse_args()
    config = known_shape("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(config, "gpt2")
        folder = Path(tmp) / "shards"
        manifests = write_shards(checkpoint, even_ranges(config.n_layer, args.parts), folder, dtype=args.dtype)
        del checkpoint
        native_speed = measure_speed(torch.device("cpu"), torch.float32)
        native = [native_timings(manifest, folder, args.steps, args.prefills) for manifest in manifests]

        async def serve_and_bench() -> tuple[dict, list[Timings]]:
            runner, port = await start_http(make_app(ShardFolder(folder, manifests)), "127.0.0.1", 0)
            try:
                return await bench_page(manifests, f"http://127.0.0.1:{port}", args.steps, args.prefills)
            finally:
                await runner.cleanup()

        page_state, page = asyncio.run(serve_and_bench())

    command = f"--parts {args.parts} --steps {args.steps} --prefills {args.prefills} --dtype {args.dtype}"
    print(f"$ python tests/bench/bench_webnode.py {command}")
    print(
        f"GPT-2 124M (random weights), {args.dtype} shards, one request a step, top-{TOP_K} on the last stage; "
        f"medians of {args.prefills} prefills and {args.steps} decode steps (native: {max(args.prefills, 4)} and "
        f"{max(args.steps, NATIVE_STEPS)}); torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs"
    )
    kind = "a CPU adapter: matvec for every row count" if page_state["cpu"] else "a GPU adapter"
    compute = "shader-f16" if page_state["f16"] else "f32 compute"
    print(f"web node adapter: {page_state['device']} ({compute}; {kind})")
    print(f"start-up speed (GPT-2 layer passes/s): native {native_speed:.1f}, web {page_state['speed']:.1f}")
    print_table(manifests, native, page)


if __name__ == "__main__":
    main()
