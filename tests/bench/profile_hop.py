"""Where the microseconds of one hop go: py-spy samples the router, the gateway and a native node of a running
stack while one stream decodes, and prints each process's busiest functions.

    python tests/bench/profile_hop.py [--nodes 1] [--streams 1] [--seconds 20] [--model DIR|tiny] [--out var/profile]

Full-size GPT-2 124M with random weights by default (services/bench/checkpoint.py). py-spy (pip install
py-spy) records each process at 1 kHz in raw (collapsed-stack) form, idle threads left out, into --out;
the summary shows, per process, the share of its busy samples in each function (self) and under it
(inclusive), and the decode tokens/s the stream got while being sampled. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.bench.checkpoint import random_gpt2
from services.bench.stack import running_stack, wait_for_pipeline
from services.bench.suite import PROMPT
from services.client import SynapseClient

RATE_HZ = 1000


# Frames every sample of a process sits under (the interpreter, the event loop, thread start-up): left out of
# the inclusive list, which is there to show the domain code's share.
GENERIC = ("(runners.py)", "(base_events.py)", "(events.py)", "(<frozen runpy>)", "<module> (", "(threading.py)")


def summarize(path: Path, top: int, tokens: int) -> list[str]:
    """The `top` functions by self and by inclusive samples of a collapsed-stack file, as µs per decode token."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(frame) for frame in stack.split(";")[1:]]  # the first is the thread
        if not frames:
            continue
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            if not any(generic in frame for generic in GENERIC):
                under[frame] += samples

    def us(samples: int) -> str:
        return f"{samples / RATE_HZ / tokens * 1e6:8.0f} µs/token {samples / total * 100:5.1f} %"

    lines = [f"  busy: {us(total)}"]
    lines += ["  self:"] + [f"    {us(n)}  {f}" for f, n in own.most_common(top)]
    lines += ["  inclusive:"] + [f"    {us(n)}  {f}" for f, n in under.most_common(top)]
    return lines


def _short(frame: str) -> str:
    """'name (path/to/file.py)' -> 'name (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model", default=None, help="a checkpoint folder, or 'tiny' (compute ~0: overhead only)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams decoding while sampled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the nodes")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--out", type=Path, default=Path("var/profile"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        model = str(random_gpt2(args.out / "gpt2-tiny-random", tiny=True))
    else:
        model = args.model or str(random_gpt2(args.out / "gpt2-124m-random"))
    env, node_env = {}, {"SYNAPSE_NODE_THREADS": str(args.threads)}
    with (
        running_stack(model, args.out, "stack", nodes=args.nodes, env=env, node_env=node_env) as stack,
        SynapseClient(stack.router_address) as client,
    ):
        wait_for_pipeline(stack, client, args.nodes, 600)
        for _ in client.generate(PROMPT, max_tokens=8, ignore_eos=True):  # warm-up
            pass
        stop = threading.Event()
        counted = collections.Counter()

        def stream() -> None:
            while not stop.is_set():
                for response in client.generate(PROMPT, max_tokens=200, ignore_eos=True):
                    if response.HasField("token_id"):
                        counted["tokens"] += 1
                        counted["ms"] += response.timing.step_ms
                    if stop.is_set():
                        break

        workers = [threading.Thread(target=stream) for _ in range(args.streams)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        names = ["router", "gateway-0", *(f"node-{index}" for index in range(args.nodes))]
        recorders = {
            name: subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(stack.process(name).popen.pid),
                    "--rate",
                    str(RATE_HZ),
                    "--duration",
                    str(int(args.seconds)),
                    "--format",
                    "raw",
                    "--nolineno",
                    "--nonblocking",
                    "-o",
                    str(args.out / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            for name in names
        }
        started = dict(counted)
        for recorder in recorders.values():
            recorder.wait()
        stop.set()
        for worker in workers:
            worker.join()
    tokens = counted["tokens"] - started.get("tokens", 0)
    ms = counted["ms"] - started.get("ms", 0.0)
    print(
        f"{args.nodes} native node(s), {args.streams} stream(s): {tokens} tokens, "
        f"{tokens / (ms / 1e3) * args.streams:.1f} decode tokens/s while sampled (all streams, by step_ms; "
        f"{tokens / args.seconds:.1f} by the clock)"
    )
    for name in names:
        print(f"{name}:")
        print("\n".join(summarize(args.out / f"{name}.txt", args.top, tokens)))


if __name__ == "__main__":
    main()
