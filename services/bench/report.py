"""report.md from a bench's results: the machine and command, the ratios, then each scenario's figures."""

from __future__ import annotations

from services.bench.plots import PARTS

PART_MEANING = {
    "compute": "the nodes' forward passes (node-reported)",
    "serialize": "SYN1 encode/decode on node and gateway",
    "queue": "waiting on a node before its forward pass",
    "network": "gateway<->node round trip minus all the node reported",
    "router_gateway": "router step minus the gateway's hop round trips (router<->gateway stream, forwarding)",
    "sample": "the router turning answers into tokens",
    "other": "the rest of the token interval (router loop, scheduling)",
}


def _f(value: object, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def render(results: dict, plots: list[str]) -> str:
    machine, options, scenarios = results["machine"], results["options"], results["scenarios"]
    lines = [
        "# Synapse benchmark report",
        "",
        f"- command: `{machine['command']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {_f(machine['memory_gib'])} GiB; "
        f"GPU: {machine['gpu'] or 'none'}; torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"Python {machine['python']}; load average {machine['load_average_at_start'][0]} at the start, "
        f"{machine['load_average'][0]} at the end",
        f"- model: {results['model']['label']}; device {options['device']}, dtype {options['dtype']}; "
        f"{options['tokens']} decode tokens per stream{' (--quick)' if options['quick'] else ''}",
        "- stacks: every service a process, "
        + ("Redis holding the registry" if machine["redis_server"] else "the registry in memory (no redis-server)"),
        f"- finished {results['finished_at']} after {results['seconds']:.0f} s",
        "",
        "Every figure below was measured in this one run, scenario after scenario on the same machine.",
        "",
    ]
    lines += _status(scenarios)
    lines += _ratios(results["ratios"])
    lines += _token_time(scenarios)
    lines += _streams(scenarios)
    lines += _prefill(scenarios)
    lines += _speculation(scenarios, options)
    lines += _browser(scenarios)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def _status(scenarios: dict) -> list[str]:
    lines = ["## Scenarios", "", "| scenario | status | seconds | errors |", "|---|---|---|---|"]
    for name, scenario in scenarios.items():
        errors = "; ".join(f"{key}: {error.splitlines()[0][:160]}" for key, error in scenario["errors"].items())
        lines.append(f"| {name} | {scenario['status']} | {scenario['seconds']:.0f} | {errors or ''} |")
    failed = [(n, k, e) for n, s in scenarios.items() for k, e in s["errors"].items()]
    if failed:
        lines += ["", "Errors in full:", ""]
        for name, key, error in failed:
            lines += [f"- {name} / {key}:", "", "  ```", *("  " + line for line in error.splitlines()[:30]), "  ```"]
    return [*lines, ""]


def _ratios(found: dict) -> list[str]:
    lines = ["## Ratios (side by side)", "", "| ratio | measured on | value |", "|---|---|---|"]
    labels = {
        "stack_vs_single_process": "decode tokens/s, whole stack ÷ one transformers process, timed after it (1 stream)",
        "stack_vs_cuda_graph": "decode tokens/s, whole stack ÷ one-process CUDA-graph decode (1 stream)",
        "overhead_share": "overhead share: non-compute share of a decode token's time (1 stream)",
        "streams_8_vs_1": "aggregate tokens/s, 8 streams ÷ 1 stream",
        "streams_vs_single_process": "aggregate tokens/s, whole stack ÷ one process at the same stream count",
        "prefill_vs_single_process": "time to first token, whole stack ÷ one process",
        "speculation_speedup": "decode tokens/s, speculation on ÷ off",
        "speculation_tokens_per_round_trip": "tokens per round trip, speculation on",
        "browser_vs_native": "decode tokens/s, browser node ÷ native node (whole model on one node)",
    }
    for name, by_key in found.items():
        for key, value in by_key.items():
            where = f"{key} native nodes" if key.isdigit() else key
            shown = _pct(value) if name == "overhead_share" else _f(value, 2) if "per_round_trip" in name else _x(value)
            lines.append(f"| {labels[name]} | {where} | {shown} |")
    return [*lines, ""]


def _token_time(scenarios: dict) -> list[str]:
    runs = dict(scenarios["stack"]["runs"])
    if "page" in scenarios["browser"]["runs"]:
        runs["browser"] = scenarios["browser"]["runs"]["page"]
    baseline = scenarios["baseline"]["runs"]
    lines = ["## One stream: decode speed and where a token's time goes", ""]
    for name, label in (("transformers", "one transformers process"), ("cuda_graph", "one-process CUDA-graph decode")):
        if name in baseline:
            lines.append(f"- {label}: {baseline[name]['decode_tokens_per_s']:,.1f} decode tokens/s")
    if not runs:
        return [*lines, ""]
    header = "| | " + " | ".join(f"{k} nodes" if k.isdigit() else k for k in runs) + " |"
    lines += ["", header, "|---" * (len(runs) + 1) + "|"]
    rows = [
        ("decode tokens/s", lambda r: _f(r["decode_tokens_per_s"])),
        ("decode tokens/s (client's clock)", lambda r: _f(r["client_decode_tokens_per_s"])),
        ("one transformers process, timed right after", lambda r: _f(r.get("single_process_decode_tokens_per_s"))),
        ("time to first token, ms", lambda r: _f(r["time_to_first_token_ms"])),
        ("overhead share", lambda r: _pct(r["overhead_share"])),
        ("hops per step", lambda r: _f(r["hops_per_step"], 2)),
    ]
    rows += [(f"ms per token: {part}", lambda r, part=part: _f(r["token_ms"][part], 2)) for part in PARTS]
    rows.append(("ms per token: total", lambda r: _f(r["token_ms"]["total"], 2)))
    rows += [
        (f"ms per hop: {part}", lambda r, part=part: _f(r["hop_ms"][part], 3))
        for part in ("round_trip", "compute", "serialize", "queue", "network")
    ]
    rows += [
        ("wire bytes per token per hop, to node", lambda r: _f(r["wire_bytes_per_token_per_hop"]["to_node"], 0)),
        ("wire bytes per token per hop, from node", lambda r: _f(r["wire_bytes_per_token_per_hop"]["from_node"], 0)),
        ("compute ms per step, by node", lambda r: ", ".join(f"{n} {v:.2f}" for n, v in r["node_compute_ms"].items())),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(run) for run in runs.values()) + " |")
    lines += ["", "The parts of a token's time:", ""]
    lines += [f"- **{part}**: {meaning}" for part, meaning in PART_MEANING.items()]
    return [*lines, ""]


