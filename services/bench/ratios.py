"""The ratios the report leads with, from the runs of one bench (measured side by side): whole stack vs one
process, overhead share, 8 streams vs 1, prefill, speculation, browser vs native."""

from __future__ import annotations


def _get(tree: object, *path: str) -> object | None:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return a / b
    return None


def ratios(scenarios: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Each ratio by the stack it was measured on (its native node count), or by prompt; None where a run is
    missing or failed."""
    runs = {name: scenario.get("runs", {}) for name, scenario in scenarios.items()}
    reference = _get(runs["baseline"], "transformers", "decode_tokens_per_s")
    graph = _get(runs["baseline"], "cuda_graph", "decode_tokens_per_s")
    found: dict[str, dict[str, float | None]] = {
        "stack_vs_single_process": {},
        "stack_vs_cuda_graph": {},
        "overhead_share": {},
        "streams_8_vs_1": {},
        "streams_vs_single_process": {},
        "prefill_vs_single_process": {},
        "speculation_speedup": {},
        "speculation_tokens_per_round_trip": {},
        "browser_vs_native": {},
    }
    for nodes, run in runs["stack"].items():
        rate = _get(run, "decode_tokens_per_s")
        adjacent = _get(run, "single_process_decode_tokens_per_s")  # timed right after the stack's stream
        found["stack_vs_single_process"][nodes] = _ratio(rate, adjacent if adjacent is not None else reference)
        if graph is not None:
            found["stack_vs_cuda_graph"][nodes] = _ratio(rate, graph)
        found["overhead_share"][nodes] = _get(run, "overhead_share")
    baseline_streams = _get(runs["baseline"], "transformers", "streams") or {}
    for nodes, by_count in runs["streams"].items():
        found["streams_8_vs_1"][nodes] = _ratio(
            _get(by_count, "8", "tokens_per_s"), _get(by_count, "1", "tokens_per_s")
        )
        for count, run in by_count.items():
            found["streams_vs_single_process"][f"{nodes} nodes, {count} streams"] = _ratio(
                _get(run, "tokens_per_s"), _get(baseline_streams, count, "tokens_per_s")
            )
    found["streams_8_vs_1"]["single process"] = _ratio(
        _get(baseline_streams, "8", "tokens_per_s"), _get(baseline_streams, "1", "tokens_per_s")
    )
    baseline_prefill = _get(runs["baseline"], "transformers", "prefill") or {}
    for nodes, by_length in runs["prefill"].items():
        for length, run in by_length.items():
            found["prefill_vs_single_process"][f"{nodes} nodes, {length} tokens"] = _ratio(
                _get(run, "time_to_first_token_ms"), _get(baseline_prefill, length, "ms")
            )
    for prompt in ("repetitive", "plain"):
        on, off = _get(runs["speculation"], "on", prompt), _get(runs["speculation"], "off", prompt)
        found["speculation_speedup"][prompt] = _ratio(_get(on, "decode_tokens_per_s"), _get(off, "decode_tokens_per_s"))
        found["speculation_tokens_per_round_trip"][prompt] = _get(on, "tokens_per_round_trip")
    found["browser_vs_native"]["1 node"] = _ratio(
        _get(runs["browser"], "page", "decode_tokens_per_s"), _get(runs["stack"], "1", "decode_tokens_per_s")
    )
    return found
