"""The bench's report, ratios and plots from results where runs failed or were skipped: no figure is made up,
nothing crashes, and every failure is shown with its error."""

from __future__ import annotations

import json
from pathlib import Path

from services.bench.plots import write_plots
from services.bench.ratios import ratios
from services.bench.report import render
from services.bench.suite import SCENARIOS, Options, Scenario, Suite


def results_with(scenarios: dict[str, Scenario], tmp_path: Path) -> dict:
    suite = Suite.__new__(Suite)  # results() needs only what it reports: no checkpoint is built
    suite.options = Options(out=tmp_path, scenarios=SCENARIOS)
    suite.model, suite.model_label, suite.load_at_start = "m", "a model", [0.0, 0.0, 0.0]
    suite.scenarios = {name: scenarios.get(name, Scenario()) for name in SCENARIOS}
    for scenario in suite.scenarios.values():
        if scenario.runs or scenario.errors:  # the rest stay "skipped"
            scenario.close()
    return json.loads(json.dumps(suite.results(1.0)))  # as results.json holds it


def test_a_run_that_fails_is_recorded_and_the_next_one_still_runs() -> None:
    scenario = Scenario()
    scenario.attempt(("2", "16"), lambda: {"time_to_first_token_ms": 5.0})
    scenario.attempt(("2", "2000"), lambda: 1 / 0)
    scenario.attempt(("2", "128"), lambda: {"time_to_first_token_ms": 9.0})
    scenario.close()
    assert scenario.runs == {"2": {"16": {"time_to_first_token_ms": 5.0}, "128": {"time_to_first_token_ms": 9.0}}}
    assert scenario.errors == {"2/2000": "ZeroDivisionError: division by zero"}
    assert scenario.status == "partial"


def test_everything_failed_gives_a_report_of_errors_and_no_figures(tmp_path: Path) -> None:
    failed = {}
    for name in SCENARIOS:
        failed[name] = Scenario()
        failed[name].fail("2" if name != "baseline" else "transformers", RuntimeError(f"{name} broke\nsecond line"))
    results = results_with(failed, tmp_path)
    assert all(s["status"] == "failed" for s in results["scenarios"].values())
    assert all(value is None for by_key in results["ratios"].values() for value in by_key.values())
    assert write_plots(results, tmp_path) == []
    report = render(results, [])
    for name in SCENARIOS:
        assert f"RuntimeError: {name} broke" in report


def test_ratios_are_taken_from_runs_measured_side_by_side(tmp_path: Path) -> None:
    baseline, stack, streams = Scenario(), Scenario(), Scenario()
    baseline.runs = {"transformers": {"decode_tokens_per_s": 10.0, "streams": {"1": {"tokens_per_s": 8.0}}}}
    stack.runs = {"2": {"decode_tokens_per_s": 9.0, "single_process_decode_tokens_per_s": 12.0, "overhead_share": 0.1}}
    streams.runs = {"2": {"1": {"tokens_per_s": 7.0}, "8": {"tokens_per_s": 21.0}}}
    found = ratios(results_with({"baseline": baseline, "stack": stack, "streams": streams}, tmp_path)["scenarios"])
    assert found["stack_vs_single_process"] == {"2": 0.75}  # the baseline timed next to the stack, not the first
    assert found["streams_8_vs_1"] == {"2": 3.0, "single process": None}
    assert found["streams_vs_single_process"] == {"2 nodes, 1 streams": 7.0 / 8.0, "2 nodes, 8 streams": None}
    assert found["overhead_share"] == {"2": 0.1}
