"""Untrusted nodes against a real stack: one that returns subtly wrong numbers is outvoted by the replicas
that recompute its steps and quarantined, one that never loads is planned around; streams stay exact."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import generate, greedy_reference, log_events, wait_for_pipeline
from tests.polling import eventually_sync

PROMPT = [464, 2068, 7586, 21831]


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def tokens_of(responses) -> list[int]:
    return [r.token_id for r in responses if r.HasField("token_id")]


def test_a_node_returning_wrong_numbers_is_outvoted_and_quarantined(make_stack, reference) -> None:
    """Three replicas of the whole model, every request verified: the liar loses 2 to 1 wherever it serves."""
    env = {"SYNAPSE_ROUTER_REPLICAS": "3", "SYNAPSE_ROUTER_VERIFY_FRACTION": "1.0"}
    stack = make_stack(0, env=env)
    for index in range(2):
        stack.add_node(f"honest-{index}")
    stack.add_node("liar", FAULT_INJECTION="wrong_numbers")
    wait_for_pipeline(stack, 1)
    eventually_sync(lambda: len(_pipelines(stack)) == 3, 90, "three one-stage replicas")
    request = dict(prompt_token_ids={"ids": PROMPT}, max_tokens=12, ignore_eos=True)
    for _ in range(3):  # the least loaded pipeline first: one of the three runs on the liar
        assert tokens_of(generate(stack.router_address, **request)) == greedy_reference(reference, PROMPT, 12)
    gateway = stack.process("gateway-0").metrics_url
    eventually_sync(lambda: metric(gateway, "synapse_gateway_quarantines_total", cause="disagreement") >= 1, 30,
                    "the liar quarantined")  # fmt: skip
    quarantined = log_events(stack, "gateway-0", "node_quarantined")
    assert {record["node"] for record in quarantined} == {"liar"}, quarantined
    assert metric(gateway, "synapse_gateway_verifications_total", outcome="agreed") >= 1
    assert metric(gateway, "synapse_gateway_verifications_total", outcome="outvoted") >= 1
    # The liar is refused at hello while quarantined; the honest replicas keep serving, exactly.
    eventually_sync(lambda: log_events(stack, "gateway-0", "node_refused"), 30, "the liar refused on rejoining")
    assert tokens_of(generate(stack.router_address, **request)) == greedy_reference(reference, PROMPT, 12)


def test_a_node_that_never_loads_is_planned_around(make_stack, reference) -> None:
    # Long enough for an honest node to load on a busy 2-core machine, short enough for a test.
    env = {"SYNAPSE_ROUTER_LOAD_DEADLINE_S": "25", "SYNAPSE_ROUTER_PIPELINE_WAIT_S": "60"}
    stack = make_stack(0, env=env)
    stack.add_node("stuck", FAULT_INJECTION="never_ready")
    stack.add_node("steady")
    wait_for_pipeline(stack, 1, timeout_s=120)  # after the deadline: re-planned onto the steady node alone
    request = dict(prompt_token_ids={"ids": PROMPT}, max_tokens=8, ignore_eos=True)
    assert tokens_of(generate(stack.router_address, **request)) == greedy_reference(reference, PROMPT, 8)
    timeouts = log_events(stack, "router", "node_load_timeout")
    assert [record["node"] for record in timeouts] == ["stuck"], timeouts


def _pipelines(stack) -> list:
    import grpc

    from services.common.pb import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(stack.router_address) as channel:
        topology = router_pb2_grpc.RouterServiceStub(channel).Topology(router_pb2.TopologyRequest(), timeout=5)
    return list(topology.pipelines)
