"""Decode speed through the whole stack vs a single-process transformers run, measured side by side.

    python tests/bench/bench_stack.py [--tokens 64] [--nodes 2] [--streams 8]

Full-size GPT-2 124M with random weights (no download). Prints single-stream decode tokens/s of
(a) transformers in one process with its KV cache and (b) Generate through tokenizer, router,
gateway and native nodes as separate processes; the network + orchestration share of token time;
and the aggregate tokens/s of N concurrent streams. `synapse bench` (services/bench/) measures all this
and more in one run; this script is its older, shorter form on the same code.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.bench.baseline import TransformersBaseline
from services.bench.checkpoint import random_gpt2
from services.bench.stack import single_stream
from services.bench.suite import PROMPT
from services.client import SynapseClient
from services.launcher import Stack


def stack_stream(client: SynapseClient, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, overhead share) of one Generate stream; the first (prefill) token is excluded."""
    responses = list(client.generate(PROMPT, max_tokens=tokens + 1, ignore_eos=True))
    decode = [r.timing for r in responses[1:] if r.HasField("token_id")]
    step_ms = sum(t.step_ms for t in decode)
    overhead_ms = sum(max(t.step_ms - t.compute_ms, 0.0) for t in decode)
    return len(decode) / (step_ms / 1e3), overhead_ms / step_ms


def overhead_breakdown(stack: Stack, client: SynapseClient, tokens: int) -> list[str]:
    """Mean ms per decode token by part and per hop, from the router's and the gateway's own metrics."""
    run = single_stream(stack, client, PROMPT, tokens)
    lines = [f"  per token, {part}: {ms:.2f} ms" for part, ms in run["token_ms"].items()]
    lines += [f"  per hop, {part}: {ms:.2f} ms" for part, ms in run["hop_ms"].items() if ms is not None]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the node processes (e.g. OMP_WAIT_POLICY=PASSIVE)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_gpt2(Path(tmp) / "gpt2-random")
        baseline = TransformersBaseline(str(folder), torch.device("cpu"), torch.float32)
        reference = baseline.decode_rate(PROMPT, args.tokens, args.repeats)
        del baseline
        node_env = dict(item.split("=", 1) for item in args.node_env)
        stack = Stack(model=str(folder), workdir=Path(tmp) / "stack", nodes=args.nodes, node_env=node_env)
        with stack, SynapseClient(stack.router_address) as client:
            deadline = time.monotonic() + 300
            while not any(len(p.stages) == args.nodes for p in client.topology().pipelines):
                if time.monotonic() > deadline:
                    raise SystemExit("no pipeline; see " + str(stack.workdir / "logs"))
                time.sleep(0.5)
            stack_stream(client, 8)  # warm-up
            runs = [stack_stream(client, args.tokens) for _ in range(args.repeats)]
            breakdown = overhead_breakdown(stack, client, args.tokens)
            rate = statistics.median(r[0] for r in runs)
            overhead = statistics.median(r[1] for r in runs)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
                counts = list(
                    pool.map(
                        lambda _: sum(
                            1
                            for r in client.generate(PROMPT, max_tokens=args.tokens, ignore_eos=True)
                            if r.HasField("token_id")
                        ),
                        range(args.streams),
                    )
                )
            aggregate = sum(counts) / (time.perf_counter() - started)
            single_started = time.perf_counter()
            single = sum(
                1 for r in client.generate(PROMPT, max_tokens=args.tokens, ignore_eos=True) if r.HasField("token_id")
            ) / (time.perf_counter() - single_started)
    print(
        f"GPT-2 124M (random weights), {args.tokens} decode tokens, {args.nodes} native nodes, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeats}"
    )
    print(f"{'single-process transformers decode':<45} {reference:8.1f} tokens/s")
    print(f"{'whole stack, 1 stream, decode':<45} {rate:8.1f} tokens/s  ({rate / reference:.2f}x)")
    print(f"{'network + orchestration share of token time':<45} {overhead * 100:8.1f} %")
    print(f"{'whole stack, 1 stream, end to end':<45} {single:8.1f} tokens/s")
    print(
        f"{f'whole stack, {args.streams} streams, aggregate':<45} {aggregate:8.1f} tokens/s  "
        f"({aggregate / single:.2f}x one stream)"
    )
    print("where a single-stream decode step goes (means; a step crosses every hop once):")
    print("\n".join(breakdown))


if __name__ == "__main__":
    main()
