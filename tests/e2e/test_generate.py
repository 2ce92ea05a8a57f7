"""Generate through every service as its own process; greedy tokens must equal transformers' generate()."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from services.common.pb import router_pb2
from services.tokenizer.tokenization import Tokenizer
from services.tokenizer.vocab import DEFAULT_CACHE_DIR
from tests.e2e.conftest import generate, greedy_reference, log_events, wait_for_pipeline

PROMPTS = [[15496, 11, 995], [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13], [50256]]
MAX_TOKENS = 12


def tokens_of(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [r.token_id for r in responses if r.HasField("token_id")]


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_greedy_tokens_equal_transformers(make_stack, reference, nodes: int) -> None:
    stack = make_stack(nodes)
    wait_for_pipeline(stack, nodes)
    for prompt in PROMPTS:
        responses = generate(
            stack.router_address, prompt_token_ids={"ids": prompt}, max_tokens=MAX_TOKENS, ignore_eos=True
        )
        assert tokens_of(responses) == greedy_reference(reference, prompt, MAX_TOKENS), f"prompt {prompt}"
        last = responses[-1]
        assert last.finish_reason == router_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == MAX_TOKENS


def test_text_prompt_streams_text_that_decodes_the_tokens(make_stack, reference) -> None:
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    tokenizer = Tokenizer.from_cache(DEFAULT_CACHE_DIR)
    prompt = "Synapse splits GPT-2 across devices"
    responses = generate(stack.router_address, prompt=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens = tokens_of(responses)
    assert tokens == greedy_reference(reference, tokenizer.encode(prompt), MAX_TOKENS)
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert all(r.timing.step_ms > 0 for r in responses)


def test_eight_concurrent_requests_each_match_transformers(make_stack, reference) -> None:
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    prompts = [[1000 + 37 * i, 200 + i, 7 * i + 3][: 1 + i % 3] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda prompt: tokens_of(
                    generate(
                        stack.router_address,
                        prompt_token_ids={"ids": prompt},
                        max_tokens=MAX_TOKENS,
                        ignore_eos=True,
                    )
                ),
                prompts,
            )
        )
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == greedy_reference(reference, prompt, MAX_TOKENS), f"prompt {prompt}"


def test_two_gateways_sharing_redis(make_stack, reference, redis_url: str) -> None:
    """Nodes on different gateways form one pipeline; activations cross from gateway to gateway."""
    stack = make_stack(2, gateways=2, redis_url=redis_url)
    topology = wait_for_pipeline(stack, 2)
    assert {stage.gateway_id for stage in topology.pipelines[0].stages} == {"gateway-0", "gateway-1"}
    for prompt in PROMPTS[:2]:
        responses = generate(
            stack.router_address, prompt_token_ids={"ids": prompt}, max_tokens=MAX_TOKENS, ignore_eos=True
        )
        assert tokens_of(responses) == greedy_reference(reference, prompt, MAX_TOKENS)


def test_bad_parameters_are_invalid_argument(make_stack) -> None:
    stack = make_stack(1)
    wait_for_pipeline(stack, 1)
    cases = [
        dict(prompt="hi", sampling={"temperature": -1.0}),
        dict(prompt="hi", sampling={"top_p": 1.5}),
        dict(prompt=""),
        dict(prompt_token_ids={"ids": [60000]}),
        dict(prompt="hi", max_tokens=10**6),
    ]
    for index, fields in enumerate(cases):
        with pytest.raises(grpc.RpcError) as caught:
            generate(stack.router_address, request_id=f"client-{index}", **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
    # The interceptor's line for each refusal carries the id the client chose, not one of its own.
    refusals = [record for record in log_events(stack, "router", "rpc_error") if record["method"] == "Generate"]
    assert [record["request_id"] for record in refusals] == [f"client-{index}" for index in range(len(cases))]


def test_no_nodes_is_unavailable_naming_missing_layers(make_stack) -> None:
    stack = make_stack(0, env={"SYNAPSE_ROUTER_PIPELINE_WAIT_S": "0.5"})
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack.router_address, prompt="hello", max_tokens=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "synapse node" in caught.value.details()


def test_a_long_prompt_in_chunks_gives_the_same_tokens(make_stack, reference) -> None:
    """Prompts longer than SYNAPSE_ROUTER_PREFILL_CHUNK go in several steps; the output does not change."""
    stack = make_stack(2, env={"SYNAPSE_ROUTER_PREFILL_CHUNK": "8"})
    wait_for_pipeline(stack, 2)
    prompt = [(7 * index + 3) % 50000 for index in range(37)]
    responses = generate(stack.router_address, prompt_token_ids={"ids": prompt}, max_tokens=6, ignore_eos=True)
    assert tokens_of(responses) == greedy_reference(reference, prompt, 6)
