"""The generation loop: requests batched into pipeline steps, several steps in flight to keep stages busy."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

from services.common.errors import DeadlineExceeded, Internal, SynapseError, Unavailable
from services.router import metrics
from services.router.cluster import Cluster
from services.router.requests import Generation, TokenEvent, rows_of
from services.router.settings import RouterSettings
from services.router.topology import Pipeline
from services.wire import syn1
from services.wire.gateway_client import GatewayClients
from services.wire.steps import Step, StepFailed, StepResult, TokenInput

log = logging.getLogger(__name__)


def background(coroutine: Coroutine[Any, Any, None], holder: set[asyncio.Task[None]]) -> asyncio.Task[None]:
    """A task that outlives the call that starts it, in an empty context: its log lines carry no request id
    but the ones it binds itself (a task inherits its creator's context, so the first Generate's id would
    otherwise label every line it ever logs). `holder` keeps a strong reference until it ends."""
    task = asyncio.create_task(coroutine, context=contextvars.Context())
    holder.add(task)
    task.add_done_callback(holder.discard)
    return task


class Engine:
    """Assigns requests to pipelines and runs one scheduler per pipeline."""

    def __init__(self, settings: RouterSettings, cluster: Cluster) -> None:
        self.settings = settings
        self.cluster = cluster
        self.gateways = GatewayClients()
        self.background: set[asyncio.Task[None]] = set()
        self.schedulers: dict[tuple, Scheduler] = {}
        self._wire_ids = itertools.count(0)

    def next_wire_id(self) -> int:
        """SYN1 request ids are u32: wrap around, never 0."""
        return next(self._wire_ids) % 0xFFFF_FFFF + 1

    def pipelines_changed(self, pipelines: list[Pipeline]) -> None:
        """Retire schedulers whose pipeline broke or was re-planned; their requests replay elsewhere."""
        live = {pipeline.key for pipeline in pipelines}
        for key in [key for key in self.schedulers if key not in live]:
            self.schedulers.pop(key).retire()

    async def submit(self, generation: Generation, wait_s: float | None = None) -> None:
        """Put the request on the least loaded pipeline (waiting for one if none is complete)."""
        pipelines = await self.cluster.wait_for_pipeline(self.settings.pipeline_wait_s if wait_s is None else wait_s)
        self.pipelines_changed(pipelines)
        for pipeline in pipelines:
            if pipeline.key not in self.schedulers:
                self.schedulers[pipeline.key] = Scheduler(self, pipeline)
        scheduler = min((self.schedulers[p.key] for p in pipelines), key=lambda s: (len(s.requests), s.pipeline.key))
        if generation.abandoned:  # its client left while it waited (a failover's replay): nothing to run
            return
        scheduler.add(generation)

    async def cancel(self, generation: Generation) -> None:
        """The client is gone: take the request off its pipeline, free its caches, never replay it again
        (it may be between pipelines, in a failover's back-off: then it is on no scheduler)."""
        generation.abandoned = True
        for scheduler in self.schedulers.values():
            if generation in scheduler.requests:
                scheduler.requests.remove(generation)
        await self.release(generation)

    async def release(self, generation: Generation) -> None:
        """Free the request's caches on every node that may hold them: each node of each pipeline a step of
        it went through (a failover leaves caches behind), through the gateway each node is on. With steps of
        it still on their way, when the last is back: a release sent now would overtake a step, which goes
        stage by stage while the release goes to every node at once, and a later stage would then meet a step
        whose cache it no longer holds (failing the whole step) or, at position 0, make one nothing frees."""
        if generation.steps_out:
            generation.release_after_step = True
            return
        generation.release_after_step = False
        by_gateway: dict[str, list[str]] = {}
        for node_id, gateway_address in generation.holders.items():
            by_gateway.setdefault(gateway_address, []).append(node_id)
        generation.holders.clear()
        for gateway_address, node_ids in by_gateway.items():
            await self.gateways.get(gateway_address).release([generation.wire_id], node_ids)

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.retire()
        await self.gateways.close()


class Scheduler:
    """One pipeline: micro-batches of waiting requests, up to one step in flight per stage."""

    def __init__(self, engine: Engine, pipeline: Pipeline) -> None:
        self.engine, self.pipeline = engine, pipeline
        self.route = pipeline.route()
        # Verified requests go with a route naming, per stage, the replicas that recompute them; fixed for the
        # scheduler's life, so a verifier sees a request from its first step (its cache must hold it all).
        verifiers = engine.cluster.verifiers(pipeline) if engine.settings.verify_fraction else []
        self.verified_route = pipeline.route(verifiers) if any(verifiers) else self.route
        self.verifier_ids = sorted({node for stage in verifiers for node in stage})
        # Where each node of a step's route is connected: a request's caches are freed through those gateways.
        self.holders = {stage.node_id: stage.gateway_address for stage in pipeline.stages}
        nodes = engine.cluster.nodes
        self.verifier_holders = {node: nodes[node].gateway_address for node in self.verifier_ids if node in nodes}
        self.gateway = engine.gateways.get(pipeline.stages[0].gateway_address)
        self.draft_tokens = engine.settings.speculate_tokens  # native and web nodes answer PREDICTED frames
        self.requests: list[Generation] = []
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._task = background(self._loop(), engine.background)

    def add(self, generation: Generation) -> None:
        self.requests.append(generation)
        self._wake.set()

    def retire(self) -> None:
        """The pipeline is gone: hand its requests back to the engine for replay elsewhere."""
        self._task.cancel()
        for generation in list(self.requests):
            self.requests.remove(generation)
            background(self._failover(generation, "pipeline retired"), self.engine.background)

    async def finish(self, generation: Generation) -> None:
        """Take the request off this pipeline and free its caches on the nodes (Engine.release)."""
        if generation in self.requests:
            self.requests.remove(generation)
        await self.engine.release(generation)

    async def _loop(self) -> None:
        stages = len(self.pipeline.stages)
        settings = self.engine.settings
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._inflight) < max(stages, settings.micro_batches):
                ready = [g for g in self.requests if not g.in_flight and not g.done]
                if not ready:
                    break
                # Split the active requests into micro-batches (by default one per stage, so every stage
                # has work); each runs as one batched forward pass per node.
                size = min(settings.max_batch, math.ceil(len(self.requests) / (settings.micro_batches or stages)))
                batch = ready[:size]
                for generation in batch:
                    generation.in_flight = True
                task = asyncio.create_task(self._step(batch))
                self._inflight.add(task)
                task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("step_crashed", exc_info=task.exception())

    async def _step(self, batch: list[Generation]) -> None:
        """Build the step, run it through the pipeline's entry gateway, apply what came back.

        Whatever goes wrong ends each request of the batch one way: replayed elsewhere (StepFailed) or
        failed with the error. A request is never left to be stepped again as if nothing happened: that
        would spin this loop.
        """
        try:
            batch = await self._drop_expired(batch)
            if not batch:
                return
            step = self._build(batch)
            started = time.perf_counter()
            try:
                result = await self._send(step, batch)
            except StepFailed as error:
                await self._step_failed(self._still_here(batch), error)
                return
            await self._apply(self._still_here(batch), result, time.perf_counter() - started)
        except Exception as error:  # a bug or a malformed result: fail the batch loudly, never retry it
            log.exception("step_crashed", extra={"requests": len(batch)})
            for generation in batch:
                await self._fail(generation, error if isinstance(error, SynapseError) else Internal(repr(error)))

    async def _send(self, step: Step, batch: list[Generation]) -> StepResult:
        """Run the step; meanwhile each request counts it out, and a release asked for in between goes when it
        is back (Engine.release)."""
        for generation in batch:
            generation.steps_out += 1
            generation.holders.update(self.holders)
            if generation.verified:
                generation.holders.update(self.verifier_holders)
        try:
            return await self.gateway.step(step, self.engine.settings.step_timeout_s)
        finally:
            for generation in batch:
                generation.steps_out -= 1
                if generation.release_after_step and not generation.steps_out:
                    await self.engine.release(generation)

    def _build(self, batch: list[Generation]) -> Step:
        """The step's input: each request's pending tokens, with a draft appended to decode steps."""
        if self.draft_tokens:
            n_positions = self.engine.cluster.config.n_positions
            for generation in batch:
                generation.propose(self.draft_tokens, n_positions)
                metrics.SPEC_DRAFTED.inc(len(generation.draft))
        chunk = self.engine.settings.prefill_chunk
        items = (TokenInput(g.wire_id, g.position, g.next_input(chunk), predicted=bool(g.draft)) for g in batch)
        verify = frozenset(g.wire_id for g in batch if g.verified) if self.verifier_ids else frozenset()
        return Step(self.verified_route if verify else self.route, tokens=tuple(items), verify=verify)

    async def _drop_expired(self, batch: list[Generation]) -> list[Generation]:
        now = time.monotonic()
        expired = [g for g in batch if g.deadline is not None and now > g.deadline]
        for generation in expired:
            generation.in_flight = False
            await self._fail(generation, DeadlineExceeded("deadline passed before the request finished"))
        return [g for g in batch if g not in expired]

    def _still_here(self, batch: list[Generation]) -> list[Generation]:
        """The requests of a finished step that are still on this pipeline (the rest moved on meanwhile)."""
        batch = [g for g in batch if g in self.requests]
        for generation in batch:
            generation.in_flight = False
        return batch

    async def _apply(self, batch: list[Generation], result: StepResult, wall_s: float) -> None:
        compute_ms = sum(hop.compute_ms for hop in result.hops)
        metrics.STEP_SECONDS.observe(wall_s)
        metrics.STEP_COMPUTE_SECONDS.observe(compute_ms / 1e3)
        metrics.STEP_OVERHEAD_SECONDS.observe(max(wall_s - compute_ms / 1e3, 0.0))
        metrics.BATCH_SIZE.observe(len(batch))
        outputs = {frame.request_id: frame for frame in syn1.decode_frames(result.frames)}
        sampling = 0.0  # seconds in accept(): sampling and draft checks, not the streaming that follows
        for generation in batch:
            frame = outputs.get(generation.wire_id)
            if frame is None:
                await self._fail(generation, Unavailable("the last stage returned no output for this request"))
                continue
            if not generation.generated and generation.failovers == 0:
                metrics.TOKENS.labels("prompt").inc(generation.sent)
            drafted = len(generation.draft)
            started = time.perf_counter()
            try:
                events = generation.accept(rows_of(frame), compute_ms)
            except SynapseError as error:  # e.g. the sampler refusing what came back: this request only
                log.warning("sample_failed", extra={"request_id": generation.request_id, "error": str(error)})
                await self._fail(generation, error)
                continue
            finally:
                sampling += time.perf_counter() - started
            if drafted:
                metrics.SPEC_ACCEPTED.inc(len(events) - 1)
            if not events:
                continue  # a chunk of a long prompt: no token yet
            metrics.TOKENS.labels("generated").inc(len(events))
            for event in events:
                self._emit(generation, event)
            if generation.done:
                await self.finish(generation)
        metrics.SAMPLE_SECONDS.observe(sampling)

    def _emit(self, generation: Generation, event: TokenEvent) -> None:
        if len(generation.generated) == 1:
            metrics.TTFT.observe(time.perf_counter() - generation.started)
        else:
            metrics.TPOT.observe(event.step_ms / 1e3)
        generation.events.put_nowait(event)

    async def _step_failed(self, batch: list[Generation], error: StepFailed) -> None:
        log.warning("step_failed", extra={"node": error.node_id, "error": str(error), "requests": len(batch)})
        if error.node_id and error.node_gone:
            await self.engine.cluster.route_around(error.node_id)
        for generation in batch:
            if generation in self.requests:
                self.requests.remove(generation)
                background(self._failover(generation, str(error)), self.engine.background)

    async def _failover(self, generation: Generation, why: str) -> None:
        """Replay the request's tokens on a (new) pipeline so its caches are rebuilt; the stream goes on.

        Each replay of the same request waits longer (50 ms doubling, at most 2 s), so a fault the cluster
        has not noticed yet (a gateway that died, say) costs a few quick retries, not a busy loop; past
        SYNAPSE_ROUTER_MAX_FAILOVERS replays the request ends UNAVAILABLE.
        """
        settings = self.engine.settings
        generation.rewind()
        metrics.FAILOVERS.inc()
        log.info("request_failover", extra={"request_id": generation.request_id, "why": why})
        if generation.failovers > settings.max_failovers:
            message = f"gave up after {settings.max_failovers} replays; the last failure: {why}"
            await self._fail(generation, Unavailable(message))
            return
        await asyncio.sleep(min(2.0, 0.05 * 2 ** (generation.failovers - 1)) if generation.failovers > 1 else 0)
        try:
            await self.engine.submit(generation, settings.failover_wait_s)
        except Unavailable as error:
            await self._fail(generation, error)

    async def _fail(self, generation: Generation, error: BaseException) -> None:
        await self.finish(generation)  # its caches too, wherever it has been
        generation.finish_reason = generation.finish_reason or "error"
        generation.events.put_nowait(error)
