"""Bad requests against a real stack: each gets its status and a message naming the field and its limit, and
the stack still serves the next normal request. Plus the public API's bearer tokens and per-client quota."""

from __future__ import annotations

import math
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import SynapseClient
from services.common.pb import router_pb2, router_pb2_grpc
from tests.e2e.conftest import generate, wait_for_pipeline
from tests.polling import eventually_sync

ACTIVE = "synapse_router_active_requests"
GOOD = dict(prompt_token_ids={"ids": [464, 2068]}, max_tokens=3, ignore_eos=True)
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (request fields, status, words the message must hold). The e2e model has a 256-token context and the
# last stage returns K = 64 candidates; the router takes prompts up to 100,000 characters, the tokenizer
# encodes up to 8192 tokens.
BAD_REQUESTS = {
    "temperature NaN": (dict(prompt="hi", sampling={"temperature": math.nan}), INVALID, "temperature"),
    "temperature inf": (dict(prompt="hi", sampling={"temperature": math.inf}), INVALID, "temperature"),
    "negative temperature": (dict(prompt="hi", sampling={"temperature": -1.0}), INVALID, "temperature"),
    "top_p above 1": (dict(prompt="hi", sampling={"top_p": 1.5}), INVALID, "top_p"),
    "min_p of 1": (dict(prompt="hi", sampling={"min_p": 1.0}), INVALID, "min_p"),
    "repetition_penalty NaN": (dict(prompt="hi", sampling={"repetition_penalty": math.nan}), INVALID, "repetition"),
    "presence_penalty 5": (dict(prompt="hi", sampling={"presence_penalty": 5.0}), INVALID, "presence_penalty"),
    "top_k above K": (
        dict(prompt="hi", sampling={"temperature": 0.8, "top_k": 100}), INVALID, "top_k 100 exceeds the 64",
    ),
    "top_logprobs above the limit": (dict(prompt="hi", sampling={"top_logprobs": 21}), INVALID, "top_logprobs"),
    "empty prompt": (dict(prompt=""), INVALID, "empty"),
    "id outside the vocabulary": (dict(prompt_token_ids={"ids": [60000]}), INVALID, "vocab_size 50257"),
    "max_tokens above the limit": (dict(prompt="hi", max_tokens=10**6), INVALID, "limit 4096"),
    "prompt + output over the context": (
        dict(prompt_token_ids={"ids": [1] * 200}, max_tokens=100), INVALID, "context of 256",
    ),
    "2,000,000-character prompt": (dict(prompt="x" * 2_000_000), INVALID, "the limit is 100000"),
    "9,000-token prompt": (
        dict(prompt="a" + " a" * 8999), INVALID, "tokenizer: text encodes to 9000 tokens; max_tokens is 8192",
    ),
    "17 stop strings": (dict(prompt="hi", stop=[str(n) for n in range(17)]), INVALID, "stop"),
    "an empty stop string": (dict(prompt="hi", stop=[""]), INVALID, "stop"),
}  # fmt: skip


def test_each_bad_request_gets_its_status_and_the_next_good_one_works(make_stack) -> None:
    stack = make_stack(1)
    wait_for_pipeline(stack, 1)
    for name, (fields, status, words) in BAD_REQUESTS.items():
        with pytest.raises(grpc.RpcError) as caught:
            generate(stack.router_address, **fields)
        assert caught.value.code() == status, (name, caught.value.details())
        assert words in caught.value.details(), (name, caught.value.details())
        tokens = [r.token_id for r in generate(stack.router_address, **GOOD) if r.HasField("token_id")]
        assert len(tokens) == 3, name


def test_api_tokens_guard_the_public_api(make_stack) -> None:
    stack = make_stack(1, env={"SYNAPSE_ROUTER_API_TOKENS": '["old-token", "new-token"]'})  # health stays open
    wait_for_pipeline_with_token = dict(metadata=(("authorization", "Bearer new-token"),))
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(**GOOD)
        for metadata in ((), (("authorization", "Bearer forged"),)):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, metadata=metadata, timeout=60))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError):
                stub.Topology(router_pb2.TopologyRequest(), metadata=metadata, timeout=10)
        _wait_ready(stub, **wait_for_pipeline_with_token)
        for token in ("old-token", "new-token"):
            responses = list(stub.Generate(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60))
            assert responses[-1].usage.completion_tokens == 3
    with SynapseClient(stack.router_address, token="old-token") as client:  # the library sends it too
        assert len(client.complete([464, 2068], max_tokens=3, ignore_eos=True)) > 0


def active_requests(stack) -> float:
    with urllib.request.urlopen(stack.process("router").metrics_url, timeout=5) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == ACTIVE)


def _wait_ready(stub: router_pb2_grpc.RouterServiceStub, **call: object) -> None:
    for _ in range(300):
        if stub.Topology(router_pb2.TopologyRequest(), timeout=10, **call).pipelines:
            return
        threading.Event().wait(0.2)
    raise AssertionError("no pipeline")


def test_streams_past_a_clients_limit_are_resource_exhausted(make_stack) -> None:
    """Two streams wait for a pipeline that never comes (no nodes); a third from the same client is refused."""
    env = {"SYNAPSE_ROUTER_MAX_STREAMS_PER_CLIENT": "2", "SYNAPSE_ROUTER_PIPELINE_WAIT_S": "8"}
    stack = make_stack(0, env=env)
    results: list[grpc.StatusCode] = []

    def waiting() -> None:
        with pytest.raises(grpc.RpcError) as caught:
            generate(stack.router_address, **GOOD)
        results.append(caught.value.code())

    holders = [threading.Thread(target=waiting) for _ in range(2)]
    for holder in holders:
        holder.start()
    eventually_sync(lambda: active_requests(stack) == 2, 20, "both holders waiting inside the router")
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack.router_address, **GOOD)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "SYNAPSE_ROUTER_MAX_STREAMS_PER_CLIENT" in caught.value.details()
    for holder in holders:
        holder.join(30)
    assert results == [grpc.StatusCode.UNAVAILABLE] * 2  # they waited their turn and were told why
    with pytest.raises(grpc.RpcError) as caught:  # the quota came back: refused for the pipeline, not the quota
        generate(stack.router_address, **GOOD)
    assert caught.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
