"""What the soak measures around the traffic: pipelines, KV caches on the nodes, requests left, RSS; the report."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import urllib.request
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import Process, Stack
from tests.checkpoints import load_reference
from tests.soak.streams import Tally

SETTLE_S = 60.0  # after the last stream: how long releases may take to reach every node
KV_GAUGES = ("synapse_node_kv_cached_requests", "synapse_node_kv_slots_in_use")


def transformers_model(checkpoint: Path):
    return load_reference(checkpoint)


async def wait_for_pipeline(stub: router_pb2_grpc.RouterServiceStub, stages: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with_stages = await topology_stages(stub)
        if stages in with_stages:
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"no pipeline of {stages} nodes after {timeout_s:.0f} s")


async def topology_stages(stub: router_pb2_grpc.RouterServiceStub) -> list[int]:
    topology = await stub.Topology(router_pb2.TopologyRequest(), timeout=5)
    return [len(pipeline.stages) for pipeline in topology.pipelines]


def scrape(process: Process) -> dict[str, float]:
    """Every sample of a process's /metrics, summed over labels."""
    with urllib.request.urlopen(process.metrics_url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


def live(stack: Stack) -> list[Process]:
    """The current process of every name (a restarted node's newest), running."""
    newest = {process.name: process for process in stack.processes}
    return [process for process in newest.values() if process.popen.poll() is None]


def left_behind(stack: Stack, router_topology: router_pb2.TopologyResponse | None = None) -> dict[str, float]:
    """KV caches on each node, Generate calls the router still counts as active."""
    left: dict[str, float] = {}
    for process in live(stack):
        if process.name.startswith("node"):
            samples = scrape(process)
            for gauge in KV_GAUGES:
                left[f"{process.name}:{gauge.removeprefix('synapse_node_')}"] = samples.get(gauge, float("nan"))
        elif process.name == "router":
            left["router:active_requests"] = scrape(process).get("synapse_router_active_requests", float("nan"))
    if router_topology is not None:
        left["router:pipeline_requests"] = sum(p.active_requests for p in router_topology.pipelines)
    return left


async def settle(stack: Stack, nodes: int) -> dict[str, float]:
    """Wait (at most SETTLE_S) until nothing is left anywhere; what is left then."""
    async with grpc.aio.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        deadline = time.monotonic() + SETTLE_S
        while True:
            topology = await stub.Topology(router_pb2.TopologyRequest(), timeout=5)
            left = left_behind(stack, topology)
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)


async def restore(stack: Stack, stub: router_pb2_grpc.RouterServiceStub, nodes: int) -> None:
    """Every node running again (one killed at the end is started), and the full pipeline back."""
    running = {process.name for process in live(stack)}
    for index in range(nodes):
        if f"node-{index}" not in running:
            stack.add_node(f"node-{index}")
    await wait_for_pipeline(stub, nodes)


def rss(stack: Stack) -> dict[str, int]:
    """Resident memory of router, gateways and nodes, bytes (VmRSS)."""
    sizes = {}
    for process in live(stack):
        if process.name == "router" or process.name.startswith(("gateway", "node")):
            try:
                status = Path(f"/proc/{process.popen.pid}/status").read_text()
            except FileNotFoundError:  # killed a moment ago
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    sizes[process.name] = int(line.split()[1]) * 1024
    return sizes


class RssTimeline:
    """RSS of router, gateways and nodes every period_s while the soak runs, MiB, for the report."""

    def __init__(self, stack: Stack, started: float, period_s: float = 10.0) -> None:
        self.stack, self.started, self.period_s = stack, started, period_s
        self.samples: list[dict[str, float]] = []

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            sizes = {name: round(size / 2**20, 1) for name, size in rss(self.stack).items()}
            self.samples.append({"t_s": round(time.monotonic() - self.started, 1), **sizes})
            await asyncio.sleep(min(self.period_s, max(until - time.monotonic(), 0.0)))


