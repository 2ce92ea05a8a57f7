"""Measurements through the whole stack (every service a process): one stream's token time split by where it
goes, many concurrent streams, prefill, speculation; all through the public Generate API."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from services.bench.scrape import Change, Scrape
from services.client import SynapseClient
from services.common.errors import Unavailable
from services.common.pb import router_pb2, router_pb2_grpc
from services.common.server import CHANNEL_OPTIONS
from services.launcher import Stack, redis_server

STREAM_TIMEOUT_S = 600.0  # a stream that takes longer has hung: its run fails, the suite goes on


@contextlib.contextmanager
def running_stack(
    model: str, workdir: Path, name: str, *, nodes: int, env: dict[str, str], node_env: dict[str, str]
) -> Iterator[Stack]:
    """A stack of processes with Redis (where redis-server is installed), logs under <workdir>/<name>/logs.
    Every stack of one bench run shares the shard files and node caches under <workdir>, so the model is cut and
    downloaded once."""
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    for shared in ("shards", "node-cache"):
        (workdir / shared).mkdir(exist_ok=True)
        link = folder / shared
        if not link.exists():
            link.symlink_to(workdir / shared, target_is_directory=True)
    with contextlib.ExitStack() as resources:
        # Redis holds the registry, as in production; without redis-server the registry stays in memory.
        redis_url = resources.enter_context(redis_server(folder)) if shutil.which("redis-server") else None
        stack = Stack(model=model, workdir=folder, nodes=nodes, redis_url=redis_url, env=env, node_env=node_env)
        with stack:
            yield stack


def wait_for_pipeline(stack: Stack, client: SynapseClient, stages: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(len(p.stages) == stages for p in client.topology().pipelines):
            return
        dead = [p for p in stack.processes if p.popen.poll() is not None]
        if dead:
            raise Unavailable(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail(20)}")
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in stack.processes if p.name.startswith(("node", "router")))
    raise Unavailable(f"no pipeline of {stages} stages after {timeout_s:.0f} s; see {stack.workdir / 'logs'}\n{tails}")


def _scrape(stack: Stack) -> tuple[Scrape, Scrape]:
    return Scrape.of(stack.process("router").metrics_url), Scrape.of(stack.process("gateway-0").metrics_url)


def single_stream(stack: Stack, client: SynapseClient, prompt: Sequence[int], tokens: int) -> dict[str, object]:
    """One Generate stream of `tokens` decode tokens after its prefill; where a decode token's time goes.

    The metrics are scraped once the first token (the prefill's) is back and again at the end, so the split
    covers decode steps only. Per token, from the router's and the gateway's own metrics:
    compute (nodes' forward passes), serialize (SYN1 on node and gateway), queue (waiting on a node),
    network (gateway<->node round trip minus all the node reported), router_gateway (router step minus the
    gateway's round trips: the router<->gateway stream and the gateway's forwarding), sample (the router
    turning answers into tokens), other (the rest of the token interval: the router's loop and scheduling).
    """
    started = time.perf_counter()
    arrivals: list[float] = []
    timings: list[router_pb2.TokenTiming] = []
    before = None
    usage = None
    for response in client.generate(prompt, max_tokens=tokens + 1, ignore_eos=True, timeout_s=STREAM_TIMEOUT_S):
        if response.HasField("token_id"):
            arrivals.append(time.perf_counter())
            timings.append(response.timing)
            if before is None:
                before = _scrape(stack)
        if response.HasField("usage"):
            usage = response.usage
    router, gateway = (Change(b, a) for b, a in zip(before, _scrape(stack), strict=True))
    decode = timings[1:]
    decode_count = len(decode)
    token_ms = sum(t.step_ms for t in decode) / decode_count
    overhead_share = sum(max(t.step_ms - t.compute_ms, 0.0) for t in decode) / sum(t.step_ms for t in decode)
    steps = gateway.count("synapse_gateway_steps_total", outcome="ok")
    per_token = _breakdown(router, gateway, token_ms)
    return {
        "tokens": decode_count,
        "decode_tokens_per_s": 1e3 / token_ms,
        "client_decode_tokens_per_s": (decode_count - 1) / (arrivals[-1] - arrivals[1]) if decode_count > 1 else None,
        "time_to_first_token_ms": usage.time_to_first_token_ms if usage else (arrivals[0] - started) * 1e3,
        "overhead_share": overhead_share,
        "token_ms": per_token,
        "hops_per_step": gateway.count("synapse_gateway_hop_round_trip_seconds") / steps if steps else None,
        "hop_ms": _hop_means(gateway),
        "node_compute_ms": {
            node: _ms(gateway.mean("synapse_gateway_node_compute_seconds", node=node))
            for node in gateway.label_values("synapse_gateway_node_compute_seconds", "node")
            if gateway.count("synapse_gateway_node_compute_seconds", node=node) > 0
        },
        "wire_bytes_per_token_per_hop": {
            direction: gateway.mean("synapse_gateway_hop_wire_bytes_per_token", direction=direction)
            for direction in ("to_node", "from_node")
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _breakdown(router: Change, gateway: Change, token_ms: float) -> dict[str, float]:
    """ms of one decode token by part (one step gives one token without speculation): each service's sums over
    the steps it saw between the two scrapes, divided by the number of those steps. The two services are
    scraped one after the other, so their counts may differ by a step; per step, each is self-consistent."""
    gateway_steps = gateway.count("synapse_gateway_steps_total", outcome="ok") or 1
    router_steps = router.count("synapse_router_step_seconds") or 1

    def per_step(name: str, **labels: str) -> float:
        return gateway.total(name, **labels) * 1e3 / gateway_steps

    parts = {
        "compute": per_step("synapse_gateway_hop_compute_seconds"),
        **{
            part: per_step("synapse_gateway_hop_overhead_seconds", part=part)
            for part in ("serialize", "queue", "network")
        },
    }
    step = router.total("synapse_router_step_seconds") * 1e3 / router_steps
    parts["router_gateway"] = step - per_step("synapse_gateway_hop_round_trip_seconds")
    parts["sample"] = router.total("synapse_router_sample_seconds") * 1e3 / router_steps
    parts["other"] = token_ms - step - parts["sample"]
    parts["total"] = token_ms
    return parts


def _hop_means(gateway: Change) -> dict[str, float | None]:
    """Means over every hop (gateway -> node -> gateway) of the decode steps, ms."""
    means = {
        "round_trip": _ms(gateway.mean("synapse_gateway_hop_round_trip_seconds")),
        "compute": _ms(gateway.mean("synapse_gateway_hop_compute_seconds")),
    }
    for part in ("serialize", "queue", "network"):
        means[part] = _ms(gateway.mean("synapse_gateway_hop_overhead_seconds", part=part))
    return means


def concurrent_streams(address: str, prompt: Sequence[int], tokens: int, streams: int) -> dict[str, float]:
    """`streams` Generate calls at once over one channel: aggregate tokens/s from the first call to the last
    token (prefill included), and the mean time to first token."""
    return asyncio.run(_concurrent(address, list(prompt), tokens, streams))


async def _concurrent(address: str, prompt: list[int], tokens: int, streams: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def one() -> tuple[int, float]:
            request = router_pb2.GenerateRequest(max_tokens=tokens, ignore_eos=True)
            request.prompt_token_ids.ids.extend(prompt)
            count, first = 0, 0.0
            async for response in stub.Generate(request, timeout=STREAM_TIMEOUT_S):
                if response.HasField("token_id"):
                    count += 1
                    first = first or time.perf_counter()
            return count, first

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
    total = sum(count for count, _ in results)
    return {
        "streams": streams,
        "tokens": total,
        "seconds": elapsed,
        "tokens_per_s": total / elapsed,
        "per_stream_tokens_per_s": total / elapsed / streams,
        "time_to_first_token_ms": sum(first - started for _, first in results) / streams * 1e3,
    }


def prefill(client: SynapseClient, length: int, vocab_size: int, repeats: int = 3) -> dict[str, float]:
    """Time to first token of a `length`-token prompt (the router's usage figure, median of `repeats`)."""
    timings = []
    for index in range(repeats + 1):  # the first builds this prompt length's buffers
        prompt = [(7919 * (index + 1) + 104729 * position) % vocab_size for position in range(length)]
        last = None
        for response in client.generate(prompt, max_tokens=1, ignore_eos=True, timeout_s=STREAM_TIMEOUT_S):
            last = response
        if index:
            timings.append(last.usage.time_to_first_token_ms)
    timings.sort()
    return {"length": length, "time_to_first_token_ms": timings[len(timings) // 2]}


def speculative_stream(stack: Stack, client: SynapseClient, prompt: Sequence[int], tokens: int) -> dict[str, float]:
    """Decode tokens/s of one stream and the tokens each round trip through the pipeline yielded."""
    before = Scrape.of(stack.process("router").metrics_url)
    step_ms = [
        response.timing.step_ms
        for response in client.generate(prompt, max_tokens=tokens + 1, ignore_eos=True, timeout_s=STREAM_TIMEOUT_S)
        if response.HasField("token_id")
    ][1:]  # the first token is the prefill's
    router = Change(before, Scrape.of(stack.process("router").metrics_url))
    steps = router.count("synapse_router_step_seconds") - 1  # the prefill's
    drafted = router.count("synapse_router_spec_draft_tokens_total")
    return {
        "tokens": len(step_ms),
        # A step that confirms drafts emits several tokens at once: the intervals still add up to the decode time.
        "decode_tokens_per_s": len(step_ms) / (sum(step_ms) / 1e3),
        "round_trips": steps,
        "tokens_per_round_trip": len(step_ms) / steps if steps > 0 else None,
        "draft_tokens": drafted,
        "accepted_draft_tokens": router.count("synapse_router_spec_accepted_tokens_total"),
    }
