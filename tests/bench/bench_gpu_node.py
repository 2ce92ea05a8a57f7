"""GPU node speed: a one-process CUDA-graph decode (static KV cache) next to the node's StageWorker, same model.

    python tests/bench/bench_gpu_node.py [--batches 1,2,4,8,16,32,64] [--context 128] [--steps 32]
    python tests/bench/bench_gpu_node.py --worker-only   # only what any StageWorker has: older trees too

GPT-2 124M with random weights (float16 on CUDA, float32 on the CPU). Prints, per batch size:
- reference: the project's own GPT2Stage weights decoding greedily from a static (B, length) KV cache,
  the whole step (embeddings to argmax, next token fed back on the device) replayed as one CUDA graph;
- node: StageWorker.run over SYN1 frames, one stage of all 12 layers, and two stages [0, 6) + [6, 12) in
  this process with the real wire encoding between them (no network): ms per decode step, tokens/s;
- kernels per decode step, eager and through the graph, and the start-up speed benchmark.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.bench.baseline import StaticReference
from services.common.gpt2.model import GPT2Stage
from services.node.benchmark import measure_speed
from services.node.worker import StageWorker
from services.sharder.random_weights import known_shape, random_checkpoint
from services.wire import syn1

TOP_K = 64


def build_stages(split: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> list[GPT2Stage]:
    checkpoint = random_checkpoint(known_shape("gpt2"), "gpt2")  # numpy arrays: wrapped for the stages, no copy
    tensors = {name: torch.from_numpy(array) for name, array in checkpoint.tensors.items()}
    return [GPT2Stage.from_tensors(checkpoint.config, a, b, tensors, dtype=dtype, device=device) for a, b in split]


class NodeRun:
    """Workers of one split, driven step by step the way nodes are: frames in, frames out, wire in between."""

    def __init__(self, stages: list[GPT2Stage], max_batch: int) -> None:
        # Room for the streams measured, no more (older trees size their caches per request instead).
        slots = {"kv_slots": max_batch} if "kv_slots" in inspect.signature(StageWorker).parameters else {}
        self.workers = [
            StageWorker(stage, top_k=TOP_K, activation_dtype="float16", max_batch=max_batch, **slots)
            for stage in stages
        ]
        self.compute_s = 0.0  # time inside the engines (device work and its copies), summed over stages
        self.codec_s = 0.0  # SYN1 encoding of each stage's outputs and decoding them again
        for worker in self.workers:
            engine = getattr(worker, "engine", None)  # older trees have none
            if engine is not None:
                engine.compute = self._timed(engine.compute)

    def _timed(self, compute):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return compute(*args, **kwargs)
            finally:
                self.compute_s += time.perf_counter() - started

        return timed

    def step(self, frames: list[syn1.Frame]) -> list[syn1.Frame]:
        for worker in self.workers:
            outputs = worker.run(frames)
            started = time.perf_counter()
            frames = syn1.decode_frames(worker.encode(outputs))
            self.codec_s += time.perf_counter() - started
        return frames

    def ms_per_step(self, batch: int, context: int, steps: int) -> tuple[float, float, float, float]:
        """(median, p90, mean in the engines, mean in SYN1 encode + decode) ms of one decode step of `batch`
        streams after a `context`-token prefill each."""
        for worker in self.workers:
            worker.release_all()
        rng = np.random.default_rng(batch)
        frames = [syn1.Frame.tokens(r, 0, rng.integers(0, 50257, context)) for r in range(batch)]
        timings = []
        for index in range(steps + 5):
            if index == 5:
                self.compute_s = self.codec_s = 0.0
            started = time.perf_counter()
            outputs = self.step(frames)
            timings.append((time.perf_counter() - started) * 1e3)
            frames = [syn1.Frame.tokens(o.request_id, context + index, o.token_ids[0, :1]) for o in outputs]
        timings = timings[5:]  # prefill and warm-up
        median, p90 = statistics.median(timings), float(np.percentile(timings, 90))
        return median, p90, self.compute_s * 1e3 / steps, self.codec_s * 1e3 / steps


def kernels_per_step(stage: GPT2Stage, batch: int, graphs: str) -> tuple[int, int]:
    """(kernels run on the device, launch calls made by the host) in one decode step of a StageWorker."""
    worker = StageWorker(stage, top_k=TOP_K, activation_dtype="float16", max_batch=64, kv_slots=64, graphs=graphs)
    frames = [syn1.Frame.tokens(r, 0, [1, 2, 3, 4]) for r in range(batch)]
    worker.run(frames)
    decode = [syn1.Frame.tokens(r, 4, [5]) for r in range(batch)]
    worker.run(decode)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        worker.run([syn1.Frame.tokens(r, 4, [5]) for r in range(batch)])
        torch.cuda.synchronize()
    events = trace.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC"))
    return kernels, launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per stream before decoding")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--worker-only", action="store_true", help="only StageWorker figures (any tree)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {name}, torch {torch.__version__}, GPT-2 124M random weights, {dtype}, context {args.context}")
    print(f"start-up benchmark: {measure_speed(device, dtype):,.0f} layer-steps/s")
    whole, halves = build_stages([(0, 12)], device, dtype), build_stages([(0, 6), (6, 12)], device, dtype)
    rows: dict[int, list[str]] = {b: [] for b in batches}
    if cuda and not args.worker_only:
        for batch in batches:
            reference = StaticReference(whole[0], batch, length=args.context + 64)
            reference.capture()
            ms = reference.ms_per_step(args.steps * 4)
            rows[batch].append(f"{ms:7.3f} ms {batch / ms * 1e3:9,.0f} tok/s")
    for stages in (whole, halves):
        node = NodeRun(stages, max_batch=max(batches))
        for batch in batches:
            median, p90, engine, codec = node.ms_per_step(batch, args.context, args.steps)
            rows[batch].append(
                f"{median:6.2f} ms (p90 {p90:6.2f}, engine {engine:5.2f}, syn1 {codec:5.2f}) "
                f"{batch / median * 1e3:7,.0f} tok/s"
            )
    header = (["reference (1 graph)"] if cuda and not args.worker_only else []) + ["node 1 stage", "node 2 stages"]
    print(f"\n{'batch':>5} | " + " | ".join(f"{h:<64}" for h in header))
    for batch in batches:
        print(f"{batch:>5} | " + " | ".join(f"{cell:<64}" for cell in rows[batch]))
    print(
        "(node: median wall ms per decode step in this process; engine: mean ms in StageEngine.compute, device work "
        "and its copies; syn1: mean ms encoding every stage's outputs and decoding them again)"
    )
    if cuda and not args.worker_only:
        print("\nkernels per decode step, one stage of 12 layers (device kernels / host launch calls):")
        for batch in (1, 64):
            eager, graph = kernels_per_step(whole[0], batch, "off"), kernels_per_step(whole[0], batch, "capture")
            print(f"  batch {batch:>2}: eager {eager[0]} / {eager[1]}, CUDA graph {graph[0]} / {graph[1]}")


if __name__ == "__main__":
    main()
