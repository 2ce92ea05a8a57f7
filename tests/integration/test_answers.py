"""A node answers only for its own work: every answer checked against the step and the assignment; a node
that lies is quarantined (refused at hello for a backoff), counted, and its step fails so it is replayed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from websockets.asyncio.client import connect

from services.common.pb import common_pb2, gateway_pb2
from services.gateway.hub import CLOSE_QUARANTINED
from services.wire import syn1
from services.wire.steps import StepFailed
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    FakeNode,
    RunningGateway,
    closed_with,
    embed,
    head,
    hello,
    run_client,
    running_gateway,
    stage,
    token_step,
)
from tests.polling import eventually
from tests.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


CONFIG = common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64)
TOP_K = 2  # what `head` answers: top-2


async def assigned(gateway: RunningGateway, node_id: str, layers: tuple[int, int], compute: Callable) -> FakeNode:
    """A fake node, assigned `layers` of CONFIG through the gateway and ready."""
    node = await FakeNode.join(gateway.ws_url, node_id)
    request = gateway_pb2.AssignShardRequest(
        node_id=node_id, shard_id=f"s-{layers[0]}", top_k=TOP_K, activation_dtype=common_pb2.DTYPE_FLOAT32,
        config=CONFIG, layers=common_pb2.LayerRange(start=layers[0], end=layers[1]),
    )  # fmt: skip
    await gateway.stub.AssignShard(request, timeout=5)
    assert (await node.next_control())["kind"] == "assign"
    await node.send_json(kind="ready", shard_id=f"s-{layers[0]}", layers=list(layers))
    await eventually(lambda: gateway.hub.connections[node_id].record.state == "ready", 5, f"{node_id} ready")
    node.compute = compute
    return node


def other_request(frame: syn1.Frame) -> syn1.Frame:
    honest = head(frame)
    return syn1.Frame.output(frame.request_id + 1, honest.position, honest.array, honest.token_ids)


def nan_activation(frame: syn1.Frame) -> syn1.Frame:
    hidden = embed(frame).array.copy()
    hidden[0, 3] = np.nan
    return syn1.Frame.activation(frame.request_id, frame.position, hidden)


def narrow_activation(frame: syn1.Frame) -> syn1.Frame:
    return syn1.Frame.activation(frame.request_id, frame.position, embed(frame).array[:, :-1])


def wrong_position(frame: syn1.Frame) -> syn1.Frame:
    honest = head(frame)
    return syn1.Frame.output(frame.request_id, honest.position + 1, honest.array, honest.token_ids)


def ids_outside_vocabulary(frame: syn1.Frame) -> syn1.Frame:
    honest = head(frame)
    return syn1.Frame.output(frame.request_id, honest.position, honest.array, honest.token_ids + 5000)


LIES = {
    "another request's answer": ((1, 2), other_request, "OUTPUT request 5 position"),
    "NaN in activations": ((0, 1), nan_activation, "NaN or Inf"),
    "narrower activations": ((0, 1), narrow_activation, f"shape (1, {FAKE_HIDDEN - 1})"),
    "a position it was not asked": ((1, 2), wrong_position, "position 1"),
    "token ids outside the vocabulary": ((1, 2), ids_outside_vocabulary, "outside [0, 1000)"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("layers", "lie", "words"), list(LIES.values()), ids=list(LIES))
async def test_a_node_that_lies_is_quarantined_and_its_step_fails(layers, lie, words: str) -> None:
    async with running_gateway(quarantine_s=30.0) as gateway:
        liar = await assigned(gateway, "liar", layers, lie)
        honest = await assigned(gateway, "honest", (1, 2), head) if layers == (0, 1) else None
        route = [stage("liar", *layers)] + ([stage("honest", 1, 2)] if honest else [])
        async with run_client(gateway) as client:
            with pytest.raises(StepFailed) as failed:
                await client.step(token_step(route, 5, 0, [7]), 5)
        assert failed.value.node_id == "liar" and failed.value.node_gone, failed.value
        assert "quarantined" in str(failed.value) and words in str(failed.value), failed.value
        error = await liar.next_control()
        assert error["kind"] == "error" and "quarantined for 30 s" in error["message"], error
        await asyncio.wait_for(liar.websocket.wait_closed(), 5)
        assert liar.websocket.close_code == CLOSE_QUARANTINED
        # Refused at hello for the backoff, under the same id; other nodes go on.
        again = await _hello_refused(gateway, "liar")
        assert "quarantined for" in again and words in again
        if honest is not None:
            async with run_client(gateway) as client:
                result = await client.step(token_step([stage("honest", 1, 2)], 9, 0, [3]), 5)
            assert syn1.decode_frames(result.frames)[0].token_ids[0, 0] == 4


@pytest.mark.timeout(60)
async def test_an_honest_assigned_node_passes_every_check() -> None:
    async with running_gateway() as gateway:
        await assigned(gateway, "first", (0, 1), embed)
        await assigned(gateway, "last", (1, 2), head)
        async with run_client(gateway) as client:
            results = await asyncio.gather(
                client.step(token_step([stage("first", 0, 1), stage("last", 1, 2)], 1, 0, [4, 11]), 5),
                client.step(token_step([stage("first", 0, 1), stage("last", 1, 2)], 2, 6, [20]), 5),
            )
        outputs = [syn1.decode_frames(result.frames)[0] for result in results]
        assert [(o.request_id, o.position, int(o.token_ids[0, 0])) for o in outputs] == [(1, 1, 12), (2, 6, 21)]
        assert set(gateway.hub.connections) == {"first", "last"}


@pytest.mark.timeout(60)
async def test_quarantines_double_with_each_offense_and_hold_on_every_gateway_sharing_redis(redis_url: str) -> None:
    async with (
        running_gateway(redis_url=redis_url, gateway_id="q-a") as gateway_a,
        running_gateway(redis_url=redis_url, gateway_id="q-b") as gateway_b,
    ):
        registry = gateway_a.hub.registry
        durations = [await registry.quarantine("repeat", "lied", 30.0, 100.0) for _ in range(4)]
        assert durations == [30.0, 60.0, 100.0, 100.0]
        liar = await assigned(gateway_a, "liar", (1, 2), other_request)
        async with run_client(gateway_a) as client:
            with pytest.raises(StepFailed):
                await client.step(token_step([stage("liar", 1, 2)], 5, 0, [7]), 5)
        await asyncio.wait_for(liar.websocket.wait_closed(), 5)
        assert "quarantined for" in await _hello_refused(gateway_b, "liar")  # the other gateway refuses it too


async def _hello_refused(gateway: RunningGateway, node_id: str) -> str:
    websocket = await connect(gateway.ws_url, open_timeout=5, close_timeout=1)
    await websocket.send(json.dumps(hello(node_id)))
    received, code = await closed_with(websocket)
    assert code == 1008, (code, received)
    return received[0]["message"]
