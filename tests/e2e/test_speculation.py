"""Speculative decoding across the pipeline: prompt-lookup drafts checked in one pass; the output is exactly
what one-token-per-step decoding gives, greedy or seeded, and repetitive text takes fewer round trips."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import generate, greedy_reference, wait_for_pipeline

REPETITIVE = [464, 2068, 7586, 21831, 11, 464, 2068, 7586, 21831, 11, 464, 2068]
PLAIN = [15496, 11, 995]
SEEDED = dict(sampling={"temperature": 0.9, "top_k": 20, "seed": 11})


def tokens_of(responses) -> list[int]:
    return [r.token_id for r in responses if r.HasField("token_id")]


def counter(stack, name: str, **labels: str) -> float:
    with urllib.request.urlopen(stack.process("router").metrics_url, timeout=5) as response:
        text = response.read().decode()
    samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_speculation_keeps_the_output_and_saves_round_trips(make_stack, reference) -> None:
    plain = make_stack(2)
    speculative = make_stack(2, env={"SYNAPSE_ROUTER_SPECULATE_TOKENS": "4"})
    wait_for_pipeline(plain, 2)
    wait_for_pipeline(speculative, 2)
    for prompt in (REPETITIVE, PLAIN):
        request = dict(prompt_token_ids={"ids": prompt}, max_tokens=32, ignore_eos=True)
        spoken = tokens_of(generate(speculative.router_address, **request))
        assert spoken == greedy_reference(reference, prompt, 32), prompt
        seeded = {**request, **SEEDED}
        assert tokens_of(generate(speculative.router_address, **seeded)) == tokens_of(
            generate(plain.router_address, **seeded)
        )
    drafted = counter(speculative, "synapse_router_spec_draft_tokens_total")
    accepted = counter(speculative, "synapse_router_spec_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    # Fewer steps than tokens: each accepted draft token saved a round trip through both nodes.
    steps = counter(speculative, "synapse_router_step_seconds_count")
    generated = counter(speculative, "synapse_router_tokens_total", kind="generated")  # requests ran one by one
    assert steps < generated, (steps, generated)
    assert counter(plain, "synapse_router_spec_draft_tokens_total") == 0
