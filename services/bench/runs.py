"""What each scenario runs: the single-process baselines, stacks of 1, 2 and 4 native nodes (one stream's token
time, concurrent streams, prefill), speculation on and off, and a browser node."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from services.bench import stack as through_stack
from services.bench.suite import PIPELINE_TIMEOUT_S, PROMPT, REPETITIVE, Scenario, Suite
from services.client import SynapseClient
from services.launcher import Stack

log = logging.getLogger(__name__)
WARMUP_TOKENS = 4


def baseline(suite: Suite, scenario: Scenario) -> None:
    import torch

    from services.bench.baseline import cuda_graph_rates, load_stage

    options = suite.options
    device, dtype = torch.device(options.device), options.torch_dtype
    if options.threads:
        torch.set_num_threads(options.threads)
    log.info("bench_baseline", extra={"model": suite.model, "device": str(device), "dtype": str(dtype)})

    model = scenario.attempt("transformers", suite.reference)
    if model is not None:
        del scenario.runs["transformers"]  # the model itself is no figure; its runs go under this key
        scenario.attempt(
            ("transformers", "decode_tokens_per_s"), lambda: model.decode_rate(PROMPT, options.tokens, options.repeats)
        )
        for n in options.streams:
            scenario.attempt(
                ("transformers", "streams", str(n)),
                lambda n=n: {"tokens_per_s": model.streams_rate(PROMPT, options.tokens, n, options.repeats)},
            )
        for length in options.prefill:
            scenario.attempt(
                ("transformers", "prefill", str(length)),
                lambda length=length: {"ms": model.prefill_ms(length, options.repeats)},
            )
    if device.type == "cuda":

        def cuda_graph() -> dict[str, object]:
            stage = load_stage(suite.model, device, dtype)
            rates = cuda_graph_rates(stage, options.streams, options.tokens)
            single = rates.get("1") or cuda_graph_rates(stage, [1], options.tokens)["1"]
            return {"decode_tokens_per_s": single, "streams": {n: {"tokens_per_s": r} for n, r in rates.items()}}

        scenario.attempt("cuda_graph", cuda_graph)


def _env(suite: Suite, speculate: int) -> tuple[dict[str, str], dict[str, str]]:
    """(every service's, the nodes') environment for a stack of this run."""
    options = suite.options
    env = {
        "SYNAPSE_ROUTER_SPECULATE_TOKENS": str(speculate),
        "SYNAPSE_ROUTER_MAX_STREAMS_PER_CLIENT": str(max(options.streams) + 8),
    }
    node_env = {"SYNAPSE_NODE_DEVICE": options.device, "SYNAPSE_NODE_COMPUTE_DTYPE": options.dtype}
    if options.threads:
        node_env["SYNAPSE_NODE_THREADS"] = str(options.threads)
    return env, node_env


@contextlib.contextmanager
def _stack(suite: Suite, name: str, nodes: int, speculate: int = 0) -> Iterator[tuple[Stack, SynapseClient]]:
    env, node_env = _env(suite, speculate)
    log.info("bench_stack_starting", extra={"stack": name, "nodes": nodes, "speculate": speculate})
    with (
        through_stack.running_stack(suite.model, suite.workdir, name, nodes=nodes, env=env, node_env=node_env) as s,
        SynapseClient(s.router_address) as client,
    ):
        if nodes:
            through_stack.wait_for_pipeline(s, client, _stages(suite, nodes), PIPELINE_TIMEOUT_S)
            _warm_up(client)
        yield s, client


def _stages(suite: Suite, nodes: int) -> int:
    import json
    from pathlib import Path

    config = Path(suite.model) / "config.json"
    n_layer = json.loads(config.read_text()).get("n_layer", nodes) if config.is_file() else nodes
    return min(nodes, n_layer)


def _warm_up(client: SynapseClient) -> None:
    for prompt in (PROMPT, REPETITIVE):
        for _ in client.generate(prompt, max_tokens=WARMUP_TOKENS, ignore_eos=True):
            pass


def stack(suite: Suite, nodes: int, measurements: list[str], *, speculation_off: bool) -> None:
    """One stack of `nodes` native nodes, running the measurements of each scenario asked for."""
    key = str(nodes)
    scenarios = [suite.scenarios[name] for name in measurements]
    speculation = suite.scenarios["speculation"]
    options = suite.options
    try:
        with _stack(suite, f"stack-{nodes}-nodes", nodes) as (running, client):
            if "stack" in measurements:
                run = suite.scenarios["stack"].attempt(
                    key, lambda: through_stack.single_stream(running, client, PROMPT, options.tokens)
                )
                if run is not None:  # the single process again, right after the stream: the same minute's load
                    suite.scenarios["stack"].attempt(
                        (key, "single_process_decode_tokens_per_s"),
                        lambda: suite.reference().decode_rate(PROMPT, options.tokens, options.repeats),
                    )
            if "prefill" in measurements:
                vocab = client.topology().config.vocab_size
                for length in options.prefill:
                    suite.scenarios["prefill"].attempt(
                        (key, str(length)), lambda length=length: through_stack.prefill(client, length, vocab)
                    )
            if "streams" in measurements:
                for count in options.streams:
                    suite.scenarios["streams"].attempt(
                        (key, str(count)),
                        lambda count=count: through_stack.concurrent_streams(
                            running.router_address, PROMPT, options.tokens, count
                        ),
                    )
            if speculation_off:
                _speculation_runs(speculation, "off", running, client, options.tokens)
    except Exception as error:  # the stack did not start (or died): every run it was for failed with it
        for scenario in scenarios + ([speculation] if speculation_off else []):
            scenario.fail(key if scenario is not speculation else "off", error)


def _speculation_runs(scenario: Scenario, key: str, running: Stack, client: SynapseClient, tokens: int) -> None:
    for name, prompt in (("repetitive", REPETITIVE), ("plain", PROMPT)):
        scenario.attempt(
            (key, name), lambda prompt=prompt: through_stack.speculative_stream(running, client, prompt, tokens)
        )


def speculation_on(suite: Suite) -> None:
    options = suite.options
    scenario = suite.scenarios["speculation"]
    nodes = options.speculation_nodes
    try:
        with _stack(suite, f"stack-{nodes}-nodes-speculating", nodes, options.speculate_tokens) as (running, client):
            _speculation_runs(scenario, "on", running, client, options.tokens)
    except Exception as error:  # the stack did not start: the "on" runs failed with it
        scenario.fail("on", error)


def browser(suite: Suite, scenario: Scenario) -> None:
    """No native node: one page in headless Chromium holds every layer."""
    from services.bench.browser import browser_node

    with _stack(suite, "stack-browser", 0) as (running, client), browser_node(running):
        through_stack.wait_for_pipeline(running, client, 1, PIPELINE_TIMEOUT_S)
        for _ in client.generate(PROMPT, max_tokens=2, ignore_eos=True):  # warm-up: the page builds pipelines
            pass
        scenario.attempt(
            "page", lambda: through_stack.single_stream(running, client, PROMPT, suite.options.browser_tokens)
        )
