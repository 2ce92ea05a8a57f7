"""The gateway's core: connected nodes, the registry, and running a source-routed step across stages."""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.errors import Unavailable
from services.common.gpt2.config import GPT2Config
from services.common.nodes import NodeRecord
from services.gateway import metrics
from services.gateway.answers import Misbehaviour, StageShape, check_answer
from services.gateway.nodes import NodeConnection, StepReply
from services.gateway.registry import Registry, RegistryUnavailable
from services.gateway.verification import judge, subset
from services.wire import syn1
from services.wire.control import Assign, GatewayError, Hello, Release, dump
from services.wire.gateway_client import GatewayClients
from services.wire.steps import Hop, Stage, Step, StepFailed, StepResult

log = logging.getLogger(__name__)


CLOSE_QUARANTINED = 4003  # WebSocket close code: the node answered for work it was not given


class Hub:
    def __init__(
        self,
        gateway_id: str,
        address: str,
        registry: Registry,
        step_timeout_s: float,
        quarantine_s: tuple[float, float] = (30.0, 3600.0),
    ) -> None:
        self.gateway_id = gateway_id
        self.address = address
        self.registry = registry
        self.step_timeout_s = step_timeout_s
        self.quarantine_s = quarantine_s  # (first offense, longest) in seconds
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
        metrics.NODES_BY_DEVICE.labels(connection.record.kind, connection.record.device).dec()
        log.info("node_left", extra={"node": connection.node_id, "why": why})

    async def assign(self, node_id: str, assign: Assign, config: GPT2Config) -> None:
        connection = self.connections.get(node_id)
        if connection is None:
            raise Unavailable(f"node {node_id} is not connected to gateway {self.gateway_id}; re-plan without it")
        connection.shape = StageShape(
            n_embd=config.n_embd,
            vocab_size=config.vocab_size,
            is_last=assign.layers[1] == config.n_layer,
            top_k=assign.top_k,
            activation_dtype=syn1.ACTIVATION_DTYPES[assign.activation_dtype],
        )
        await self.update(connection, state="loading", layers=assign.layers, shard_id=assign.shard_id)
        await connection.send_text(dump(assign))

    async def refusal(self, node_id: str) -> str | None:
        """Why a node with this id may not join now (it is quarantined), or None; RegistryUnavailable when the
        shared registry cannot say (the node is told to try again later)."""
        return await self.registry.quarantined(node_id)

    async def quarantine(self, connection: NodeConnection, reason: str, cause: str = "answer") -> None:
        """Keep a node that lied out of every pipeline for a backoff: refused at hello on every gateway
        sharing this registry until it ends (placement never sees it meanwhile)."""
        try:
            seconds = await self.registry.quarantine(connection.node_id, reason, *self.quarantine_s)
        except RegistryUnavailable as error:  # closed all the same; only the backoff is not remembered
            log.warning("quarantine_not_recorded", extra={"node": connection.node_id, "error": str(error)})
            seconds = self.quarantine_s[0]
        metrics.QUARANTINES.labels(cause).inc()
        log.warning("node_quarantined", extra={"node": connection.node_id, "seconds": seconds, "reason": reason})
        why = f"quarantined for {seconds:.0f} s: {reason}"
        await connection.send_text(dump(GatewayError(message=why[:4000])))
        await connection.close(CLOSE_QUARANTINED, why)

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
                syn1.Frame.tokens(item.request_id, item.position, item.token_ids, predicted=item.predicted)
                for item in step.tokens
            )
            encode_s = time.perf_counter() - encode_started
            hops: list[Hop] = []
            for index, stage in enumerate(step.route):
                if stage.gateway_address and stage.gateway_address != self.address:
                    forwarded = await self._forward(step, index, message)
                    metrics.STEPS.labels("ok").inc()
                    return StepResult(forwarded.frames, (*hops, *forwarded.hops))
                message = await self._run_stage(stage, message, hops, encode_s if index == 0 else 0.0, step.verify)
        except StepFailed as error:
            metrics.STEPS.labels("node_gone" if error.node_gone else "node_failed").inc()
            raise
        except syn1.FrameError as error:
            metrics.STEPS.labels("bad_frames").inc()
            raise StepFailed(f"bad frames: {error}") from None
        metrics.STEPS.labels("ok").inc()
        return StepResult(message, tuple(hops))

    async def _run_stage(
        self, stage: Stage, message: bytes, hops: list[Hop], gateway_serialize_s: float, verify: frozenset[int]
    ) -> bytes:
        connection = self._ready(stage.node_id, stage.layers)
        verifiers = self._verifiers(stage) if verify else []
        checked = subset(message, verify) if verifiers else None
        started = time.perf_counter()
        if checked is None:
            reply = await self._ask(connection, message)
        else:
            reply = await self._verified(connection, message, verifiers, checked)
        metrics.NODE_COMPUTE.labels(stage.node_id).observe(reply.compute_ms / 1e3)
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

    def _ready(self, node_id: str, layers: tuple[int, int]) -> NodeConnection:
        """The node's connection, if it is here and holds these layers now."""
        connection = self.connections.get(node_id)
        if connection is None:
            raise StepFailed.gone(node_id, f"not connected to gateway {self.gateway_id}")
        record = connection.record
        if record.layers is not None and (record.state != "ready" or record.layers != layers):
            # A re-plan moved this node; running the old route would compute the wrong layers.
            raise StepFailed.on_node(
                node_id,
                f"route expects layers {list(layers)} but the node is {record.state} "
                f"with {list(record.layers or ())}; a re-plan is under way",
            )
        return connection

    def _verifiers(self, stage: Stage) -> list[NodeConnection]:
        """The stage's verifiers that can recompute it now: here, ready, with the same layers."""
        ready = []
        for node_id in stage.verifiers:
            try:
                ready.append(self._ready(node_id, stage.layers))
            except StepFailed:
                metrics.VERIFICATIONS.labels("incomplete").inc()
        return [connection for connection in ready if connection.node_id != stage.node_id]

    async def _ask(self, connection: NodeConnection, message: bytes) -> StepReply:
        """One step on one node, its answer checked against what its assignment makes due."""
        shape = connection.shape  # as assigned when the step went out: a later re-plan changes what is due
        reply = await connection.step(message, self.step_timeout_s)
        if shape is not None:
            try:
                check_answer(message, reply.frames, shape, connection.max_payload_bytes)
            except (Misbehaviour, syn1.FrameError) as error:
                await self.quarantine(connection, str(error))
                raise StepFailed.gone(connection.node_id, f"quarantined: {error}") from None
        return reply

    async def _verified(
        self, primary: NodeConnection, message: bytes, verifiers: list[NodeConnection], checked: bytes
    ) -> StepReply:
        """The step on the stage's node, and its verified requests on the verifiers at the same time; the
        answers judged (verification.judge). The node's reply stands unless it was outvoted."""
        replies = await asyncio.gather(
            self._ask(primary, message), *(self._ask(v, checked) for v in verifiers), return_exceptions=True
        )
        reply = replies[0]
        if isinstance(reply, BaseException):
            raise reply
        ids = {header.request_id for _, header in syn1.headers(checked)}
        opinions = {primary.node_id: [f for f in syn1.decode_frames(reply.frames) if f.request_id in ids]}
        for verifier, answer in zip(verifiers, replies[1:], strict=True):
            if isinstance(answer, StepReply):
                opinions[verifier.node_id] = syn1.decode_frames(answer.frames)
            else:  # e.g. it lacks a request's cache (it became a verifier mid-request): no opinion
                log.info("verification_incomplete", extra={"node": verifier.node_id, "error": str(answer)[:200]})
        if len(opinions) < 2:
            metrics.VERIFICATIONS.labels("incomplete").inc()
            return reply
        verdict = judge(opinions)
        metrics.VERIFICATIONS.labels(verdict.outcome).inc()
        if verdict.outcome == "unresolved":
            log.warning("verification_unresolved", extra={"nodes": list(verdict.disagreeing)})
        for liar in verdict.liars:
            others = sorted(set(opinions) - {liar})
            reason = f"its answer disagreed with {', '.join(others)}, which agreed with each other"
            await self.quarantine(self.connections.get(liar) or primary, reason, cause="disagreement")
        if primary.node_id in verdict.liars:
            raise StepFailed.gone(primary.node_id, "quarantined: outvoted by the nodes that recomputed its step")
        return reply

    async def _forward(self, step: Step, index: int, message: bytes) -> StepResult:
        """The rest of the route runs on the gateway its next node is connected to."""
        rest = step.route[index:]
        if index == 0 and step.tokens:
            forwarded = Step(rest, tokens=step.tokens, verify=step.verify)
        else:
            forwarded = Step(rest, frames=message, verify=step.verify)
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