def _streams(scenarios: dict) -> list[str]:
    runs, baseline = scenarios["streams"]["runs"], scenarios["baseline"]["runs"]
    counts = sorted(
        {int(c) for by in runs.values() for c in by} | {int(c) for b in baseline.values() for c in b.get("streams", {})}
    )
    if not counts:
        return []
    lines = [
        "## Aggregate tokens/s against concurrent streams",
        "",
        "| | " + " | ".join(f"{c} streams" for c in counts) + " |",
    ]
    lines.append("|---" * (len(counts) + 1) + "|")
    for name, label in (
        ("transformers", "one transformers process (batched)"),
        ("cuda_graph", "one-process CUDA graph (decode only)"),
    ):
        if name in baseline:
            by = baseline[name]["streams"]
            lines.append(
                f"| {label} | " + " | ".join(_f(by.get(str(c), {}).get("tokens_per_s")) for c in counts) + " |"
            )
    for nodes, by in runs.items():
        lines.append(
            f"| whole stack, {nodes} nodes | "
            + " | ".join(_f(by.get(str(c), {}).get("tokens_per_s")) for c in counts)
            + " |"
        )
    lines += [
        "",
        "Stack and transformers figures: every stream's tokens ÷ the time from the first request to the last "
        "token (prefill included).",
    ]
    return [*lines, ""]


def _prefill(scenarios: dict) -> list[str]:
    runs = scenarios["prefill"]["runs"]
    baseline = scenarios["baseline"]["runs"].get("transformers", {}).get("prefill", {})
    lengths = sorted({int(n) for by in runs.values() for n in by} | {int(n) for n in baseline})
    if not lengths:
        return []
    lines = ["## Prefill: time to first token, ms", "", "| | " + " | ".join(f"{n} tokens" for n in lengths) + " |"]
    lines.append("|---" * (len(lengths) + 1) + "|")
    if baseline:
        lines.append(
            "| one transformers process | " + " | ".join(_f(baseline.get(str(n), {}).get("ms")) for n in lengths) + " |"
        )
    for nodes, by in runs.items():
        cells = [_f(by.get(str(n), {}).get("time_to_first_token_ms")) for n in lengths]
        lines.append(f"| whole stack, {nodes} nodes | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _speculation(scenarios: dict, options: dict) -> list[str]:
    runs = scenarios["speculation"]["runs"]
    if not runs:
        return []
    lines = [
        f"## Speculation ({options['speculation_nodes']} nodes, SYNAPSE_ROUTER_SPECULATE_TOKENS="
        f"{options['speculate_tokens']} vs 0)",
        "",
        "| prompt | speculation | decode tokens/s | tokens per round trip | drafts sent | drafts accepted |",
        "|---|---|---|---|---|---|",
    ]
    for prompt in ("repetitive", "plain"):
        for setting in ("off", "on"):
            run = runs.get(setting, {}).get(prompt)
            if run:
                lines.append(
                    f"| {prompt} | {setting} | {_f(run['decode_tokens_per_s'])} "
                    f"| {_f(run['tokens_per_round_trip'], 2)} "
                    f"| {run['draft_tokens']:.0f} | {run['accepted_draft_tokens']:.0f} |"
                )
    return [*lines, ""]


def _browser(scenarios: dict) -> list[str]:
    run = scenarios["browser"]["runs"].get("page")
    if not run:
        return []
    return [
        "## Browser node (headless Chromium, WebGPU on SwiftShader)",
        "",
        f"One page holding every layer: {_f(run['decode_tokens_per_s'], 2)} decode tokens/s, "
        f"{run['token_ms']['total']:.0f} ms a token of which compute {run['token_ms']['compute']:.0f} ms; "
        f"time to first token {run['time_to_first_token_ms']:.0f} ms.",
        "",
    ]
