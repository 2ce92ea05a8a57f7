"""Decode step time of the web node (headless Chromium, WebGPU on the CPU) next to the native node.

    python tests/bench/bench_webnode.py [--parts 1] [--steps 4] [--dtype float16]

Full-size GPT-2 124M with random weights (no download), cut into `--parts` even shards. For each shard:
the page loads it through a real gateway (in-process) from the sharder's HTTP server and serves steps
sent over the gateway's Run stream; the native node's StageWorker runs the same frames in this process.
Prints, per shard, ms per decode step (batch of one request, median) side by side, the node-reported
compute time, the page's load time, and both start-up speed benchmarks. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from playwright.async_api import async_playwright

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
from tests.integration.gateway_fixtures import running_gateway, stage
from tests.webnode.conftest import CHROMIUM, CHROMIUM_ARGS, page_url

PROMPT = [464, 2068, 7586, 21831]  # 4 tokens: "The quick brown fox"
TOP_K = 64
REQUEST_ID = 1
NATIVE_STEPS = 16


class ShardFolder:
    """What the sharder's HTTP app reads of its Catalog, for shards already written to one folder."""

    def __init__(self, folder: Path, manifests: list[ShardManifest]) -> None:
        self.folder = folder
        self.by_id = {manifest.shard_id: manifest for manifest in manifests}

    def manifest(self, shard_id: str) -> ShardManifest:
        return self.by_id[shard_id]

    def shard_path(self, manifest: ShardManifest) -> Path:
        return self.folder / manifest.file


def step_frames(manifest: ShardManifest, position: int, tokens: list[int]) -> bytes:
    """The step message a stage gets: TOKENS on the first stage, else f16 activations (what the router sends)."""
    if manifest.is_first:
        return syn1.encode(syn1.Frame.tokens(REQUEST_ID, position, tokens))
    hidden = np.random.default_rng(position).standard_normal((len(tokens), manifest.config.n_embd)).astype(np.float32)
    return syn1.encode(syn1.Frame.activation(REQUEST_ID, position, hidden), syn1.DType.F16)


def native_step_ms(manifest: ShardManifest, folder: Path, steps: int) -> list[float]:
    """ms per decode step of StageWorker (GPT2Stage, float32, CPU): decode + forward + encode."""
    tensors = read_shard(manifest, folder)
    model = GPT2Stage.from_tensors(manifest.config, manifest.layer_start, manifest.layer_end, tensors)
    worker = StageWorker(model, top_k=TOP_K, activation_dtype="float16", max_batch=64)

    def run(position: int, tokens: list[int]) -> float:
        started = time.perf_counter()
        worker.encode(worker.run(syn1.decode_frames(step_frames(manifest, position, tokens))))
        return (time.perf_counter() - started) * 1e3

    run(0, PROMPT)
    steps = max(steps, NATIVE_STEPS)  # cheap here: more steps, a steadier median
    return [run(len(PROMPT) + index, [PROMPT[index % 4]]) for index in range(steps + 1)][1:]  # first = warm-up


async def page_step_ms(client: GatewayClient, node: str, manifest: ShardManifest, steps: int):
    """(round trip ms, node compute ms) per decode step of the page, through the gateway."""
    route = [stage(node, manifest.layer_start, manifest.layer_end)]

    async def run(position: int, tokens: list[int]) -> tuple[float, float]:
        try:
            response = await client.step(Step(tuple(route), frames=step_frames(manifest, position, tokens)), 600)
        except StepFailed as error:
            raise SystemExit(f"step failed on the page: {error}") from None
        return response.hops[0].round_trip_ms, response.hops[0].compute_ms

    await run(0, PROMPT)
    timings = [await run(len(PROMPT) + index, [PROMPT[index % 4]]) for index in range(steps + 1)][1:]
    return [t[0] for t in timings], [t[1] for t in timings]


async def bench_page(manifests: list[ShardManifest], base_url: str, steps: int) -> tuple[dict, list]:
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
                started = time.perf_counter()
                await gateway.stub.AssignShard(
                    gateway_pb2.AssignShardRequest(
                        config=model_config_to_pb(manifest.config), node_id="web-bench", shard_id=manifest.shard_id,
                        layers=common_pb2.LayerRange(start=manifest.layer_start, end=manifest.layer_end),
                        shard_url=f"{base_url}/shards/{manifest.file}",
                        manifest_url=f"{base_url}/shards/{manifest.shard_id}.json",
                        sha256=manifest.sha256, size_bytes=manifest.byte_size, top_k=TOP_K,
                        activation_dtype=common_pb2.DTYPE_FLOAT16,
                    ), timeout=30,
                )  # fmt: skip
                await page.wait_for_function(
                    f"window.synapse.loads === {index + 1} || window.synapse.error", timeout=600_000
                )
                loaded = await page.evaluate("window.synapse.error")
                if loaded:
                    raise SystemExit(f"the page failed to load {manifest.shard_id}: {loaded}")
                load_s = time.perf_counter() - started
                round_trips, computes = await page_step_ms(client, "web-bench", manifest, steps)
                results.append((load_s, round_trips, computes))
        finally:
            await client.close()
            await browser.close()
    return state, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=1, help="even shards of the 12 layers (1 = whole model)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed per shard (after one warm-up)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="shard dtype")
    args = parser.parse_args()
    config = known_shape("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(config, "gpt2")
        folder = Path(tmp) / "shards"
        manifests = write_shards(checkpoint, even_ranges(config.n_layer, args.parts), folder, dtype=args.dtype)
        del checkpoint
        native_speed = measure_speed(torch.device("cpu"), torch.float32)
        native = [native_step_ms(manifest, folder, args.steps) for manifest in manifests]

        async def serve_and_bench() -> tuple[dict, list]:
            runner, port = await start_http(make_app(ShardFolder(folder, manifests)), "127.0.0.1", 0)
            try:
                return await bench_page(manifests, f"http://127.0.0.1:{port}", args.steps)
            finally:
                await runner.cleanup()

        page_state, page = asyncio.run(serve_and_bench())

    print(f"$ python tests/bench/bench_webnode.py --parts {args.parts} --steps {args.steps} --dtype {args.dtype}")
    print(
        f"GPT-2 124M (random weights), {args.dtype} shards, decode steps of one request, top-{TOP_K} on the last "
        f"stage; median of {args.steps} steps (native: {max(args.steps, NATIVE_STEPS)}); "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"web node adapter: {page_state['device']} ({'shader-f16' if page_state['f16'] else 'f32 compute'})")
    print(f"start-up speed (GPT-2 layer passes/s): native {native_speed:.1f}, web {page_state['speed']:.1f}")
    print(f"{'shard':<34}{'native ms/step':>16}{'web ms/step':>14}{'web compute':>13}{'web load s':>12}")
    for manifest, native_ms, (load_s, round_trips, computes) in zip(manifests, native, page, strict=True):
        print(
            f"{manifest.shard_id:<34}{statistics.median(native_ms):>16.1f}{statistics.median(round_trips):>14.1f}"
            f"{statistics.median(computes):>13.1f}{load_s:>12.1f}"
        )


if __name__ == "__main__":
    main()
