"""gRPC SamplerService: protobuf <-> sample_step, the batch limit and counters; stateless between calls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from prometheus_client import Counter

from services.common.errors import InvalidArgument
from services.common.pb import sampler_pb2, sampler_pb2_grpc
from services.sampler.convert import logits_from_pb, logits_size, params_from_pb, result_to_pb
from services.sampler.seeding import sample_step

SAMPLES = Counter(
    "synapse_sampler_samples_total",
    "Tokens chosen, by logits input (full, candidates) and mode (greedy, sampled).",
    ["input", "mode"],
)
# SampleBatch calls holding more logits entries than this (about five full GPT-2 rows) run on a worker
# thread so they never stall the event loop; smaller ones stay inline, cheaper than the thread hop.
OFFLOAD_ABOVE_ENTRIES = 262_144


class SamplerServicer(sampler_pb2_grpc.SamplerServiceServicer):
    def __init__(self, max_batch: int, max_vocab: int) -> None:
        self.max_batch = max_batch
        self.max_vocab = max_vocab

    def sample(self, request: sampler_pb2.SampleRequest) -> sampler_pb2.SampleResponse:
        logits = logits_from_pb(request, self.max_vocab)
        params = params_from_pb(request.params)
        result = sample_step(logits, params, request.step, request.prompt_token_ids, request.generated_token_ids)
        SAMPLES.labels(request.WhichOneof("logits"), "greedy" if params.greedy else "sampled").inc()
        return result_to_pb(result)

    def sample_all(self, requests: Sequence[sampler_pb2.SampleRequest]) -> list[sampler_pb2.SampleResponse]:
        results = []
        for index, request in enumerate(requests):
            try:
                results.append(self.sample(request))
            except InvalidArgument as error:
                raise InvalidArgument(f"requests[{index}]: {error}") from error
        return results

    async def Sample(
        self, request: sampler_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.SampleResponse:
        return self.sample(request)

    async def SampleBatch(
        self, request: sampler_pb2.SampleBatchRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.SampleBatchResponse:
        requests = request.requests
        if len(requests) > self.max_batch:
            raise InvalidArgument(
                f"requests has {len(requests)} entries; max_batch is {self.max_batch}, split the call"
            )
        if sum(map(logits_size, requests)) > OFFLOAD_ABOVE_ENTRIES:
            results = await asyncio.to_thread(self.sample_all, requests)
        else:
            results = self.sample_all(requests)
        return sampler_pb2.SampleBatchResponse(results=results)
