"""The gateway's core: connected nodes, the registry, and running a source-routed step across stages."""

from __future__ import annotations

import logging
import time

from services.common.errors import Unavailable
from services.common.nodes import NodeRecord
from services.gateway import metrics
from services.gateway.nodes import NodeConnection, StepReply
from services.gateway.registry import Registry
from services.wire import syn1
from services.wire.control import Assign, Hello, Release, dump
from services.wire.gateway_client import GatewayClients
from services.wire.steps import Hop, Stage, Step, StepFailed, StepResult

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, gateway_id: str, address: str, registry: Registry, step_timeout_s: float) -> None:
        self.gateway_id = gateway_id
        self.address = address
        self.registry = registry
        self.step_timeout_s = step_timeout_s
        self.connections: dict[str, NodeConnection] = {}
        self.peers = GatewayClients()

    # --- node lifecycle -------------------------------------------------------------------------

    async def joined(self, connection: NodeConnection) -> None:
        old = self.connections.get(connection.node_id)
        if old is not None:
            await old.close(4000, "replaced by a newer connection with the same node id")
        self.connections[connection.node_id] = connection
        await self.registry.put(connection.record)
        metrics.NODES_ONLINE.labels(connection.record.kind).inc()
        metrics.NODE_EVENTS.labels("joined").inc()
        log.info(
            "node_joined",
            extra={"node": connection.node_id, "kind": connection.record.kind, "speed": connection.record.speed},
        )

    async def update(self, connection: NodeConnection, **changes: object) -> None:
        connection.record = connection.record.changed(**changes)
        await self.registry.put(connection.record)
        if "state" in changes:
            metrics.NODE_EVENTS.labels(str(changes["state"])).inc()

    async def left(self, connection: NodeConnection, why: str) -> None:
        connection.fail_all(why)
        if self.connections.get(connection.node_id) is connection:
            del self.connections[connection.node_id]
            await self.update(connection, state="gone")
        metrics.NODES_ONLINE.labels(connection.record.kind).dec()
        log.info("node_left", extra={"node": connection.node_id, "why": why})

    async def assign(self, node_id: str, assign: Assign) -> None:
        connection = self.connections.get(node_id)
        if connection is None:
            raise Unavailable(f"node {node_id} is not connected to gateway {self.gateway_id}; re-plan without it")
        await self.update(connection, state="loading", layers=assign.layers, shard_id=assign.shard_id)
        await connection.send_text(dump(assign))

    async def release(self, request_ids: list[int], node_ids: list[str]) -> None:
        text = dump(Release(request_ids=request_ids))
        for node_id in node_ids:
            connection = self.connections.get(node_id)
            if connection is not None:
                await connection.send_text(text)

    # --- steps ----------------------------------------------------------------------------------

    async def run_step(self, step: Step) -> StepResult:
        """Run the route's stages in order; forward to a peer gateway where a stage lives elsewhere.

        Every failure raises StepFailed: naming the node that failed or vanished, or for frames that
        do not parse, none.
        """
        try:
            encode_started = time.perf_counter()
            message = step.frames or syn1.encode_frames(
                syn1.Frame.tokens(item.request_id, item.position, item.token_ids) for item in step.tokens
            )
            encode_s = time.perf_counter() - encode_started
            hops: list[Hop] = []
            for index, stage in enumerate(step.route):
                if stage.gateway_address and stage.gateway_address != self.address:
                    forwarded = await self._forward(step, index, message)
                    metrics.STEPS.labels("ok").inc()
                    return StepResult(forwarded.frames, (*hops, *forwarded.hops))
                message = await self._run_stage(stage, message, hops, encode_s if index == 0 else 0.0)
        except StepFailed as error:
            metrics.STEPS.labels("node_gone" if error.node_gone else "node_failed").inc()
            raise
        except syn1.FrameError as error:
            metrics.STEPS.labels("bad_frames").inc()
            raise StepFailed(f"bad frames: {error}") from None
        metrics.STEPS.labels("ok").inc()
        return StepResult(message, tuple(hops))

    async def _run_stage(self, stage: Stage, message: bytes, hops: list[Hop], gateway_serialize_s: float) -> bytes:
        connection = self.connections.get(stage.node_id)
        if connection is None:
            raise StepFailed.gone(stage.node_id, f"not connected to gateway {self.gateway_id}")
        record = connection.record
        if record.layers is not None and (record.state != "ready" or record.layers != stage.layers):
            # A re-plan moved this node; running the old route would compute the wrong layers.
            raise StepFailed.on_node(
                stage.node_id,
                f"route expects layers {list(stage.layers)} but the node is {record.state} "
                f"with {list(record.layers or ())}; a re-plan is under way",
            )
        started = time.perf_counter()
        reply = await connection.step(message, self.step_timeout_s)
        round_trip_s = reply.received_at - started
        self._observe(reply, round_trip_s, gateway_serialize_s, len(message), syn1.message_rows(message))
        hops.append(
            Hop(
                node_id=stage.node_id,
                round_trip_ms=round_trip_s * 1e3,
                compute_ms=reply.compute_ms,
                queue_ms=reply.queue_ms,
                node_serialize_ms=reply.serialize_ms,
                gateway_serialize_ms=gateway_serialize_s * 1e3,
                bytes_sent=len(message),
                bytes_received=reply.size,
            )
        )
        return reply.frames

    async def _forward(self, step: Step, index: int, message: bytes) -> StepResult:
        """The rest of the route runs on the gateway its next node is connected to."""
        rest = step.route[index:]
        forwarded = Step(rest, tokens=step.tokens) if index == 0 and step.tokens else Step(rest, frames=message)
        return await self.peers.get(rest[0].gateway_address).step(forwarded, self.step_timeout_s)

    @staticmethod
    def _observe(reply: StepReply, round_trip_s: float, gateway_serialize_s: float, sent: int, tokens: int) -> None:
        metrics.HOP_ROUND_TRIP.observe(round_trip_s)
        metrics.HOP_COMPUTE.observe(reply.compute_ms / 1e3)
        network_s = round_trip_s - (reply.compute_ms + reply.queue_ms + reply.serialize_ms) / 1e3
        metrics.HOP_OVERHEAD.labels("serialize").observe(reply.serialize_ms / 1e3 + gateway_serialize_s)
        metrics.HOP_OVERHEAD.labels("queue").observe(reply.queue_ms / 1e3)
        metrics.HOP_OVERHEAD.labels("network").observe(max(network_s, 0.0))
        metrics.HOP_BYTES.labels("to_node").inc(sent)
        metrics.HOP_BYTES.labels("from_node").inc(reply.size)
        if tokens:
            metrics.HOP_BYTES_PER_TOKEN.labels("to_node").observe(sent / tokens)
            metrics.HOP_BYTES_PER_TOKEN.labels("from_node").observe(reply.size / tokens)


def record_for(hello: Hello, gateway_id: str, address: str) -> NodeRecord:
    return NodeRecord(
        node_id=hello.node_id,
        kind=hello.node_kind,
        device=hello.device,
        memory_bytes=hello.memory_bytes,
        speed=hello.speed,
        gateway_id=gateway_id,
        gateway_address=address,
    )
