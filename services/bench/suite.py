"""The benchmark suite: every scenario in one run (so ratios compare runs made side by side), each one failing
on its own (recorded with its error) without stopping the others; results as one JSON-ready dict."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.bench import machine
from services.bench.checkpoint import resolve

log = logging.getLogger(__name__)

SCENARIOS = ("baseline", "stack", "streams", "prefill", "speculation", "browser")
STACK_SCENARIOS = ("stack", "streams", "prefill")
# "The quick brown fox jumps over the lazy dog." (10 tokens), and a prompt that repeats itself, so prompt
# lookup finds drafts.
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
REPETITIVE = [464, 2068, 7586, 21831, 11] * 6
PIPELINE_TIMEOUT_S = 600.0
SCHEMA = 1


@dataclass
class Options:
    """What `synapse bench` was asked to run."""

    out: Path
    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    scenarios: tuple[str, ...] = SCENARIOS
    nodes: tuple[int, ...] = (1, 2, 4)
    streams: tuple[int, ...] = (1, 8, 64)
    prefill: tuple[int, ...] = (16, 128, 512)
    tokens: int = 64
    browser_tokens: int = 4
    speculate_tokens: int = 4
    speculation_nodes: int = 2
    repeats: int = 3
    threads: int | None = None  # torch intra-op threads of the baselines and of every native node
    quick: bool = False
    workdir: Path | None = None

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float16 if self.device == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass
class Scenario:
    """One scenario's outcome: its runs by key, and the errors of the runs that failed."""

    status: str = "skipped"
    seconds: float = 0.0
    runs: dict[str, object] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def attempt(self, key: str | tuple[str, ...], measure: Callable[[], object]) -> object | None:
        """Run one measurement and keep its result at runs[key] (a tuple: nested, runs[a][b]); a failure is
        recorded under the key ("a/b") instead, and the suite goes on."""
        path = (key,) if isinstance(key, str) else key
        started = time.perf_counter()
        try:
            result = measure()
        except Exception as error:  # any failure of one run is its result: recorded, the others still run
            self.fail("/".join(path), error)
            return None
        finally:
            self.seconds += time.perf_counter() - started
        runs = self.runs
        for part in path[:-1]:
            runs = runs.setdefault(part, {})
        runs[path[-1]] = result
        return result

    def fail(self, key: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        log.warning("bench_run_failed", extra={"run": key, "error": message[:500]})
        log.debug("bench_run_failed_traceback", extra={"traceback": traceback.format_exc()})
        self.errors[key] = message[-4000:]

    def close(self) -> None:
        self.status = "failed" if self.errors and not self.runs else "partial" if self.errors else "ok"


class Suite:
    """Runs the selected scenarios over one checkpoint on one device."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.workdir = options.workdir or options.out / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model, self.model_label = resolve(options.model, self.workdir, tiny=options.quick)
        self.scenarios = {name: Scenario() for name in SCENARIOS}
        self._reference = None

    def reference(self):
        """The transformers baseline, loaded once: the stack scenario times it again next to each stack's
        stream, so a machine others share is measured in the same minute on both sides of the ratio."""
        if self._reference is None:
            import torch

            from services.bench.baseline import TransformersBaseline

            if self.options.threads:
                torch.set_num_threads(self.options.threads)
            device = torch.device(self.options.device)
            self._reference = TransformersBaseline(self.model, device, self.options.torch_dtype)
        return self._reference

    def run(self) -> dict[str, object]:
        started = time.perf_counter()
        self.load_at_start = machine.describe()["load_average"]
        from services.bench import runs

        selected = set(self.options.scenarios)
        if "baseline" in selected:
            self._timed("baseline", lambda scenario: runs.baseline(self, scenario))
        stacked = [name for name in STACK_SCENARIOS if name in selected]
        speculation = "speculation" in selected
        for nodes in self.options.nodes if stacked else ():
            off = speculation and nodes == self.options.speculation_nodes
            runs.stack(self, nodes, stacked, speculation_off=off)
        if speculation:
            if self.options.speculation_nodes not in self.options.nodes or not stacked:
                runs.stack(self, self.options.speculation_nodes, [], speculation_off=True)
            runs.speculation_on(self)
        if "browser" in selected:
            self._timed("browser", lambda scenario: runs.browser(self, scenario))
        for name in selected:
            self.scenarios[name].close()
        return self.results(time.perf_counter() - started)

    def _timed(self, name: str, body: Callable[[Scenario], None]) -> None:
        scenario = self.scenarios[name]
        started = time.perf_counter()
        try:
            body(scenario)
        except Exception as error:  # a scenario that cannot even start fails alone
            scenario.fail("scenario", error)
        scenario.seconds = time.perf_counter() - started

    def results(self, seconds: float) -> dict[str, object]:
        from services.bench.ratios import ratios

        options = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self.options).items()}
        scenarios = {name: asdict(scenario) for name, scenario in self.scenarios.items()}
        return {
            "schema": SCHEMA,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": seconds,
            "machine": {**machine.describe(), "load_average_at_start": self.load_at_start},
            "model": {"path": self.model, "label": self.model_label},
            "options": options,
            "scenarios": scenarios,
            "ratios": ratios(scenarios),
        }
