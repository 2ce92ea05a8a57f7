"""Generate through the whole stack (every service its own process) with browser pages as nodes.

Greedy tokens must be exactly those of transformers on the same random checkpoint: two pages as the two
stages, then one page next to a native node. float32 shards and activations, as tests/e2e does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.common.pb import router_pb2
from services.launcher import Stack
from tests.checkpoints import load_reference, make_random_checkpoint
from tests.e2e.conftest import EXACT_ENV, generate, greedy_reference, wait_for_pipeline
from tests.e2e.test_speculation import counter
from tests.webnode.conftest import NodePage, OpenPage, page_url

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

# GPT-2's real vocabulary (the tokenizer is real) on a small body.
SHAPE = dict(n_layer=4, n_head=4, n_embd=64, vocab_size=50257, n_positions=128)
PROMPTS = [[15496, 11, 995], [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13], [50256]]
MAX_TOKENS = 8
PAGE_SPEED = 3.0  # layer passes/s, about what the benchmark measures on SwiftShader; skips the benchmark


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=7, **SHAPE)


@pytest.fixture(scope="module")
def reference(checkpoint_dir: Path) -> torch.nn.Module:
    return load_reference(checkpoint_dir)


@pytest.fixture
def stack(checkpoint_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """Every service as a process, no native node (logs under <tmp_path>/stack/logs)."""
    stack = Stack(model=str(checkpoint_dir), workdir=tmp_path / "stack", nodes=0, env=dict(EXACT_ENV))
    with stack:
        yield stack


@pytest.fixture
def speculative_stack(checkpoint_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    """The same, with the router drafting up to 4 tokens a step (prompt lookup)."""
    env = {**EXACT_ENV, "SYNAPSE_ROUTER_SPECULATE_TOKENS": "4"}
    stack = Stack(model=str(checkpoint_dir), workdir=tmp_path / "stack", nodes=0, env=env)
    with stack:
        yield stack


def tokens_of(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [response.token_id for response in responses if response.HasField("token_id")]


async def join(open_page: OpenPage, stack: Stack, node_id: str) -> NodePage:
    page = await open_page(
        page_url(stack.gateway_ports[0][1], node_id=node_id, speed=PAGE_SPEED, join_token=stack.join_token)
    )
    await page.wait_for("s.state === 'joined' || s.state === 'loading' || s.state === 'ready'")
    return page


async def generate_and_compare(stack: Stack, reference, stages: int) -> None:
    topology = await asyncio.to_thread(wait_for_pipeline, stack, stages, 180.0)
    print("pipeline:", [(s.node_id, s.layers.start, s.layers.end) for s in topology.pipelines[0].stages])
    for prompt in PROMPTS:
        responses = await asyncio.to_thread(
            generate, stack.router_address, prompt_token_ids={"ids": prompt}, max_tokens=MAX_TOKENS, ignore_eos=True
        )
        assert tokens_of(responses) == greedy_reference(reference, prompt, MAX_TOKENS), f"prompt {prompt}"
        assert responses[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH


async def test_two_browser_pages_generate_the_greedy_tokens_of_transformers(
    open_page: OpenPage, stack: Stack, reference
) -> None:
    """Pages joined one after the other: the first may be re-planned from the whole model to a part of it,
    which it cuts from the shard it holds; neither page downloads a second shard."""
    pages = [await join(open_page, stack, f"web-{index}") for index in range(2)]
    await generate_and_compare(stack, reference, 2)
    states = [await page.state() for page in pages]
    for state in states:
        assert state["state"] == "ready" and state["stepsServed"] > 0, state
        assert state["downloads"] == 1, state
    layers = sorted(tuple(state["layers"]) for state in states)
    assert layers[0][0] == 0 and layers[-1][1] == SHAPE["n_layer"] and layers[0][1] == layers[1][0]


async def test_a_browser_page_and_a_native_node_generate_the_greedy_tokens_of_transformers(
    open_page: OpenPage, stack: Stack, reference
) -> None:
    page = await join(open_page, stack, "web-0")
    stack.add_node("native-0")
    await generate_and_compare(stack, reference, 2)
    state = await page.state()
    assert state["state"] == "ready" and state["stepsServed"] > 0, state
    assert 0 < state["layers"][1] - state["layers"][0] < SHAPE["n_layer"]


async def test_browser_pages_check_speculative_drafts_and_keep_the_greedy_tokens(
    open_page: OpenPage, speculative_stack: Stack, reference
) -> None:
    """Drafts through two pages: the first passes PREDICTED on with its activations, the last answers every
    row; the tokens stay transformers' and some drafts are accepted (fewer steps than tokens)."""
    stack = speculative_stack
    pages = [await join(open_page, stack, f"web-{index}") for index in range(2)]
    await generate_and_compare(stack, reference, 2)
    for page in pages:
        assert (await page.state())["stepsServed"] > 0
    accepted = counter(stack, "synapse_router_spec_accepted_tokens_total")
    assert accepted > 0, counter(stack, "synapse_router_spec_draft_tokens_total")
