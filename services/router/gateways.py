"""The gateways the router follows: a fixed list, and with Redis every gateway that registers itself there.

One WatchNodes stream per gateway, reconnected when it breaks. A gateway whose liveness key expires
(or that deregistered on an orderly stop) is dropped, and so are the nodes it reported. While Redis is
away, and for a liveness TTL after it is back, every gateway followed stays followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc
import redis.asyncio as redis

from services.common.node_status import node_from_event
from services.common.nodes import NodeRecord
from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.common.server import channel
from services.wire.membership import LIVENESS_TTL_S, live_gateways

log = logging.getLogger(__name__)

RECONNECT_S = 1.0


class GatewayFollower:
    def __init__(
        self,
        static: list[str],
        redis_url: str | None,
        discovery_period_s: float,
        on_record: Callable[[NodeRecord, str], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
    ) -> None:
        self.static, self.redis_url, self.discovery_period_s = list(static), redis_url, discovery_period_s
        self._on_record, self._on_lost = on_record, on_lost
        self._stubs: dict[str, gateway_pb2_grpc.GatewayServiceStub] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._discovery: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        """Every gateway followed now."""
        return sorted(self._watches)

    def stub(self, address: str) -> gateway_pb2_grpc.GatewayServiceStub:
        if address not in self._stubs:
            self._stubs[address] = gateway_pb2_grpc.GatewayServiceStub(channel(address))
        return self._stubs[address]

    def start(self) -> None:
        for address in self.static:
            self._follow(address)
        if self.redis_url:
            self._discovery = asyncio.create_task(self._discover(redis.Redis.from_url(self.redis_url)))

    async def close(self) -> None:
        tasks = [*self._watches.values(), *([self._discovery] if self._discovery else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _follow(self, address: str) -> None:
        if address not in self._watches:
            log.info("gateway_followed", extra={"gateway": address})
            self._watches[address] = asyncio.create_task(self._watch(address))

    async def _unfollow(self, address: str) -> None:
        task = self._watches.pop(address)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("gateway_dropped", extra={"gateway": address})
        await self._on_lost(address)

    async def _watch(self, address: str) -> None:
        """Follow one gateway's node events for as long as it is followed, reconnecting when the stream breaks."""
        while True:
            try:
                async for event in self.stub(address).WatchNodes(gateway_pb2.WatchNodesRequest()):
                    await self._on_record(node_from_event(event), address)
            except grpc.aio.AioRpcError as error:
                log.warning("gateway_watch_broken", extra={"gateway": address, "code": error.code().name})
            await self._on_lost(address)
            await asyncio.sleep(RECONNECT_S)

    async def _discover(self, client: redis.Redis) -> None:
        """Poll the gateways' liveness keys: follow each new one, drop each that is gone (static ones stay).

        Redis away, or back as a new server (its run_id changed: restarted empty), says nothing about the
        gateways: every one followed is kept for a liveness TTL after, while they register again."""
        server: str | None = None
        hold_until = 0.0  # loop time before which no gateway is dropped
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    run_id = str((await client.info("server")).get("run_id", ""))
                    live = set((await live_gateways(client)).values())
                except (redis.RedisError, OSError) as error:
                    if loop.time() >= hold_until:
                        log.warning("gateway_discovery_failed", extra={"error": str(error)})
                    hold_until = loop.time() + LIVENESS_TTL_S
                else:
                    if server is not None and run_id != server:
                        log.info("gateway_discovery_redis_restarted", extra={"hold_s": LIVENESS_TTL_S})
                        hold_until = loop.time() + LIVENESS_TTL_S
                    server = run_id
                    for address in sorted(live - set(self._watches)):
                        self._follow(address)
                    if loop.time() >= hold_until:
                        for address in sorted(set(self._watches) - live - set(self.static)):
                            await self._unfollow(address)
                await asyncio.sleep(self.discovery_period_s)
        finally:
            await client.aclose()