def describe_run(args: argparse.Namespace) -> dict:
    return {
        "minutes": args.minutes,
        "streams": args.streams,
        "nodes": args.nodes,
        "kill_every_s": args.kill_every_s,
        "down_s": args.down_s,
        "templates": args.templates,
        "warmup_s": args.warmup_s,
        "seed": args.seed,
        "machine": f"{os.cpu_count()} cores {platform.machine()}, {platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def summary(
    tally: Tally,
    warm: Tally,
    kills: list[dict],
    mismatches: list[str],
    left: dict[str, float],
    baseline: dict[str, int],
    after: dict[str, int],
    elapsed_s: float,
    args: argparse.Namespace,
) -> dict:
    restarted = {kill["node"] for kill in kills}  # a new process: its baseline was another's, so shown only
    memory = {
        name: {
            "baseline_mib": round(baseline[name] / 2**20, 1),
            "after_mib": round(after[name] / 2**20, 1),
            "ratio": round(after[name] / baseline[name], 3),
            "restarted": name in restarted,
        }
        for name in sorted(baseline)
        if name in after
    }
    invariants = {
        "references equal transformers (greedy)": not mismatches and not warm.unexpected,
        "warm-up streams exact": warm.lost + warm.duplicated + warm.reordered == 0,
        "every stream ended as its mode allows": not tally.unexpected and tally.started == tally.finished,
        "0 tokens lost": tally.lost == 0,
        "0 tokens duplicated": tally.duplicated == 0,
        "0 tokens reordered or wrong": tally.reordered == 0,
        "0 KV caches left, 0 requests left": not any(left.values()),
        f"RSS within {args.rss_tolerance:.0%} of baseline": all(
            entry["ratio"] <= 1 + args.rss_tolerance for entry in memory.values() if not entry["restarted"]
        ),
        "streams ran, nodes were killed": tally.started > 0 and (bool(kills) or args.minutes * 60 < args.kill_every_s),
    }
    return {
        "elapsed_s": round(elapsed_s, 1),
        "streams": {
            "started": tally.started,
            "finished": tally.finished,
            "by_mode": dict(tally.by_mode),
            "finish_reasons": dict(tally.finish_reasons),
            "status_codes": dict(tally.status_codes),
            "unexpected": tally.unexpected[:20],
            "failovers": tally.failovers,
        },
        "tokens": {
            "received": tally.tokens,
            "per_second": round(tally.tokens / max(elapsed_s, 1e-9), 1),
            "lost": tally.lost,
            "duplicated": tally.duplicated,
            "reordered": tally.reordered,
            "examples": tally.examples,
        },
        "warm_up": {"streams": warm.finished, "tokens": warm.tokens, "reference_mismatches": mismatches},
        "kills": kills,
        "left_after_streams": left,
        "rss": memory,
        "invariants": invariants,
        "ok": all(invariants.values()),
    }


def render(report: dict) -> str:
    streams, tokens = report["streams"], report["tokens"]
    lines = [
        f"soak: {report['run']['streams']} streams x {report['elapsed_s']} s on {report['run']['machine']}, "
        f"{report['run']['nodes']} nodes, {len(report['kills'])} SIGKILLs",
        f"streams: {streams['started']} started, {streams['finished']} finished; modes {streams['by_mode']}; "
        f"finish {streams['finish_reasons']}; status {streams['status_codes']}; failovers {streams['failovers']}",
        f"tokens: {tokens['received']} ({tokens['per_second']}/s); lost {tokens['lost']}, duplicated "
        f"{tokens['duplicated']}, reordered {tokens['reordered']}",
        f"left after the streams: {report['left_after_streams']}",
        "rss MiB (* restarted, not checked): "
        + ", ".join(
            f"{n}{'*' if e['restarted'] else ''} {e['baseline_mib']}->{e['after_mib']}"
            for n, e in report["rss"].items()
        ),
    ]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in report["invariants"].items()]
    lines += [f"  {example}" for example in tokens["examples"][:5] + streams["unexpected"][:5]]
    return "\n".join(lines)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
