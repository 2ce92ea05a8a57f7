"""The gateway's core: connected nodes, the registry, and running a source-routed step across stages."""

from __future__ import annotations

import logging
import time

from services.common.pb import gateway_pb2
from services.gateway import metrics
from services.gateway.nodes import NodeConnection, NodeGone, StepFailedOnNode, StepReply
from services.gateway.registry import MemoryRegistry, NodeRecord
from services.wire import syn1
from services.wire.control import Hello, Release, dump
from services.wire.gateway_client import GatewayClients

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, gateway_id: str, address: str, registry: MemoryRegistry, step_timeout_s: float) -> None:
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
        metrics.NODES_BY_DEVICE.labels(connection.record.kind, connection.record.device).inc()
        metrics.NODE_EVENTS.labels("joined").inc()
        log.info(
            "node_joined",
            extra={
                "node": connection.node_id,
                "kind": connection.record.kind,
                "speed": connection.record.speed,
            },
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
        metrics.NODES_BY_DEVICE.labels(connection.record.kind, connection.record.device).dec()
        log.info("node_left", extra={"node": connection.node_id, "why": why})

    async def assign(self, request: gateway_pb2.AssignShardRequest, assign_text: str) -> None:
        connection = self.connections.get(request.node_id)
        if connection is None:
            raise NodeGone(request.node_id, f"not connected to gateway {self.gateway_id}")
        await self.update(
            connection,
            state="loading",
            layers=(request.layers.start, request.layers.end),
            shard_id=request.shard_id,
        )
        await connection.send_text(assign_text)

    async def release(self, request_ids: list[int], node_ids: list[str]) -> None:
        text = dump(Release(request_ids=request_ids))
        for node_id in node_ids:
            connection = self.connections.get(node_id)
            if connection is not None:
                await connection.send_text(text)

    # --- steps ----------------------------------------------------------------------------------

    async def run_step(self, request: gateway_pb2.StepRequest) -> gateway_pb2.StepResponse:
        """Run the route's stages in order; forward to a peer gateway where a stage lives elsewhere."""
        response = gateway_pb2.StepResponse(step_id=request.step_id)
        try:
            encode_started = time.perf_counter()
            message = self._first_message(request)
            encode_s = time.perf_counter() - encode_started
            for index, stage in enumerate(request.route):
                if stage.gateway_address and stage.gateway_address != self.address:
                    forwarded = await self._forward(request, index, message)
                    response.hops.extend(forwarded.hops)
                    response.frames = forwarded.frames
                    if forwarded.HasField("error"):
                        response.error.CopyFrom(forwarded.error)
                    return response
                message = await self._run_stage(stage, message, response, encode_s if index == 0 else 0.0)
            response.frames = message
            metrics.STEPS.labels("ok").inc()
        except (NodeGone, StepFailedOnNode) as error:
            metrics.STEPS.labels("node_gone" if isinstance(error, NodeGone) else "node_failed").inc()
            response.error.node_id, response.error.message = error.node_id, str(error)
            response.error.node_gone = isinstance(error, NodeGone)
        except syn1.FrameError as error:
            metrics.STEPS.labels("bad_frames").inc()
            response.error.message = f"bad frames: {error}"
        return response

    def _first_message(self, request: gateway_pb2.StepRequest) -> bytes:
        if request.WhichOneof("input") == "frames":
            return request.frames
        frames = [
            syn1.Frame.tokens(item.request_id, item.position, list(item.token_ids)) for item in request.items.items
        ]
        return syn1.encode_frames(frames)

    async def _run_stage(
        self, stage: gateway_pb2.Stage, message: bytes, response: gateway_pb2.StepResponse, gateway_serialize_s: float
    ) -> bytes:
        node_id = stage.node_id
        connection = self.connections.get(node_id)
        if connection is None:
            raise NodeGone(node_id, f"not connected to gateway {self.gateway_id}")
        record, wanted = connection.record, (stage.layers.start, stage.layers.end)
        if record.layers is not None and (record.state != "ready" or record.layers != wanted):
            # A re-plan moved this node; running the old route would compute the wrong layers.
            raise StepFailedOnNode(
                node_id,
                f"route expects layers {list(wanted)} but the node is {record.state} "
                f"with {list(record.layers or ())}; a re-plan is under way",
            )
        started = time.perf_counter()
        reply = await connection.step(message, self.step_timeout_s)
        metrics.NODE_COMPUTE.labels(stage.node_id).observe(reply.compute_ms / 1e3)
        round_trip_s = reply.received_at - started
        tokens = syn1.message_rows(message)
        self._observe(reply, round_trip_s, gateway_serialize_s, len(message), tokens)
        response.hops.add(
            node_id=node_id,
            round_trip_ms=round_trip_s * 1e3,
            compute_ms=reply.compute_ms,
            queue_ms=reply.queue_ms,
            node_serialize_ms=reply.serialize_ms,
            gateway_serialize_ms=gateway_serialize_s * 1e3,
            bytes_sent=len(message),
            bytes_received=reply.size,
        )
        return reply.frames

    async def _forward(self, request: gateway_pb2.StepRequest, index: int, message: bytes) -> gateway_pb2.StepResponse:
        stage = request.route[index]
        forwarded = gateway_pb2.StepRequest(step_id=request.step_id, route=request.route[index:])
        if index == 0 and request.WhichOneof("input") == "items":
            forwarded.items.CopyFrom(request.items)
        else:
            forwarded.frames = message
        return await self.peers.step(stage.gateway_address, forwarded, self.step_timeout_s)

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
