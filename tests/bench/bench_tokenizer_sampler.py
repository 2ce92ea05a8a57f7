"""Per-call latency of the tokenizer and sampler over loopback gRPC, next to the same work in-process.

    python tests/bench/bench_tokenizer_sampler.py [--calls 2000] [--warmup 200]

Both servers run in this process on 127.0.0.1 (port 0), each behind one long-lived channel, so
client and server share one event loop, as a router with in-process servers would. Three columns
per case, p50 / p99 in ms: the unary gRPC call; the servicer's method without the transport
(protobuf -> domain -> protobuf); and the bare domain call the router would make in-process.
Not a test: pytest collects test_*.py only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np

from services.common.pb import sampler_pb2, sampler_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import channel
from services.sampler.__main__ import start_sampler
from services.sampler.convert import full_logits_to_pb, params_to_pb
from services.sampler.sampling import Candidates, SamplingParams
from services.sampler.seeding import sample_step
from services.sampler.servicer import SamplerServicer
from services.sampler.settings import SamplerSettings
from services.tokenizer.__main__ import load_tokenizer, start_tokenizer
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.settings import TokenizerSettings

PROMPT = "The quick brown fox jumps over the lazy dog while the distributed model streams its tokens back to you."
VOCAB = 50257
K = 64
DEADLINE_S = 10.0
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9375, seed=1234)
GREEDY = SamplingParams(temperature=0.0)


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    """(p50, p99) in ms."""
    cuts = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return cuts[49] / 1e6, cuts[98] / 1e6


async def time_async(call: Callable[[], Awaitable[object]], calls: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - started)
    return percentiles(samples)


def time_sync(call: Callable[[], object], calls: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    return percentiles(samples)


def sample_cases(
    row: np.ndarray,
) -> dict[str, tuple[sampler_pb2.SampleRequest, Candidates | np.ndarray, SamplingParams]]:
    """name -> (request, in-process logits, params); row: (VOCAB,) float32."""
    ids = np.argsort(-row, kind="stable")[:K]
    candidates = Candidates(values=row[ids], token_ids=ids)
    cut = sampler_pb2.Candidates(values=row[ids].tolist(), token_ids=ids.tolist())
    cases = {}
    for name, params in (("sampled", SAMPLED), ("greedy", GREEDY)):
        cases[f"Sample {K} candidates, {name}"] = (
            sampler_pb2.SampleRequest(candidates=cut, params=params_to_pb(params), step=5),
            candidates,
            params,
        )
        cases[f"Sample full {VOCAB} logits, {name}"] = (
            sampler_pb2.SampleRequest(full=full_logits_to_pb(row), params=params_to_pb(params), step=5),
            row,
            params,
        )
    return cases


async def run(calls: int, warmup: int) -> list[tuple[str, tuple[float, float], ...]]:
    tokenizer_settings = TokenizerSettings(host="127.0.0.1", port=0, metrics_port=None)
    sampler_settings = SamplerSettings(host="127.0.0.1", port=0, metrics_port=None)
    tokenizer = load_tokenizer(tokenizer_settings)
    tokenizer_server = await start_tokenizer(tokenizer_settings, tokenizer)
    sampler_server = await start_sampler(sampler_settings)
    # The servicers the servers run, called directly: the cost of everything but the transport.
    tokenizer_servicer = TokenizerServicer(tokenizer, tokenizer_settings.max_batch)
    sampler_servicer = SamplerServicer(sampler_settings.max_batch, sampler_settings.max_vocab)
    rows = []
    try:
        async with (
            channel(tokenizer_server.address) as tokenizer_channel,
            channel(sampler_server.address) as sampler_channel,
        ):
            tokenizer_stub = tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer_channel)
            sampler_stub = sampler_pb2_grpc.SamplerServiceStub(sampler_channel)
            encode = tokenizer_pb2.EncodeRequest(text=PROMPT)
            rows.append((
                f"Encode ({len(tokenizer.encode(PROMPT))} tokens)",
                await time_async(lambda: tokenizer_stub.Encode(encode, timeout=DEADLINE_S), calls, warmup),
                await time_async(lambda: tokenizer_servicer.Encode(encode, None), calls, warmup),
                time_sync(lambda: tokenizer.encode(PROMPT), calls, warmup),
            ))  # fmt: skip
            repeat = (calls, warmup)
            row = np.random.default_rng(0).normal(0, 3, size=VOCAB).astype(np.float32)
            for name, (request, logits, params) in sample_cases(row).items():
                rows.append((
                    name,
                    await time_async(lambda r=request: sampler_stub.Sample(r, timeout=DEADLINE_S), *repeat),
                    await time_async(lambda r=request: sampler_servicer.Sample(r, None), *repeat),
                    time_sync(lambda x=logits, p=params: sample_step(x, p, 5), *repeat),
                ))  # fmt: skip
    finally:
        await tokenizer_server.stop()
        await sampler_server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case, after the warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per case first")
    arguments = parser.parse_args()
    rows = asyncio.run(run(arguments.calls, arguments.warmup))
    print(f"{arguments.calls} calls per case after {arguments.warmup} warm-up; p50 / p99 in ms")
    header = f"{'case':<38} {'gRPC loopback':>17} {'servicer, no wire':>19} {'in-process domain':>19}"
    print(header)
    print("-" * len(header))
    for name, *columns in rows:
        cells = [f"{p50:7.3f} / {p99:7.3f}" for p50, p99 in columns]
        print(f"{name:<38} {cells[0]:>17} {cells[1]:>19} {cells[2]:>19}")


if __name__ == "__main__":
    main()
