"""`synapse bench`: the benchmark suite in one run (report.md, results.json, PNG plots in --out)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Benchmark one process vs the whole stack (1/2/4 nodes), streams, prefill, speculation, a browser node."


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0, got {text!r}")
    return values


def _scenarios(text: str) -> tuple[str, ...]:
    from services.bench.suite import SCENARIOS

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {','.join(SCENARIOS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.bench.suite import SCENARIOS

    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="output folder (default %(default)s)")
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub name (default: a random GPT-2 124M-shaped checkpoint)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if present")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
        help="compute dtype of the nodes and the baselines; auto = float32 on CPU, float16 on CUDA",
    )  # fmt: skip
    parser.add_argument(
        "--scenarios", type=_scenarios, default=SCENARIOS, help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--skip", type=_scenarios, default=(), help="scenarios to leave out")
    parser.add_argument("--nodes", type=_counts, default=None, help="native node counts (default 1,2,4)")
    parser.add_argument("--streams", type=_counts, default=None, help="concurrent stream counts (default 1,8,64)")
    parser.add_argument("--prefill", type=_counts, default=None, help="prompt lengths (default 16,128,512)")
    parser.add_argument("--tokens", type=int, default=None, help="decode tokens per stream (default 64; quick 8)")
    parser.add_argument("--browser-tokens", type=int, default=None, help="decode tokens on the browser node (4)")
    parser.add_argument("--speculate-tokens", type=int, default=4, help="draft tokens when speculation is on")
    parser.add_argument("--speculation-nodes", type=int, default=2, help="native nodes of the speculation stacks")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the baselines' timings (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the baselines and every native node (torch's)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny random checkpoint (4 layers, GPT-2's vocabulary), 8 tokens, 1,2 nodes, 1,8 streams, 16,128 prefill",
    )  # fmt: skip


def options_from(args: argparse.Namespace):
    import torch

    from services.bench.suite import Options
    from services.common.errors import InvalidArgument

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda, but torch sees no CUDA device on this machine")
    quick = args.quick
    scenarios = tuple(name for name in args.scenarios if name not in args.skip)
    return Options(
        out=args.out,
        model=args.model,
        device=device,
        dtype=args.dtype,
        scenarios=scenarios,
        nodes=args.nodes or ((1, 2) if quick else (1, 2, 4)),
        streams=args.streams or ((1, 8) if quick else (1, 8, 64)),
        prefill=args.prefill or ((16, 128) if quick else (16, 128, 512)),
        tokens=args.tokens or (8 if quick else 64),
        browser_tokens=args.browser_tokens or (2 if quick else 4),
        speculate_tokens=args.speculate_tokens,
        speculation_nodes=args.speculation_nodes,
        repeats=args.repeats or (1 if quick else 3),
        threads=args.threads,
        quick=quick,
    )


def run(args: argparse.Namespace) -> int:
    import json

    from services.bench.plots import write_plots
    from services.bench.report import render
    from services.bench.suite import Suite

    options = options_from(args)
    options.out.mkdir(parents=True, exist_ok=True)
    print(f"synapse bench: {', '.join(options.scenarios)} on {options.device}; writing to {options.out}", flush=True)
    results = Suite(options).run()
    (options.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, options.out)
    (options.out / "report.md").write_text(render(results, plots) + "\n")
    for name, scenario in results["scenarios"].items():
        if scenario["status"] != "skipped":
            print(f"  {name}: {scenario['status']} ({scenario['seconds']:.0f} s)", flush=True)
    print(f"report: {options.out / 'report.md'}", flush=True)
    failed = any(s["status"] in ("failed", "partial") for s in results["scenarios"].values())
    return 1 if failed else 0
