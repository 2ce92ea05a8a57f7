"""A node killed mid-generation: the stream goes on and equals an undisturbed run. Metrics after real traffic."""

from __future__ import annotations

import signal
import threading
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.pb import router_pb2, router_pb2_grpc
from tests.e2e.conftest import generate, greedy_reference, log_events, wait_for_pipeline

PROMPT = [464, 2068, 7586, 21831]


def test_node_killed_mid_generation_stream_finishes_identically(make_stack, reference) -> None:
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    # The first request starts the pipeline's scheduler: its id must not label the scheduler's own lines.
    generate(stack.router_address, prompt_token_ids={"ids": PROMPT}, max_tokens=2, request_id="warm-up")
    max_tokens = 48
    received: list[router_pb2.GenerateResponse] = []
    killed = threading.Event()
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(
            prompt_token_ids={"ids": PROMPT}, max_tokens=max_tokens, ignore_eos=True, request_id="client-7"
        )
        for response in stub.Generate(request, timeout=180):
            received.append(response)
            if len(received) == 5 and not killed.is_set():
                stack.stop_process(stack.process("node-1"), signal.SIGKILL)
                killed.set()
    tokens = [r.token_id for r in received if r.HasField("token_id")]
    assert killed.is_set()
    assert tokens == greedy_reference(reference, PROMPT, max_tokens)
    assert received[-1].usage.failovers >= 1
    assert received[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert {r.request_id for r in received} == {"client-7"}
    failed, failovers = log_events(stack, "router", "step_failed"), log_events(stack, "router", "request_failover")
    assert failed and all("request_id" not in record for record in failed), failed
    assert failovers and {record["request_id"] for record in failovers} == {"client-7"}, failovers


def test_node_joining_under_traffic_replans_and_every_stream_stays_identical(make_stack, reference) -> None:
    """A third node joins while requests run: the re-plan moves layers under them; they replay, unchanged."""
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    max_tokens = 40
    expected = greedy_reference(reference, PROMPT, max_tokens)
    finished: list[router_pb2.GenerateResponse] = []
    streams: list[list[int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with grpc.insecure_channel(stack.router_address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            request = router_pb2.GenerateRequest(
                prompt_token_ids={"ids": PROMPT}, max_tokens=max_tokens, ignore_eos=True
            )
            while not stop.is_set():
                responses = list(stub.Generate(request, timeout=180))
                streams.append([r.token_id for r in responses if r.HasField("token_id")])
                finished.append(responses[-1])

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        stack.add_node("node-late")
        wait_for_pipeline(stack, 3)
    finally:
        stop.set()
        worker.join(timeout=200)
    assert not worker.is_alive() and len(finished) > 1
    assert all(tokens == expected for tokens in streams)
    assert sum(last.usage.failovers for last in finished) >= 1, "no request was in flight during the re-plan"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert values, f"{name}{labels} not exported"
    return sum(values)


def test_metrics_after_real_traffic(make_stack) -> None:
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    for _ in range(2):
        generate(stack.router_address, prompt_token_ids={"ids": PROMPT}, max_tokens=6, ignore_eos=True)
    router = scrape(stack.process("router").metrics_url)
    assert metric(router, "synapse_router_requests_total", outcome="ok") == 2
    assert metric(router, "synapse_router_tokens_total", kind="generated") == 12
    assert metric(router, "synapse_router_time_to_first_token_seconds_count") == 2
    assert metric(router, "synapse_router_time_per_output_token_seconds_count") == 10
    assert metric(router, "synapse_router_step_overhead_seconds_count") >= 12
    assert metric(router, "synapse_router_pipelines") == 1
    gateway = scrape(stack.process("gateway-0").metrics_url)
    assert metric(gateway, "synapse_gateway_nodes_online", kind="native") == 2
    assert metric(gateway, "synapse_gateway_hop_round_trip_seconds_count") >= 24  # 12 steps x 2 hops
    for part in ("serialize", "queue", "network"):
        assert metric(gateway, "synapse_gateway_hop_overhead_seconds_count", part=part) >= 24
    per_token = metric(gateway, "synapse_gateway_hop_wire_bytes_per_token_sum", direction="from_node")
    assert per_token > 0
    assert metric(gateway, "synapse_grpc_server_handled_total", code="OK", method="AssignShard") >= 2
