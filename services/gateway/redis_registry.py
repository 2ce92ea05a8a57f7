"""The node registry in Redis, shared by several gateways: a hash of node records, a pub/sub channel of changes,
and a liveness key per gateway so the nodes of a gateway that died are marked gone by the others.

Redis may go away after start-up (a restart, a partition). This gateway's own nodes are then kept here: their
changes still reach this gateway's watchers (the router keeps its view and the nodes keep serving steps), and
when Redis answers again with this gateway's liveness key missing (restarted empty, or expired while away) the
registry is rebuilt from them: the liveness key, every connected node (a newer version, so it beats a `gone`
another gateway's reaper wrote meanwhile), and `gone` for this gateway's records of nodes no longer here.
What needs Redis itself (is a joining node quarantined?) raises RegistryUnavailable meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis

from services.common.errors import Unavailable
from services.common.nodes import NodeRecord
from services.gateway.registry import (
    OFFENSE_MEMORY_S,
    RegistryUnavailable,
    describe_quarantine,
    quarantine_seconds,
)
from services.wire.membership import (
    EVENTS_CHANNEL,
    GATEWAY_KEY,
    LIVENESS_PERIOD_S,
    LIVENESS_TTL_S,
    NODES_KEY,
    OFFENSES_KEY,
    QUARANTINE_KEY,
)

log = logging.getLogger(__name__)

WATCH_RETRY_S = 1.0  # a watcher's wait before it subscribes again after Redis went away
REDIS_ERRORS = (redis.RedisError, OSError)


class RedisRegistry:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_connect_timeout=5)
        self._liveness: asyncio.Task[None] | None = None
        self._gateway_id: str | None = None
        self._own: dict[str, NodeRecord] = {}  # this gateway's live nodes, as last put: what a rebuild writes
        self._watchers: set[asyncio.Queue[NodeRecord]] = set()
        self._stale = False  # a write failed: Redis lacks some of this gateway's changes until the next rebuild
        self._address = ""
        self._registering = asyncio.Lock()  # one rebuild at a time

    async def start(self, gateway_id: str, address: str) -> None:
        try:
            await self.client.ping()
        except REDIS_ERRORS as error:
            raise Unavailable(
                f"cannot reach Redis at {self.url}: {error}; start redis-server or unset "
                "SYNAPSE_REDIS_URL to keep the registry in memory"
            ) from None
        self._gateway_id, self._address = gateway_id, address
        self._liveness = asyncio.create_task(self._keep_alive())
        log.info("registry_redis", extra={"url": self.url})

    async def close(self) -> None:
        """An orderly stop deregisters at once: the router stops watching this gateway without waiting
        for the liveness key to expire."""
        if self._liveness:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
        if self._gateway_id is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.delete(GATEWAY_KEY.format(self._gateway_id))
        await self.client.aclose()

    async def _keep_alive(self) -> None:
        """Refresh this gateway's liveness key (rebuilding when Redis lost it); mark orphaned nodes as gone."""
        unreachable = False
        while True:
            try:
                await self._register()
                if unreachable:
                    log.info("registry_redis_back", extra={"url": self.url, "nodes": len(self._own)})
                    unreachable = False
                await self._reap_orphans()
            except REDIS_ERRORS as error:
                if not unreachable:
                    log.warning("registry_redis_unreachable", extra={"url": self.url, "error": str(error)})
                unreachable = self._stale = True
            await asyncio.sleep(LIVENESS_PERIOD_S)

    async def _register(self) -> None:
        """The liveness key; and the whole rebuild when Redis had lost it or missed a write."""
        async with self._registering:
            key = GATEWAY_KEY.format(self._gateway_id)
            previous = await self.client.set(key, self._address, ex=LIVENESS_TTL_S, get=True)
            if previous is None or self._stale:
                await self._rebuild(lost=previous is None)

    async def _rebuild(self, lost: bool) -> None:
        """Write every node of this gateway again (newer versions) and drop its records of nodes gone since."""
        self._stale = True  # until every write below went through
        here = set(self._own)
        for record in await self.all():
            if record.gateway_id == self._gateway_id and record.node_id not in here:
                await self._write(record.changed(state="gone"))
        for node_id in sorted(here):
            if (record := self._own.get(node_id)) is not None:
                record = self._own[node_id] = record.changed()
                self._publish_here(record)
                await self._write(record)
        self._stale = False
        log.info("registry_rebuilt", extra={"nodes": len(here), "key_lost": lost})

    async def _reap_orphans(self) -> None:
        for record in await self.all():
            if not await self.client.exists(GATEWAY_KEY.format(record.gateway_id)):
                log.info("node_orphaned", extra={"node": record.node_id, "gateway": record.gateway_id})
                await self.put(record.changed(state="gone"))

    async def put(self, record: NodeRecord) -> None:
        """A record of this gateway's own nodes is kept even when Redis is away (written again when it is back);
        one of another gateway's nodes (an orphan reaped) raises RegistryUnavailable then."""
        if record.gateway_id == self._gateway_id:
            if record.live:
                self._own[record.node_id] = record
            else:
                self._own.pop(record.node_id, None)
        self._publish_here(record)
        try:
            if self._stale and record.gateway_id == self._gateway_id:
                # Redis is back before the next refresh: the key and every node first (this one among them),
                # so no other gateway's reaper finds a node of this gateway without its liveness key.
                await self._register()
            else:
                await self._write(record)
        except REDIS_ERRORS as error:
            if record.gateway_id != self._gateway_id:
                raise RegistryUnavailable(f"cannot write node {record.node_id} to Redis: {error}") from None
            if not self._stale:
                log.warning("registry_write_deferred", extra={"node": record.node_id, "error": str(error)})
            self._stale = True

    async def _write(self, record: NodeRecord) -> None:
        text = record.to_json()
        async with self.client.pipeline(transaction=True) as pipe:
            if record.state == "gone":
                pipe.hdel(NODES_KEY, record.node_id)
            else:
                pipe.hset(NODES_KEY, record.node_id, text)
            pipe.publish(EVENTS_CHANNEL, text)
            await pipe.execute()

    def _publish_here(self, record: NodeRecord) -> None:
        """This gateway's watchers hear its changes without Redis (and again through it: readers keep the
        newest version, so the copy is harmless)."""
        for queue in self._watchers:
            queue.put_nowait(record)

    async def get(self, node_id: str) -> NodeRecord | None:
        text = await self.client.hget(NODES_KEY, node_id)
        return NodeRecord.from_json(text) if text else None

    async def all(self) -> list[NodeRecord]:
        values = await self.client.hvals(NODES_KEY)
        return [NodeRecord.from_json(text) for text in values]

    async def quarantine(self, node_id: str, reason: str, base_s: float, max_s: float) -> float:
        """Shared by every gateway: a quarantined node is refused wherever it tries to join."""
        offenses_key = OFFENSES_KEY.format(node_id)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(offenses_key)
                pipe.expire(offenses_key, int(OFFENSE_MEMORY_S))
                offenses, _ = await pipe.execute()
            seconds = quarantine_seconds(int(offenses), base_s, max_s)
            await self.client.set(QUARANTINE_KEY.format(node_id), reason, px=max(1, int(seconds * 1000)))
        except REDIS_ERRORS as error:
            raise RegistryUnavailable(f"cannot record the quarantine of node {node_id} in Redis: {error}") from None
        return seconds

    async def quarantined(self, node_id: str) -> str | None:
        key = QUARANTINE_KEY.format(node_id)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                reason, remaining_ms = await pipe.execute()
        except REDIS_ERRORS as error:
            raise RegistryUnavailable(f"cannot check node {node_id} against the quarantine in Redis: {error}") from None
        if reason is None or remaining_ms <= 0:
            return None
        return describe_quarantine(reason.decode(), remaining_ms / 1000)

    async def watch(self) -> AsyncIterator[NodeRecord]:
        """This gateway's nodes, then every current node and every change any gateway publishes; while Redis
        is away, this gateway's own changes, and the whole snapshot again once it is back."""
        queue: asyncio.Queue[NodeRecord] = asyncio.Queue()
        for record in list(self._own.values()):
            queue.put_nowait(record)
        self._watchers.add(queue)
        relay = asyncio.create_task(self._relay(queue))
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def _relay(self, queue: asyncio.Queue[NodeRecord]) -> None:
        """Redis's snapshot and channel into one watcher's queue, subscribing again whenever Redis went away."""
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)  # before the snapshot, so no change falls between
                for record in await self.all():
                    queue.put_nowait(record)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        queue.put_nowait(NodeRecord.from_json(message["data"]))
            except REDIS_ERRORS as error:
                log.info("watch_redis_lost", extra={"error": str(error), "retry_s": WATCH_RETRY_S})
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(WATCH_RETRY_S)
