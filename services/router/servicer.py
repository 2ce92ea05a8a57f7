"""gRPC RouterService: Generate, ListNodes, Topology. Translates protobuf <-> the engine's requests."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from services.common.errors import InvalidArgument, SynapseError
from services.common.logs import request_id_var
from services.common.node_status import node_status_pb
from services.common.pb import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import channel, request_metadata
from services.router import metrics
from services.router.cluster import Cluster
from services.router.engine import Engine
from services.router.requests import Generation, TokenEvent
from services.router.settings import RouterSettings
from services.router.topology import missing_ranges
from services.sampler.convert import params_from_pb
from services.sampler.seeding import SteppedSampler
from services.tokenizer.tokenization import Tokenizer

_FINISH = {
    "length": router_pb2.FINISH_REASON_LENGTH,
    "eos": router_pb2.FINISH_REASON_EOS,
    "stop": router_pb2.FINISH_REASON_STOP,
}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, settings: RouterSettings, cluster: Cluster, engine: Engine, tokenizer: Tokenizer) -> None:
        self.settings, self.cluster, self.engine, self.tokenizer = settings, cluster, engine, tokenizer
        self._tokenizer_service = tokenizer_pb2_grpc.TokenizerServiceStub(channel(settings.tokenizer_address))

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        request_id = request.request_id or request_id_var.get() or uuid.uuid4().hex[:16]
        generation = await self._prepare(request, request_id, context.time_remaining())
        metrics.ACTIVE.inc()
        outcome = "cancelled"
        try:
            await self.engine.submit(generation)
            while True:
                event = await generation.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield self._response(generation, event)
                if event.finish_reason:
                    outcome = "ok"
                    return
        except SynapseError as error:
            outcome = error.status.lower()
            raise
        finally:
            metrics.ACTIVE.dec()
            metrics.REQUESTS.labels(outcome).inc()
            if not generation.done or outcome != "ok":
                await self.engine.cancel(generation)

    async def _prepare(
        self, request: router_pb2.GenerateRequest, request_id: str, time_remaining: float | None
    ) -> Generation:
        max_tokens = request.max_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise InvalidArgument(f"max_tokens {max_tokens} is above the limit {self.settings.max_tokens_limit}")
        stops = list(request.stop)
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars")
        prompt_ids = await self._prompt_ids(request)
        config = self.cluster.config
        assert config is not None
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty: send prompt text or prompt_token_ids")
        if any(token >= config.vocab_size for token in prompt_ids):
            raise InvalidArgument(f"prompt_token_ids must be < vocab_size {config.vocab_size}")
        if len(prompt_ids) + max_tokens > config.n_positions:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {config.n_positions} tokens; shorten one"
            )
        # Same (seed, step) draws as the sampler service, so a seeded request reproduces either way.
        sampler = SteppedSampler(params_from_pb(request.sampling), prompt_ids)
        deadline = time.monotonic() + time_remaining if time_remaining is not None else None
        return Generation(
            request_id=request_id,
            wire_id=self.engine.next_wire_id(),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stop=stops,
            ignore_eos=request.ignore_eos,
            eos_id=self.tokenizer.eos_token_id,
            sampler=sampler,
            decoder=self.tokenizer.incremental_decoder(),
            deadline=deadline,
        )

    async def _prompt_ids(self, request: router_pb2.GenerateRequest) -> list[int]:
        if request.WhichOneof("input") == "prompt_token_ids":
            return list(request.prompt_token_ids.ids)
        response = await self._tokenizer_service.Encode(
            tokenizer_pb2.EncodeRequest(text=request.prompt),
            timeout=self.settings.call_timeout_s,
            metadata=request_metadata(),
        )
        return list(response.token_ids)

    def _response(self, generation: Generation, event: TokenEvent) -> router_pb2.GenerateResponse:
        response = router_pb2.GenerateResponse(
            request_id=generation.request_id,
            text=event.text,
            logprob=event.logprob,
            top_logprobs=[common_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob) for t in event.top_logprobs],
            timing=router_pb2.TokenTiming(
                step_ms=event.step_ms,
                compute_ms=event.compute_ms,
                overhead_ms=max(event.step_ms - event.compute_ms, 0.0),
            ),
        )
        if event.token_id is not None:
            response.token_id = event.token_id
        if event.finish_reason:
            response.finish_reason = _FINISH[event.finish_reason]
            response.usage.CopyFrom(
                router_pb2.Usage(
                    prompt_tokens=len(generation.prompt_ids),
                    completion_tokens=len(generation.generated),
                    time_to_first_token_ms=((generation.first_token_at or generation.started) - generation.started)
                    * 1e3,
                    total_ms=(time.perf_counter() - generation.started) * 1e3,
                    failovers=generation.failovers,
                )
            )
        return response

    async def ListNodes(
        self, request: router_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListNodesResponse:
        nodes = sorted(self.cluster.nodes.values(), key=lambda n: n.node_id)
        return router_pb2.ListNodesResponse(nodes=[node_status_pb(n) for n in nodes if n.state != "gone"])

    async def Topology(
        self, request: router_pb2.TopologyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.TopologyResponse:
        response = router_pb2.TopologyResponse(model_id=self.cluster.model_id, config=self.cluster.config)
        for pipeline in self.cluster.pipelines:
            scheduler = self.engine.schedulers.get(pipeline.key)
            response.pipelines.add(
                stages=[node_status_pb(s) for s in pipeline.stages],
                active_requests=len(scheduler.requests) if scheduler else 0,
            )
        for start, end in missing_ranges(list(self.cluster.nodes.values()), self.cluster.n_layer):
            response.missing.add(start=start, end=end)
        return response
