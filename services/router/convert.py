"""Router protobuf <-> domain: Generate requests and responses, usage, the model config."""

from __future__ import annotations

import time

from services.common.pb import common_pb2, router_pb2
from services.router.params import GenerateParams
from services.router.requests import Generation, TokenEvent
from services.sampler.convert import params_from_pb

_FINISH = {
    "length": router_pb2.FINISH_REASON_LENGTH,
    "eos": router_pb2.FINISH_REASON_EOS,
    "stop": router_pb2.FINISH_REASON_STOP,
}


def generate_from_pb(request: router_pb2.GenerateRequest, request_id: str) -> GenerateParams:
    """`request_id` is the id the call's logs carry: the client's own when it set one."""
    by_ids = request.WhichOneof("input") == "prompt_token_ids"
    return GenerateParams(
        request_id=request_id,
        prompt=None if by_ids else request.prompt,
        prompt_ids=list(request.prompt_token_ids.ids) if by_ids else None,
        max_tokens=request.max_tokens,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
        sampling=params_from_pb(request.sampling),
    )


def response_to_pb(generation: Generation, event: TokenEvent) -> router_pb2.GenerateResponse:
    response = router_pb2.GenerateResponse(
        request_id=generation.request_id,
        text=event.text,
        index=event.index,
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
        response.usage.CopyFrom(usage_to_pb(generation))
    return response


def usage_to_pb(generation: Generation) -> router_pb2.Usage:
    first_token_at = generation.first_token_at or generation.started
    return router_pb2.Usage(
        prompt_tokens=len(generation.prompt_ids),
        completion_tokens=len(generation.generated),
        time_to_first_token_ms=(first_token_at - generation.started) * 1e3,
        total_ms=(time.perf_counter() - generation.started) * 1e3,
        failovers=generation.failovers,
    )
