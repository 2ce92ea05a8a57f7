"""The router's view of the cluster: node events from every gateway, re-planning with hysteresis, pipelines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

import grpc

from services.common.errors import Unavailable
from services.common.gpt2.config import GPT2Config
from services.common.model_config_pb import model_config_from_pb
from services.common.nodes import NodeRecord
from services.common.pb import common_pb2, sharder_pb2, sharder_pb2_grpc
from services.common.server import channel
from services.router import metrics
from services.router.gateways import GatewayFollower
from services.router.planner import LoadWatch, capped, replica_groups
from services.router.settings import RouterSettings
from services.router.topology import Pipeline, build_pipelines, describe_missing
from services.wire.control import Assign
from services.wire.convert import assign_to_pb

log = logging.getLogger(__name__)

LOCAL_GATEWAY = "127.0.0.1:50055"  # followed when no gateway is listed and no Redis is set


class Cluster:
    """Keeps nodes, the plan and the pipelines current; wakes waiters when pipelines change."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.nodes: dict[str, NodeRecord] = {}
        self.pipelines: list[Pipeline] = []
        self.model_id = settings.model
        self.config: GPT2Config | None = None
        self.changed = asyncio.Condition()
        self._sharder = sharder_pb2_grpc.ShardServiceStub(channel(settings.sharder_address))
        static = settings.gateways or ([] if settings.redis_url else [LOCAL_GATEWAY])
        self.gateways = GatewayFollower(
            static, settings.redis_url, settings.discovery_period_s, self._apply, self._forget_gateway
        )
        self._presumed_gone: set[str] = set()  # gone by the router's guess, not by a gateway's word
        self.loads = LoadWatch(settings.load_deadline_s, settings.load_exclude_s)
        self._tasks: list[asyncio.Task[None]] = []
        self._membership_changed = asyncio.Event()
        self._planned_members: frozenset[str] = frozenset()
        self.plan_error: str | None = None  # why the last re-plan failed; None once one succeeds
        self.on_pipelines_changed: Callable[[list[Pipeline]], None] = lambda pipelines: None

    async def start(self) -> None:
        models = await self._sharder.ListModels(sharder_pb2.ListModelsRequest(), timeout=self.settings.call_timeout_s)
        chosen = [m for m in models.models if not self.settings.model or m.model_id == self.settings.model]
        if not chosen:
            raise Unavailable(
                f"sharder at {self.settings.sharder_address} does not serve model "
                f"{self.settings.model!r}; it has {[m.model_id for m in models.models]}"
            )
        self.model_id, self.config = chosen[0].model_id, model_config_from_pb(chosen[0].config)
        self.gateways.start()
        self._tasks = [asyncio.create_task(self._replan_loop()), asyncio.create_task(self._watch_loads())]
        log.info("cluster_started", extra={"model": self.model_id, "n_layer": self.config.n_layer})

    async def close(self) -> None:
        await self.gateways.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def n_layer(self) -> int:
        assert self.config is not None
        return self.config.n_layer

    async def _forget_gateway(self, address: str) -> None:
        """A gateway's stream broke or it left: its nodes are presumed gone until some gateway reports them
        again. A presumption, not news: the same record coming back (a reconnected stream's snapshot) revives
        the node, where a bumped version would have made that snapshot look stale and lost it for good."""
        for node in [n for n in self.nodes.values() if n.gateway_address == address and n.live]:
            await self._presume_gone(node)

    async def _presume_gone(self, node: NodeRecord) -> None:
        self._presumed_gone.add(node.node_id)
        self.nodes[node.node_id] = replace(node, state="gone")
        self._membership_changed.set()
        await self._rebuild()

    async def _apply(self, view: NodeRecord, source: str = "") -> None:
        """A record from the WatchNodes stream of gateway `source`; the newest version of a node wins."""
        current = self.nodes.get(view.node_id)
        if current is not None and not self._newer(view, current, source):
            return
        self._presumed_gone.discard(view.node_id)
        self.nodes[view.node_id] = view
        self.loads.seen(view)
        live = frozenset(node.node_id for node in self.loads.eligible(list(self.nodes.values())))
        if live != self._planned_members:
            self._membership_changed.set()
        await self._rebuild()

    def _newer(self, view: NodeRecord, current: NodeRecord, source: str) -> bool:
        """A newer version wins. The same version revives a node presumed gone only when it comes from the
        node's own gateway (its stream came back): another gateway's copy may be an orphan not yet reaped."""
        if view.version != current.version:
            return view.version > current.version
        return view.node_id in self._presumed_gone and source == view.gateway_address

    async def _rebuild(self) -> None:
        assert self.config is not None
        self._set_pipelines(build_pipelines(list(self.nodes.values()), self.config.n_layer))
        async with self.changed:
            self.changed.notify_all()

    def _set_pipelines(self, pipelines: list[Pipeline]) -> None:
        changed = [p.key for p in pipelines] != [p.key for p in self.pipelines]
        self.pipelines = pipelines
        metrics.PIPELINES.set(len(pipelines))
        if changed:
            self.on_pipelines_changed(pipelines)

    async def _replan_loop(self) -> None:
        """Re-plan once membership has settled: a burst of joins/leaves costs one plan, not one each."""
        while True:
            await self._membership_changed.wait()
            while True:
                self._membership_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._membership_changed.wait(), self.settings.replan_settle_s)
                if not self._membership_changed.is_set():
                    break
            try:
                await self._replan()
                self.plan_error = None
            except (grpc.aio.AioRpcError, Unavailable) as error:
                self.plan_error = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                log.warning("replan_failed", extra={"error": self.plan_error})
                await asyncio.sleep(1.0)
                self._membership_changed.set()

    async def _watch_loads(self) -> None:
        """Nodes that take longer than the load deadline are planned around (the next plan leaves them out)."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.load_deadline_s / 4))
            for node_id in self.loads.overdue(list(self.nodes.values())):
                metrics.LOAD_TIMEOUTS.inc()
                deadline, exclude = self.settings.load_deadline_s, self.settings.load_exclude_s
                log.warning("node_load_timeout", extra={"node": node_id, "deadline_s": deadline, "excluded_s": exclude})
                self._membership_changed.set()
            if self.loads.expired():  # excluded nodes may take layers again
                self._membership_changed.set()

    async def _replan(self) -> None:
        live = sorted(self.loads.eligible(list(self.nodes.values())), key=lambda n: n.node_id)
        self._planned_members = frozenset(node.node_id for node in live)
        if not live:
            return
        groups = replica_groups(capped(live), self.settings.replicas)
        request = sharder_pb2.PlanRequest(
            model_id=self.model_id,
            nodes=[
                common_pb2.NodeCapacity(node_id=n.node_id, memory_bytes=n.memory_bytes, speed=n.speed)
                for n in groups[0]
            ],
        )
        plan = await self._sharder.Plan(request, timeout=self.settings.call_timeout_s * 6)
        metrics.REPLANS.inc()
        assignments = [(self.nodes[a.node_id], a) for a in plan.assignments]
        for group in groups[1:]:  # the same ranges on each further group, fastest node to first stage
            if len(group) >= len(plan.assignments):
                assignments += list(zip(group, plan.assignments, strict=False))
        log.info(
            "plan_made",
            extra={
                "nodes": len(live),
                "stages": [f"{node.node_id}:[{a.layers.start},{a.layers.end})" for node, a in assignments],
            },
        )
        for node, assignment in assignments:
            await self._assign(node, assignment)

    async def _assign(self, node: NodeRecord, assignment: sharder_pb2.Assignment) -> None:
        if (
            node.layers == (assignment.layers.start, assignment.layers.end)
            and node.shard_id == assignment.shard_id
            and node.state in ("ready", "loading")
        ):
            return  # already holds it
        assign = Assign(
            shard_id=assignment.shard_id,
            layers=(assignment.layers.start, assignment.layers.end),
            shard_url=assignment.shard_url,
            manifest_url=assignment.manifest_url,
            sha256=assignment.sha256,
            size_bytes=assignment.size_bytes,
            top_k=self.settings.top_k,
            activation_dtype=self.settings.activation_dtype,
        )
        await self.gateways.stub(node.gateway_address).AssignShard(
            assign_to_pb(node.node_id, assign, self.config), timeout=self.settings.call_timeout_s
        )
        self.loads.assigned(node.node_id, assignment.shard_id)

    def verifiers(self, pipeline: Pipeline, most: int = 2) -> list[tuple[str, ...]]:
        """For each stage of the pipeline: up to `most` other ready nodes on the same gateway holding the same
        layers (replicas in other pipelines, or standby), fastest first."""
        used = set(pipeline.node_ids)
        result = []
        for stage in pipeline.stages:
            same = [
                n
                for n in self.nodes.values()
                if n.state == "ready" and n.layers == stage.layers and n.gateway_address == stage.gateway_address
            ]
            ranked = sorted((n for n in same if n.node_id not in used), key=lambda n: (-n.speed, n.node_id))
            result.append(tuple(n.node_id for n in ranked[:most]))
        return result

    async def wait_for_pipeline(self, timeout_s: float) -> list[Pipeline]:
        """The current pipelines; waits up to timeout_s for one; none -> UNAVAILABLE saying what is missing
        and, when the last re-plan failed, why no node took it over."""
        if self.pipelines:
            return self.pipelines
        with contextlib.suppress(TimeoutError):
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(lambda: bool(self.pipelines)), timeout_s)
        if not self.pipelines:
            reason = describe_missing(list(self.nodes.values()), self.n_layer)
            if self.plan_error:
                reason += f"; the last re-plan failed: {self.plan_error}"
            raise Unavailable(reason)
        return self.pipelines

    async def route_around(self, node_id: str) -> None:
        """A step found this node gone: build pipelines without it, and re-plan, until a gateway reports it
        again."""
        node = self.nodes.get(node_id)
        if node is not None and node.state == "ready":
            await self._presume_gone(node)
