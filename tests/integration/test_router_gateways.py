"""The router's view of the gateways: found in Redis as they come and go, and nodes kept across a broken stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from services.common.nodes import NodeRecord
from services.gateway.servicer import GatewayServicer
from services.router.gateways import GatewayFollower
from tests.integration.gateway_fixtures import FakeNode, running_gateway
from tests.polling import eventually
from tests.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


class Seen:
    """What a follower reported: every record (with the stream it came on) and every gateway lost."""

    def __init__(self) -> None:
        self.records: list[tuple[NodeRecord, str]] = []
        self.lost: list[str] = []

    async def record(self, record: NodeRecord, source: str) -> None:
        self.records.append((record, source))

    async def gateway_lost(self, address: str) -> None:
        self.lost.append(address)

    def states(self, node_id: str) -> list[str]:
        return [record.state for record, _ in self.records if record.node_id == node_id]


@contextlib.asynccontextmanager
async def follow(redis_url: str | None, static: list[str] = ()) -> AsyncIterator[tuple[GatewayFollower, Seen]]:
    seen = Seen()
    follower = GatewayFollower(list(static), redis_url, 0.1, seen.record, seen.gateway_lost)
    follower.start()
    try:
        yield follower, seen
    finally:
        await follower.close()


@pytest.mark.timeout(60)
async def test_gateways_registered_in_redis_are_followed_as_they_come_and_go(redis_url: str) -> None:
    async with follow(redis_url) as (follower, seen):
        async with running_gateway(redis_url=redis_url, gateway_id="gw-a") as gateway_a:
            await eventually(lambda: follower.addresses == [gateway_a.address], 10, "gateway A followed")
            async with running_gateway(redis_url=redis_url, gateway_id="gw-b") as gateway_b:
                await eventually(lambda: len(follower.addresses) == 2, 10, "gateway B followed too")
                node = await FakeNode.join(gateway_b.ws_url, "on-b")
                await eventually(lambda: "joined" in seen.states("on-b"), 10, "the node on B seen")
                await node.close()
            # An orderly stop deregisters: dropped without waiting for the liveness key to expire.
            await eventually(lambda: follower.addresses == [gateway_a.address], 10, "gateway B dropped")
            assert gateway_b.address in seen.lost
        await eventually(lambda: follower.addresses == [], 15, "gateway A dropped")


@pytest.mark.timeout(60)
async def test_static_gateways_stay_followed_without_redis() -> None:
    async with running_gateway() as gateway, follow(None, [gateway.address]) as (follower, seen):
        node = await FakeNode.join(gateway.ws_url, "local")
        await eventually(lambda: "joined" in seen.states("local"), 10, "the node seen")
        assert follower.addresses == [gateway.address]
        await node.close()


@pytest.mark.timeout(60)
async def test_a_watch_stream_that_breaks_is_reopened_and_its_snapshot_arrives_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway stays up while its WatchNodes call fails once: the follower reports the loss, reconnects,
    and the snapshot brings the same record, from the node's own gateway (the router revives it: cluster.py)."""
    original = GatewayServicer.WatchNodes
    calls = 0

    async def breaks_once(self, request, context):
        nonlocal calls
        calls += 1
        async for event in original(self, request, context):
            yield event
            if calls == 1:
                raise RuntimeError("injected: the stream breaks while the gateway stays up")

    monkeypatch.setattr(GatewayServicer, "WatchNodes", breaks_once)
    async with running_gateway() as gateway:
        node = await FakeNode.join(gateway.ws_url, "steady")
        async with follow(None, [gateway.address]) as (_, seen):
            await eventually(lambda: len(seen.records) >= 2, 15, "the snapshot seen twice")
            assert seen.lost == [gateway.address]
            (first, first_source), (again, again_source) = seen.records[:2]
            assert first == again and first_source == again_source == first.gateway_address == gateway.address
        await node.close()
