"""A gateway whose Redis goes away and comes back (redis-server SIGKILLed, started again on its port): the
WatchNodes stream stays open and carries its nodes' changes, steps go on, joins are refused with 1013, and the
registry is rebuilt from the live connections, without the node that left meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import connect

from services.common.nodes import NodeRecord
from services.common.pb import common_pb2, gateway_pb2
from services.gateway.redis_registry import RedisRegistry
from services.wire.membership import NODES_KEY
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    FakeNode,
    closed_with,
    head,
    hello,
    running_gateway,
    watching,
)
from tests.integration.test_gateway import assert_serves
from tests.redis_server import RedisProcess

FAKE_CONFIG = common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64)


async def until_registered(registry: RedisRegistry, states: dict[str, str], timeout_s: float = 15.0) -> None:
    """Until Redis holds exactly these nodes in these states (it may not answer yet)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    found: dict[str, str] = {}
    while found != states:
        assert asyncio.get_running_loop().time() < deadline, f"Redis holds {found}, not {states}"
        with contextlib.suppress(redis.RedisError):
            records = map(NodeRecord.from_json, await registry.client.hvals(NODES_KEY))
            found = {record.node_id: record.state for record in records}
        await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_redis_away_and_back_the_gateway_keeps_its_nodes_and_rebuilds_the_registry(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        async with running_gateway(redis_url=server.url, gateway_id="gw-faults") as gateway:
            registry = gateway.hub.registry
            assert isinstance(registry, RedisRegistry)
            stays = await FakeNode.join(gateway.ws_url, "stays", compute=head)
            leaves = await FakeNode.join(gateway.ws_url, "leaves")
            async with watching(gateway) as watch:
                await watch.until("leaves", "joined")
                server.stop(signal.SIGKILL)
                # Redis away: a change of a connected node still reaches the watcher, and the node serves steps.
                request = gateway_pb2.AssignShardRequest(
                    node_id="stays",
                    shard_id="s",
                    top_k=2,
                    activation_dtype=common_pb2.DTYPE_FLOAT32,
                    config=FAKE_CONFIG,
                )
                request.layers.start, request.layers.end = 0, 2
                await gateway.stub.AssignShard(request, timeout=5)
                assert (await stays.next_control())["kind"] == "assign"
                await stays.send_json(kind="ready", shard_id="s", layers=[0, 2])
                await watch.until("stays", "ready", 10)
                await assert_serves(gateway, "stays")
                await leaves.close()
                await watch.until("leaves", "gone", 10)
                async with connect(gateway.ws_url, open_timeout=5, close_timeout=1) as websocket:
                    await websocket.send(json.dumps(hello("newcomer")))
                    received, code = await closed_with(websocket)
                    reason = websocket.close_reason or ""
                assert code == 1013 and reason.startswith("registry unavailable, try again later"), (code, reason)
                assert received[0]["kind"] == "error" and received[0]["fatal"]
                # Back, empty: the gateway writes its live node again (ready), the one that left stays out.
                server.start()
                await until_registered(registry, {"stays": "ready"})
                assert await registry.client.exists("synapse:gateway:gw-faults")
                newcomer = await FakeNode.join(gateway.ws_url, "newcomer")
                await watch.until("newcomer", "joined", 10)
                await assert_serves(gateway, "stays")
                assert watch.states("stays")[-1] == "ready"
                await newcomer.close()
            await stays.close()
    finally:
        server.stop()
