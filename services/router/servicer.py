"""gRPC RouterService: Generate, ListNodes, Topology. Converts at the edge (convert.py); the engine does the work."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from services.common.errors import SynapseError
from services.common.logs import request_id_var
from services.common.model_config_pb import model_config_to_pb
from services.common.node_status import node_status_pb
from services.common.pb import router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import channel, request_metadata, upstream
from services.router import convert, metrics
from services.router.cluster import Cluster
from services.router.engine import Engine
from services.router.params import GenerateParams, Limits, check_prompt
from services.router.quota import StreamQuota, client_of
from services.router.requests import Generation
from services.router.settings import RouterSettings
from services.router.speculation import NgramIndex
from services.router.topology import missing_ranges
from services.sampler.seeding import SteppedSampler
from services.tokenizer.tokenization import Tokenizer


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, settings: RouterSettings, cluster: Cluster, engine: Engine, tokenizer: Tokenizer) -> None:
        self.settings, self.cluster, self.engine, self.tokenizer = settings, cluster, engine, tokenizer
        self._tokenizer_service = tokenizer_pb2_grpc.TokenizerServiceStub(channel(settings.tokenizer_address))
        self.limits = Limits(settings.max_tokens_limit, settings.max_prompt_chars, settings.top_k)
        self.streams = StreamQuota(settings.max_streams_per_client)
        self._draw = random.Random()  # which requests are verified

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        # The client's own id, when it set one, labels every log line of this call from here on.
        request_id = request.request_id or request_id_var.get() or uuid.uuid4().hex[:16]
        request_id_var.set(request_id)
        params = convert.generate_from_pb(request, request_id)
        params.validate(self.limits)
        with self.streams.hold(client_of(context)):
            generation = await self._start(params, context.time_remaining())
            async for response in self._stream(generation):
                yield response

    async def _stream(self, generation: Generation) -> AsyncIterator[router_pb2.GenerateResponse]:
        metrics.ACTIVE.inc()
        outcome = "cancelled"
        try:
            await self.engine.submit(generation)
            while True:
                event = await generation.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield convert.response_to_pb(generation, event)
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

    async def _start(self, params: GenerateParams, time_remaining: float | None) -> Generation:
        prompt_ids = params.prompt_ids if params.prompt_ids is not None else await self._encode(params.prompt or "")
        config = self.cluster.config
        assert config is not None
        max_tokens = params.max_tokens or self.settings.default_max_tokens
        check_prompt(prompt_ids, max_tokens, config)
        return Generation(
            request_id=params.request_id,
            wire_id=self.engine.next_wire_id(),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stop=list(params.stop),
            ignore_eos=params.ignore_eos,
            eos_id=self.tokenizer.eos_token_id,
            # Same (seed, step) draws as the sampler service, so a seeded request reproduces either way.
            sampler=SteppedSampler(params.sampling, prompt_ids),
            decoder=self.tokenizer.incremental_decoder(),
            deadline=time.monotonic() + time_remaining if time_remaining is not None else None,
            ngrams=NgramIndex(prompt_ids, self.settings.speculate_ngram) if self.settings.speculate_tokens else None,
            verified=self._draw.random() < self.settings.verify_fraction,
        )

    async def _encode(self, prompt: str) -> list[int]:
        with upstream("tokenizer"):
            response = await self._tokenizer_service.Encode(
                tokenizer_pb2.EncodeRequest(text=prompt),
                timeout=self.settings.call_timeout_s,
                metadata=request_metadata(),
            )
        return list(response.token_ids)

    async def ListNodes(
        self, request: router_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListNodesResponse:
        nodes = sorted(self.cluster.nodes.values(), key=lambda n: n.node_id)
        return router_pb2.ListNodesResponse(nodes=[node_status_pb(n) for n in nodes if n.live])

    async def Topology(
        self, request: router_pb2.TopologyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.TopologyResponse:
        config = self.cluster.config
        response = router_pb2.TopologyResponse(
            model_id=self.cluster.model_id, config=model_config_to_pb(config) if config else None
        )
        for pipeline in self.cluster.pipelines:
            scheduler = self.engine.schedulers.get(pipeline.key)
            response.pipelines.add(
                stages=[node_status_pb(s) for s in pipeline.stages],
                active_requests=len(scheduler.requests) if scheduler else 0,
            )
        for start, end in missing_ranges(list(self.cluster.nodes.values()), self.cluster.n_layer):
            response.missing.add(start=start, end=end)
        return response
