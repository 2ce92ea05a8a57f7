"""PNG plots of a bench's results (matplotlib, no display): where a token's time goes, tokens/s against
concurrent streams, prefill, speculation."""

from __future__ import annotations

from pathlib import Path

PARTS = ("compute", "serialize", "queue", "network", "router_gateway", "sample", "other")
COLORS = ("#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#937860", "#55a868", "#8c8c8c")


def write_plots(results: dict, out: Path) -> list[str]:
    """Every plot the results have data for; the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, draw in (
        ("token_time.png", _token_time),
        ("streams.png", _streams),
        ("prefill.png", _prefill),
        ("speculation.png", _speculation),
    ):
        figure = draw(results["scenarios"])
        if figure is not None:
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            written.append(name)
            import matplotlib.pyplot as plt

            plt.close(figure)
    return written


def _token_time(scenarios: dict):
    import matplotlib.pyplot as plt

    bars = {
        f"{nodes} native" + (" node" if nodes == "1" else " nodes"): run
        for nodes, run in scenarios["stack"]["runs"].items()
    }
    if "page" in scenarios["browser"]["runs"]:
        bars["browser node"] = scenarios["browser"]["runs"]["page"]
    if not bars:
        return None
    figure, axes = plt.subplots(figsize=(7, 0.6 * len(bars) + 1.6))
    for row, (_label, run) in enumerate(bars.items()):
        parts = run["token_ms"]
        total = parts["total"] or 1.0
        left = 0.0
        for part, color in zip(PARTS, COLORS, strict=True):
            share = max(parts.get(part, 0.0), 0.0) / total * 100
            axes.barh(row, share, left=left, color=color, label=part if row == 0 else None)
            left += share
        axes.text(101, row, f"{total:.1f} ms", va="center", fontsize=8)
    axes.set_yticks(range(len(bars)), list(bars))
    axes.set_xlim(0, 115)
    axes.set_xlabel("share of one decode token's time, %")
    axes.set_title("Where a decode token's time goes (1 stream)")
    axes.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return figure


def _streams(scenarios: dict):
    lines = {}
    for nodes, by_count in scenarios["streams"]["runs"].items():
        lines[f"stack, {nodes} nodes"] = {int(c): r["tokens_per_s"] for c, r in by_count.items()}
    for name in ("transformers", "cuda_graph"):
        by_count = scenarios["baseline"]["runs"].get(name, {}).get("streams", {})
        if by_count:
            lines[f"single process ({name.replace('_', ' ')})"] = {
                int(c): r["tokens_per_s"] for c, r in by_count.items()
            }
    if not lines:
        return None
    figure, axes = _lines_figure(lines)
    axes.set_yscale("log")
    axes.set_xlabel("concurrent streams")
    axes.set_ylabel("aggregate tokens/s")
    axes.set_title("Tokens/s against concurrent streams")
    axes.grid(True, which="both", alpha=0.3)
    return figure


def _prefill(scenarios: dict):
    lines = {}
    for nodes, by_length in scenarios["prefill"]["runs"].items():
        lines[f"stack, {nodes} nodes"] = {int(n): r["time_to_first_token_ms"] for n, r in by_length.items()}
    by_length = scenarios["baseline"]["runs"].get("transformers", {}).get("prefill", {})
    if by_length:
        lines["single process (transformers)"] = {int(n): r["ms"] for n, r in by_length.items()}
    if not lines:
        return None
    figure, axes = _lines_figure(lines)
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("time to first token, ms")
    axes.set_title("Prefill")
    axes.grid(True, alpha=0.3)
    return figure


def _lines_figure(lines: dict[str, dict[int, float]]):
    """One line per label over a log2 x axis ticked at the measured points; single-process lines dashed."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", label=label, linestyle="--" if "single" in label else "-")
    axes.set_xscale("log", base=2)
    xs = sorted({x for points in lines.values() for x in points})
    axes.set_xticks(xs, [str(x) for x in xs])
    axes.legend(fontsize=8)
    return figure, axes


def _speculation(scenarios: dict):
    import matplotlib.pyplot as plt

    runs = scenarios["speculation"]["runs"]
    if not runs:
        return None
    figure, (rate, per_trip) = plt.subplots(1, 2, figsize=(8, 3.5))
    prompts = ("repetitive", "plain")
    for offset, setting in ((-0.2, "off"), (0.2, "on")):
        values = [runs.get(setting, {}).get(p, {}) for p in prompts]
        positions = [i + offset for i in range(len(prompts))]
        rate.bar(
            positions, [v.get("decode_tokens_per_s") or 0 for v in values], width=0.4, label=f"speculation {setting}"
        )
        per_trip.bar(
            positions, [v.get("tokens_per_round_trip") or 0 for v in values], width=0.4, label=f"speculation {setting}"
        )
    for axes, label in ((rate, "decode tokens/s"), (per_trip, "tokens per round trip")):
        axes.set_xticks(range(len(prompts)), [f"{p} prompt" for p in prompts])
        axes.set_ylabel(label)
    per_trip.legend(fontsize=8, loc="lower right")
    figure.suptitle("Speculative decoding (prompt lookup)")
    figure.tight_layout()
    return figure
