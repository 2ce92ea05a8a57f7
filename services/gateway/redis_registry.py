"""The node registry in Redis, shared by several gateways: a hash of node records, a pub/sub channel of changes,
and a liveness key per gateway so the nodes of a gateway that died are marked gone by the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis

from services.common.errors import Unavailable
from services.common.nodes import NodeRecord
from services.gateway.registry import OFFENSE_MEMORY_S, describe_quarantine, quarantine_seconds
from services.wire.membership import EVENTS_CHANNEL, GATEWAY_KEY, NODES_KEY, OFFENSES_KEY, QUARANTINE_KEY

log = logging.getLogger(__name__)

LIVENESS_TTL_S = 6
LIVENESS_PERIOD_S = 2.0


class RedisRegistry:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_connect_timeout=5)
        self._liveness: asyncio.Task[None] | None = None
        self._gateway_id: str | None = None

    async def start(self, gateway_id: str, address: str) -> None:
        try:
            await self.client.ping()
        except (redis.ConnectionError, OSError) as error:
            raise Unavailable(
                f"cannot reach Redis at {self.url}: {error}; start redis-server or unset "
                "SYNAPSE_REDIS_URL to keep the registry in memory"
            ) from None
        self._gateway_id = gateway_id
        self._liveness = asyncio.create_task(self._keep_alive(gateway_id, address))
        log.info("registry_redis", extra={"url": self.url})

    async def close(self) -> None:
        """An orderly stop deregisters at once: the router stops watching this gateway without waiting
        for the liveness key to expire."""
        if self._liveness:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
        if self._gateway_id is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.client.delete(GATEWAY_KEY.format(self._gateway_id))
        await self.client.aclose()

    async def _keep_alive(self, gateway_id: str, address: str) -> None:
        """Refresh this gateway's liveness key; mark nodes of gateways whose key expired as gone."""
        while True:
            try:
                await self.client.set(GATEWAY_KEY.format(gateway_id), address, ex=LIVENESS_TTL_S)
                await self._reap_orphans()
            except (redis.RedisError, OSError) as error:
                log.warning("registry_redis_unreachable", extra={"error": str(error)})
            await asyncio.sleep(LIVENESS_PERIOD_S)

    async def _reap_orphans(self) -> None:
        for record in await self.all():
            if not await self.client.exists(GATEWAY_KEY.format(record.gateway_id)):
                log.info("node_orphaned", extra={"node": record.node_id, "gateway": record.gateway_id})
                await self.put(record.changed(state="gone"))

    async def put(self, record: NodeRecord) -> None:
        text = record.to_json()
        async with self.client.pipeline(transaction=True) as pipe:
            if record.state == "gone":
                pipe.hdel(NODES_KEY, record.node_id)
            else:
                pipe.hset(NODES_KEY, record.node_id, text)
            pipe.publish(EVENTS_CHANNEL, text)
            await pipe.execute()

    async def get(self, node_id: str) -> NodeRecord | None:
        text = await self.client.hget(NODES_KEY, node_id)
        return NodeRecord.from_json(text) if text else None

    async def all(self) -> list[NodeRecord]:
        values = await self.client.hvals(NODES_KEY)
        return [NodeRecord.from_json(text) for text in values]

    async def quarantine(self, node_id: str, reason: str, base_s: float, max_s: float) -> float:
        """Shared by every gateway: a quarantined node is refused wherever it tries to join."""
        offenses_key = OFFENSES_KEY.format(node_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(offenses_key)
            pipe.expire(offenses_key, int(OFFENSE_MEMORY_S))
            offenses, _ = await pipe.execute()
        seconds = quarantine_seconds(int(offenses), base_s, max_s)
        await self.client.set(QUARANTINE_KEY.format(node_id), reason, px=max(1, int(seconds * 1000)))
        return seconds

    async def quarantined(self, node_id: str) -> str | None:
        key = QUARANTINE_KEY.format(node_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            reason, remaining_ms = await pipe.execute()
        if reason is None or remaining_ms <= 0:
            return None
        return describe_quarantine(reason.decode(), remaining_ms / 1000)

    async def watch(self) -> AsyncIterator[NodeRecord]:
        """Every current node, then every change any gateway publishes."""
        pubsub = self.client.pubsub()
        await pubsub.subscribe(EVENTS_CHANNEL)  # before the snapshot, so no change falls between
        try:
            for record in await self.all():
                yield record
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield NodeRecord.from_json(message["data"])
        finally:
            await pubsub.aclose()
