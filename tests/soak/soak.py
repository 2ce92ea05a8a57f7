"""The soak: the process stack under N concurrent Generate streams for minutes, nodes SIGKILLed and restarted
meanwhile; it counts what the streams got and checks the invariants (docs/reliability.md, "Load").

    python3 -m tests.soak.soak --minutes 3 --streams 64 --out soak.json

Loopback only, bounded in time (the streams stop at --minutes; the wind-down after is bounded too). Exits 1
when an invariant fails: every stream ends the way its mode allows (no UNAVAILABLE, no hang), 0 tokens lost,
duplicated or reordered, 0 KV caches left on the nodes, router and gateway with no request left, and the
RSS of router, gateway and every node never restarted within --rss-tolerance of the baseline measured after
the warm-up (a restarted node is another process: its RSS is reported, not compared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from services.common.pb import router_pb2_grpc
from services.launcher import Stack
from tests.checkpoints import greedy_reference, make_random_checkpoint
from tests.soak import probes
from tests.soak.streams import MODES, Tally, Template, make_templates, run_stream

# GPT-2's real vocabulary on a small body (as tests/e2e): six layers, so three nodes each hold two.
SHAPE = dict(n_layer=6, n_head=4, n_embd=64, vocab_size=50257, n_positions=256)
MODE_WEIGHTS = (0.6, 0.2, 0.2)  # complete, cancel, deadline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m tests.soak.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long streams are started (default 3)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent Generate streams (default 64)")
    parser.add_argument("--nodes", type=int, default=3, help="native nodes, at least 2 (default 3)")
    parser.add_argument("--kill-every-s", type=float, default=20.0, help="mean seconds between node kills")
    parser.add_argument("--down-s", type=float, default=5.0, help="seconds a killed node stays down")
    parser.add_argument("--templates", type=int, default=24, help="distinct requests with known answers")
    parser.add_argument(
        "--warmup-s", type=float, default=30.0, help="full load, one node restarted, before the baseline"
    )
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth over baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("soak.json"), help="the report, as JSON")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoint, logs (default a temp folder)")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2: one is killed at a time, and another must take over")
    return args


def stack_for(args: argparse.Namespace, workdir: Path) -> Stack:
    checkpoint = make_random_checkpoint(workdir / "tiny-gpt2", seed=args.seed, **SHAPE)
    env = {
        "SYNAPSE_SHARDER_DTYPE": "float32",  # exact numerics: greedy streams equal transformers'
        "SYNAPSE_ROUTER_ACTIVATION_DTYPE": "float32",
        # The soak is one client: a cancelled stream's slot is freed when the server sees the cancel, a
        # moment after the client's next stream may start; room for that, not a second client.
        "SYNAPSE_ROUTER_MAX_STREAMS_PER_CLIENT": str(2 * args.streams),
    }
    # One torch thread per node (more nodes than cores here); a fixed speed skips the start-up benchmark.
    node_env = {"SYNAPSE_NODE_THREADS": "1", "SYNAPSE_NODE_SPEED": "100"}
    return Stack(model=str(checkpoint), workdir=workdir / "stack", nodes=args.nodes, env=env, node_env=node_env)


async def references(
    stub: router_pb2_grpc.RouterServiceStub, templates: list[Template], checkpoint: Path
) -> tuple[list[list[int]], list[str]]:
    """Each template run once, alone, undisturbed; greedy ones checked against transformers too."""
    answers, mismatches = [], []
    model = probes.transformers_model(checkpoint)
    for template in templates:
        responses = [response async for response in stub.Generate(template.request, timeout=120)]
        tokens = [response.token_id for response in responses if response.HasField("token_id")]
        answers.append(tokens)
        if template.greedy:
            expected = greedy_reference(model, list(template.request.prompt_token_ids.ids), len(tokens))
            if tokens != expected:
                mismatches.append(f"{template.name}: stack {tokens[:12]}…, transformers {expected[:12]}…")
    return answers, mismatches


class Chaos:
    """SIGKILLs a random node (never node-0, the one whose memory is watched throughout) every so often and
    starts it again under its name after down_s; at most one node is down at a time."""

    def __init__(self, stack: Stack, args: argparse.Namespace, rng: random.Random, started: float) -> None:
        self.stack, self.args, self.rng, self.started = stack, args, rng, started
        self.kills: list[dict] = []

    async def run(self, until: float) -> None:
        victims = [f"node-{index}" for index in range(1, self.args.nodes)]
        while time.monotonic() + self.args.down_s < until:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.args.kill_every_s)
            if time.monotonic() + self.args.down_s >= until:
                return
            await self.cycle(self.rng.choice(victims))

    async def cycle(self, name: str) -> None:
        """SIGKILL the node, wait down_s, start it again under its name."""
        process = self.stack.process(name)
        self.stack.stop_process(process, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(self.args.down_s)
        restarted = self.stack.add_node(name)
        at_s = round(killed_at - self.started, 1)
        self.kills.append({"node": name, "pid": process.popen.pid, "new_pid": restarted.popen.pid, "at_s": at_s})


async def traffic(
    stub: router_pb2_grpc.RouterServiceStub,
    templates: list[Template],
    answers: list[list[int]],
    until: float,
    rng: random.Random,
    tally: Tally,
) -> None:
    """One of the N concurrent streams: a new request as soon as the last one ends, until `until`."""
    while time.monotonic() < until:
        index = rng.randrange(len(templates))
        mode = rng.choices(MODES, MODE_WEIGHTS)[0]
        await run_stream(stub, templates[index], answers[index], mode, rng, tally)


async def soak(args: argparse.Namespace, workdir: Path) -> dict:
    rng = random.Random(args.seed)
    stack = stack_for(args, workdir)
    report: dict = {"run": probes.describe_run(args)}
    with stack:
        async with grpc.aio.insecure_channel(stack.router_address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            await probes.wait_for_pipeline(stub, args.nodes)
            templates = make_templates(args.templates, SHAPE["vocab_size"], rng)
            answers, mismatches = await references(stub, templates, workdir / "tiny-gpt2")
            # Warm-up: the full load with one node killed and restarted (so every node has loaded a shard again
            # and touched as much of its KV pool as the load does) before the baseline is taken.
            warm, warm_chaos = Tally(), Chaos(stack, args, rng, time.monotonic())
            warm_until = time.monotonic() + args.warmup_s
            await asyncio.gather(
                warm_chaos.cycle("node-1"),
                *(traffic(stub, templates, answers, warm_until, random.Random(rng.random()), warm)
                  for _ in range(args.streams)),
            )  # fmt: skip
            await probes.restore(stack, stub, args.nodes)
            await probes.settle(stack, args.nodes)
            baseline = probes.rss(stack)
            started = time.monotonic()
            until = started + args.minutes * 60
            tally, chaos = Tally(), Chaos(stack, args, rng, started)
            workers = [
                traffic(stub, templates, answers, until, random.Random(rng.random()), tally)
                for _ in range(args.streams)
            ]
            timeline = probes.RssTimeline(stack, started)
            await asyncio.gather(chaos.run(until), timeline.run(until), *workers)
            elapsed = time.monotonic() - started
            await probes.restore(stack, stub, args.nodes)
            left = await probes.settle(stack, args.nodes)
            after = probes.rss(stack)
            report.update(probes.summary(tally, warm, chaos.kills, mismatches, left, baseline, after, elapsed, args))
            report["rss_timeline"] = timeline.samples
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="synapse-soak-") as temporary:
        workdir = args.workdir or Path(temporary)
        report = asyncio.run(soak(args, workdir))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(probes.render(report))
    print(f"report written to {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
