"""Sampler protobuf <-> domain: SamplingParams (proto3 zeros read as "off"), logits inputs, results."""

from __future__ import annotations

import numpy as np

from services.common.errors import InvalidArgument
from services.common.pb import common_pb2, sampler_pb2
from services.sampler.sampling import Candidates, LogitsInput, SampleResult, SamplingParams

FLOAT32_BYTES = 4


def params_from_pb(params: common_pb2.SamplingParams) -> SamplingParams:
    """Unset proto3 fields are zero: temperature 0 is greedy; top_p and repetition_penalty 0 mean 1 (off)."""
    return SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p or 1.0,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty or 1.0,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed if params.HasField("seed") else None,
        top_logprobs=params.top_logprobs,
    )


def _dtype_name(dtype: int) -> str:
    return common_pb2.DType.Name(dtype) if dtype in common_pb2.DType.values() else f"unknown dtype {dtype}"


def _check_size(name: str, size: int, max_vocab: int) -> None:
    if not 0 < size <= max_vocab:
        raise InvalidArgument(f"{name} has {size} entries; it must hold 1 to max_vocab={max_vocab}")


def full_logits_from_pb(tensor: common_pb2.Tensor, max_vocab: int) -> np.ndarray:
    """The (vocab,) float32 row of a full-logits tensor, viewed in place (read-only)."""
    if tensor.dtype != common_pb2.DTYPE_FLOAT32:
        raise InvalidArgument(f"full.dtype must be DTYPE_FLOAT32, got {_dtype_name(tensor.dtype)}")
    if len(tensor.shape) != 1:
        raise InvalidArgument(f"full.shape must be (vocab_size,), got {tuple(tensor.shape)}")
    size = tensor.shape[0]
    _check_size("full", size, max_vocab)
    if len(tensor.data) != size * FLOAT32_BYTES:
        raise InvalidArgument(
            f"full.data has {len(tensor.data)} bytes; shape ({size},) float32 needs {size * FLOAT32_BYTES}"
        )
    return np.frombuffer(tensor.data, dtype="<f4")


def candidates_from_pb(candidates: sampler_pb2.Candidates, max_vocab: int) -> Candidates:
    size = len(candidates.values)
    if len(candidates.token_ids) != size:
        raise InvalidArgument(
            f"candidates.token_ids has {len(candidates.token_ids)} entries and candidates.values {size}; "
            "they must pair up"
        )
    _check_size("candidates", size, max_vocab)
    return Candidates(
        values=np.array(candidates.values, dtype=np.float32),
        token_ids=np.array(candidates.token_ids, dtype=np.int64),
    )


def logits_from_pb(request: sampler_pb2.SampleRequest, max_vocab: int) -> LogitsInput:
    kind = request.WhichOneof("logits")
    if kind == "full":
        return full_logits_from_pb(request.full, max_vocab)
    if kind == "candidates":
        return candidates_from_pb(request.candidates, max_vocab)
    raise InvalidArgument("logits must be set: `full` (float32 tensor of shape (vocab_size,)) or `candidates`")


def logits_size(request: sampler_pb2.SampleRequest) -> int:
    """Entries the request's logits hold (its share of the work), without checking them."""
    if request.WhichOneof("logits") == "full":
        return len(request.full.data) // FLOAT32_BYTES
    return len(request.candidates.values)


def result_to_pb(result: SampleResult) -> sampler_pb2.SampleResponse:
    return sampler_pb2.SampleResponse(
        token_id=result.token_id,
        logprob=result.logprob,
        top_logprobs=[common_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob) for t in result.top_logprobs],
    )


def full_logits_to_pb(logits: np.ndarray) -> common_pb2.Tensor:
    """A (vocab,) row as the float32 tensor SampleRequest.full expects (for clients and tests)."""
    row = np.ascontiguousarray(logits, dtype="<f4").reshape(-1)
    return common_pb2.Tensor(data=row.tobytes(), shape=[row.shape[0]], dtype=common_pb2.DTYPE_FLOAT32)


def params_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    """Domain settings as the proto carries them (for clients: the router and tests)."""
    message = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        top_logprobs=params.top_logprobs,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message
