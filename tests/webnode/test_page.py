"""The web node page in headless Chromium against a real gateway and a real sharder (both in-process): numerics.

Everything goes through the real protocol: AssignShard over the gateway's gRPC, steps over its Run stream.
Each stage's output is checked against the PyTorch reference; then the IndexedDB cache, and shards cut from a
held one instead of downloaded. Bad input is in test_page_failures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.pb import common_pb2
from services.wire import syn1
from tests.checkpoints import load_reference
from tests.integration.gateway_fixtures import RunningGateway
from tests.webnode.conftest import SHAPE, OpenPage, page_url
from tests.webnode.page_steps import (
    FAST,
    MAX_RELATIVE_ERROR,
    TOP_K,
    Scenario,
    assign,
    assign_and_wait,
    plan,
    reference_stage,
    relative_error,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


# ---- numerics -------------------------------------------------------------------------------------


async def test_hello_reports_benchmark_and_adapter(open_page: OpenPage, gateway: RunningGateway) -> None:
    """Without ?speed= the page runs its benchmark; hello carries it, the adapter and the probed memory."""
    page = await open_page(page_url(gateway.ws_port, node_id="web-hello"))
    state = await page.wait_for("s.state === 'joined'", 120)
    assert state["speed"] > 0 and state["memoryBytes"] >= 16 << 20
    assert state["cpu"] == ("swiftshader" in state["device"]), "SwiftShader is a fallback (CPU) adapter"
    record = gateway.hub.connections["web-hello"].record
    assert record.kind == "web" and record.device.startswith("WebGPU") and record.device == state["device"]
    assert record.speed == pytest.approx(state["speed"]) and record.memory_bytes == state["memoryBytes"]
    text = await page.page.inner_text("body")
    assert "Joined" in text and "web-hello" in text and "layer passes/s" in text


async def test_every_stage_matches_pytorch(open_page: OpenPage, gateway, sharder, client) -> None:
    """First, middle and last stage of a 3-stage plan on one page: activations, full logits, top-K, wire dtypes."""
    node = "web-stages"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    first, middle, last = await plan(sharder, 3)
    assert first.layers.start == 0 and last.layers.end == SHAPE["n_layer"] and middle.layers.start > 0
    rng = np.random.default_rng(5)
    errors = {}
    for name, assignment in (("first", first), ("middle", middle)):
        state = await assign_and_wait(page, gateway, node, assignment, top_k=0)
        assert state["layers"] == [assignment.layers.start, assignment.layers.end]
        scenario = Scenario(client, node, reference_stage(sharder, assignment))
        pairs = await scenario.run(100, rng)
        for frame, _ in pairs:
            assert frame.msg_type is syn1.MessageType.ACTIVATION and frame.array.dtype == np.float32
        errors[name] = max(relative_error(frame.to_float32(), expected) for frame, expected in pairs)

    await assign_and_wait(page, gateway, node, last, top_k=0)
    scenario = Scenario(client, node, reference_stage(sharder, last))
    pairs = await scenario.run(200, rng)
    for frame, _ in pairs:
        assert frame.msg_type is syn1.MessageType.LOGITS and frame.array.shape == (1, SHAPE["vocab_size"])
    errors["last, logits"] = max(relative_error(frame.to_float32(), expected) for frame, expected in pairs)

    await assign_and_wait(page, gateway, node, last, top_k=TOP_K)  # same shard: nothing reloaded
    scenario = Scenario(client, node, reference_stage(sharder, last))
    for frame, expected in await scenario.run(300, rng):
        assert frame.msg_type is syn1.MessageType.OUTPUT and frame.array.shape == (1, TOP_K)
        values, ids = torch.topk(expected[0], TOP_K)
        assert frame.token_ids[0].tolist() == ids.tolist()
        errors["last, top-k"] = max(errors.get("last, top-k", 0.0), relative_error(frame.to_float32()[0], values))
    print("max relative errors against GPT2Stage (float32, same f16 weights):", errors)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors
    assert (await page.state())["downloads"] == 3, "a re-assigned shard that is loaded is not fetched again"

    # Wire dtypes of the activations a stage sends on: f16 and int8 round what f32 sends.
    for dtype, tolerance in ((common_pb2.DTYPE_FLOAT16, 2e-3), (common_pb2.DTYPE_INT8, 1 / 127)):
        await assign_and_wait(page, gateway, node, first, top_k=0, dtype=dtype)
        scenario = Scenario(client, node, reference_stage(sharder, first))
        frame, expected = (await scenario.step({400 + dtype: [5, 6, 7, 8]}))[0]
        assert frame.array.dtype == (np.float16 if dtype == common_pb2.DTYPE_FLOAT16 else np.int8)
        assert relative_error(frame.to_float32(), expected) <= tolerance


async def test_whole_model_in_pieces_matches_transformers(
    open_page: OpenPage, gateway, sharder, client, checkpoint_dir: Path
) -> None:
    """One shard [0, n_layer) with wte bound in 4 pieces: logits and greedy tokens of transformers.

    With cpu=0 the page picks kernels as on a GPU: the 25-row prefill takes the tiled matmul, decode matvec.
    """
    node = "web-whole"
    page = await open_page(page_url(gateway.ws_port, node_id=node, max_binding_mib=4, cpu=0, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    await assign_and_wait(page, gateway, node, whole, top_k=0)
    model = load_reference(checkpoint_dir)
    model.load_state_dict({name: t.half().float() for name, t in model.state_dict().items()})  # the shard's f16
    scenario = Scenario(client, node, reference_stage(sharder, whole))
    sequences = {1: [464, 2068, 7586, 21831], 2: [50256], 3: [(index * 997) % 50257 for index in range(20)]}
    worst = 0.0
    for _ in range(4):  # prefill both, then 3 greedy decode steps, batched
        new = {rid: tokens[scenario.lengths.get(rid, 0) :] for rid, tokens in sequences.items()}
        for frame, _expected in await scenario.step(new):
            tokens = sequences[frame.request_id]
            with torch.no_grad():
                expected = model(torch.tensor([tokens])).logits[0, -1]
            worst = max(worst, relative_error(frame.to_float32()[0], expected))
            tokens.append(int(np.argmax(frame.to_float32()[0])))
            assert tokens[-1] == int(torch.argmax(expected))
    print(f"whole model, wte in 4 pieces: max relative logit error {worst:.2e} against transformers")
    assert worst <= MAX_RELATIVE_ERROR


# ---- the IndexedDB cache --------------------------------------------------------------------------


async def test_reload_takes_the_shard_from_indexeddb(open_page: OpenPage, gateway, sharder, client) -> None:
    node = "web-cache"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    state = await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    assert state["downloads"] == 1 and state["cacheHits"] == 0
    assert len(page.shard_requests()) == 1
    seen = len(page.requests)

    await page.page.reload()
    await page.wait_for("s.state === 'joined'")
    state = await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    assert state["downloads"] == 0 and state["cacheHits"] == 1
    after = page.requests[seen:]
    assert not [url for url in after if ".safetensors" in url or "/shards/" in url], after
    assert any(url.endswith("/js/main.js") for url in after), "the reload did load the page again"
    pairs = await Scenario(client, node, reference_stage(sharder, whole)).run(500)
    for frame, expected in pairs:
        assert frame.token_ids[0].tolist() == torch.topk(expected[0], TOP_K).indices.tolist()


# ---- a narrower shard cut from the held one ---------------------------------------------------------


async def test_a_replan_inside_the_held_shard_cuts_it_and_downloads_nothing(
    open_page: OpenPage, gateway, sharder, client
) -> None:
    """Held [0, 4), re-planned to [0, 2): the page cuts the new shard from the old (its sha256 checked) and the
    stage matches PyTorch. [2, 4) is not inside [0, 2), the shard it holds by then: that one is downloaded."""
    node = "web-cut"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    first, last = await plan(sharder, 2)
    await assign_and_wait(page, gateway, node, whole, top_k=TOP_K)
    state = await assign_and_wait(page, gateway, node, first, top_k=0)
    assert (state["downloads"], state["cuts"], state["layers"]) == (1, 1, [0, first.layers.end])
    assert [url.split("?")[0] for url in page.shard_requests()] == [whole.shard_url]
    pairs = await Scenario(client, node, reference_stage(sharder, first)).run(600)
    assert max(relative_error(frame.to_float32(), expected) for frame, expected in pairs) <= MAX_RELATIVE_ERROR

    state = await assign_and_wait(page, gateway, node, last, top_k=TOP_K)
    assert (state["downloads"], state["cuts"]) == (2, 1)
    assert page.shard_requests()[-1].split("?")[0] == last.shard_url


async def test_a_replan_while_loading_lets_the_download_finish_and_cuts_from_it(
    open_page: OpenPage, gateway, sharder
) -> None:
    """[0, 4) assigned, then at once [2, 4) (as the router re-plans when a second page joins): one download."""
    node = "web-cut-loading"
    page = await open_page(page_url(gateway.ws_port, node_id=node, **FAST))
    await page.wait_for("s.state === 'joined'")
    (whole,) = await plan(sharder, 1)
    _, last = await plan(sharder, 2)
    await assign(gateway, node, whole, top_k=TOP_K)
    await assign(gateway, node, last, top_k=TOP_K)
    state = await page.wait_for(f"s.state === 'ready' && s.layers[0] === {last.layers.start}", 120)
    assert (state["downloads"], state["cuts"], state["loads"]) == (1, 1, 1), state
    assert [url.split("?")[0] for url in page.shard_requests()] == [whole.shard_url]
