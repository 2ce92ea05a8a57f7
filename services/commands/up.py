"""`synapse up`: the whole stack on this machine (every service as a process, native nodes), then a demo.

Every service runs in its own session (a terminal's Ctrl-C or hang-up reaches only `synapse up`), so
`synapse up` stops them all itself on SIGINT, SIGTERM and SIGHUP (a closed terminal); should it die
without a word (SIGKILL), each service gets SIGTERM from the kernel (services/common/orphan_guard.py).
No orphan keeps the stack's ports.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HELP = "Start tokenizer, sampler, sharder, gateway, router and native nodes locally, and generate text."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", help="checkpoint folder or hub name (default %(default)s)")
    parser.add_argument("--nodes", type=int, default=2, help="native nodes to start (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("var/up"), help="logs and shards (default %(default)s)")
    parser.add_argument("--prompt", default="The quick brown fox", help="demo prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--once", action="store_true", help="exit after the demo instead of serving on")
    parser.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="derive every port of the stack from this one (router = BASE; docs/operations.md lists the rest), "
        "so stacks with bases 1000 apart run side by side; default: the services' default ports",
    )


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: stop the stack and exit 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped; from the first of them (or Ctrl-C) on, all three are ignored, so
    a second signal cannot cut the stack's own shutdown short and leave processes behind."""
    watched = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in watched}

    def handle(signum: int, _frame: object) -> None:
        for each in watched:
            signal.signal(each, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    for signum in watched:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    try:
        with stop_signals():
            return _up(args)
    except Stopped as stopped:
        return 128 + stopped.signum


def _say(text: str, **options: object) -> None:
    """Print, unless the terminal is gone (a hang-up): the stack must still be stopped after it."""
    with contextlib.suppress(OSError):
        print(text, flush=True, **options)


def _announce(process) -> None:
    role = "node" if process.name.startswith("node") else "service"
    address = f" grpc={process.grpc_address}" if process.grpc_address else ""
    _say(f"started {role} {process.name} pid={process.popen.pid}{address} metrics={process.metrics_port}")


def _up(args: argparse.Namespace) -> int:
    from services.client import SynapseClient
    from services.launcher import Stack

    ports = {"port_base": args.port_base} if args.port_base is not None else {"default_ports": True}
    stack = Stack(
        model=args.model, workdir=args.workdir, nodes=args.nodes, on_spawn=_announce, die_with_parent=True, **ports
    )
    _say(f"starting {args.nodes} node(s) and every service; logs in {args.workdir / 'logs'}")
    with stack, SynapseClient(stack.router_address) as client:
        topology = _wait_for_pipeline(client, args.nodes)
        stages = ", ".join(f"{s.node_id}[{s.layers.start},{s.layers.end})" for s in topology.pipelines[0].stages)
        print(f"model {topology.model_id}: pipeline {stages}", flush=True)
        if topology.model_id.endswith("-random-weights"):
            print(
                "NOTE: the Hugging Face hub could not be reached, so this is a RANDOM-WEIGHT GPT-2 of the same "
                "shape (gibberish text). Pass --model with a local checkpoint folder for real output.",
                flush=True,
            )
        sys.stdout.write(args.prompt)
        last = None
        for response in client.generate(args.prompt, max_tokens=args.max_tokens):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            last = response
        if last is not None:
            usage = last.usage
            print(
                f"\n[{usage.completion_tokens} tokens in {usage.total_ms:.0f} ms, "
                f"{usage.completion_tokens / max(usage.total_ms / 1e3, 1e-9):.1f} tokens/s]",
                flush=True,
            )
        if args.once:
            return 0
        print(
            f"serving: router at {stack.router_address}, nodes join at {stack.gateway_url()}; "
            'try `synapse generate "Hello"`; Ctrl-C stops',
            flush=True,
        )
        web_page = stack.gateway_url().replace("ws://", "http://").removesuffix("/ws")
        print(
            f"more nodes: SYNAPSE_NODE_JOIN_TOKEN={stack.join_token} synapse node --gateway {stack.gateway_url()}\n"
            f"a web node: open {web_page}/?join_token={stack.join_token}",
            flush=True,
        )
        while all(p.popen.poll() is None for p in stack.processes):
            time.sleep(1.0)
        dead = [p.name for p in stack.processes if p.popen.poll() is not None]
        _say(f"stopping: {', '.join(dead)} exited; see {args.workdir / 'logs'}", file=sys.stderr)
        return 1


def _wait_for_pipeline(client, nodes: int, timeout_s: float = 600.0):
    from services.common.errors import Unavailable

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topology = client.topology()
        if any(len(p.stages) == min(nodes, topology.config.n_layer or nodes) for p in topology.pipelines):
            return topology
        time.sleep(0.5)
    raise Unavailable(f"no pipeline of {nodes} nodes after {timeout_s:.0f} s; see the logs")
