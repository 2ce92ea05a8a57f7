"""gRPC TokenizerService: protobuf <-> Tokenizer calls, the batch limit and token counters; no BPE here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sized
from functools import partial
from typing import TypeVar

import grpc
from prometheus_client import Counter

from services.common.errors import InvalidArgument
from services.common.pb import tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.tokenization import Tokenizer

TOKENS = Counter(
    "synapse_tokenizer_tokens_total",
    "Token ids produced by Encode (direction=encode) or read by Decode (direction=decode), batches included.",
    ["direction"],
)
# Bigger calls run on a worker thread (tiktoken releases the GIL) so one 1 MB text never stalls the event
# loop; smaller ones stay inline, where the thread hop (~50 us) would cost more than the work.
OFFLOAD_ABOVE_CHARS = 65_536
OFFLOAD_ABOVE_IDS = 16_384

T = TypeVar("T")


async def _run(work: Callable[[], T], size: int, limit: int) -> T:
    return await asyncio.to_thread(work) if size > limit else work()


def _check_batch(name: str, batch: Sized, max_batch: int) -> None:
    if len(batch) > max_batch:
        raise InvalidArgument(f"{name} has {len(batch)} entries; max_batch is {max_batch}, split the call")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: Tokenizer, max_batch: int) -> None:
        self.tokenizer = tokenizer
        self.max_batch = max_batch

    async def Encode(
        self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.EncodeResponse:
        work = partial(self.tokenizer.encode, request.text, allow_special=request.allow_special)
        ids = await _run(work, len(request.text), OFFLOAD_ABOVE_CHARS)
        TOKENS.labels("encode").inc(len(ids))
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def EncodeBatch(
        self, request: tokenizer_pb2.EncodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.EncodeBatchResponse:
        _check_batch("texts", request.texts, self.max_batch)
        texts = list(request.texts)
        work = partial(self.tokenizer.encode_batch, texts, allow_special=request.allow_special)
        batch = await _run(work, sum(map(len, texts)), OFFLOAD_ABOVE_CHARS)
        TOKENS.labels("encode").inc(sum(map(len, batch)))
        return tokenizer_pb2.EncodeBatchResponse(results=[tokenizer_pb2.EncodeResponse(token_ids=ids) for ids in batch])

    async def Decode(
        self, request: tokenizer_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DecodeResponse:
        ids = request.token_ids
        text = await _run(partial(self.tokenizer.decode, ids), len(ids), OFFLOAD_ABOVE_IDS)
        TOKENS.labels("decode").inc(len(ids))
        return tokenizer_pb2.DecodeResponse(text=text)

    async def DecodeBatch(
        self, request: tokenizer_pb2.DecodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DecodeBatchResponse:
        _check_batch("sequences", request.sequences, self.max_batch)
        batch = [sequence.token_ids for sequence in request.sequences]
        count = sum(map(len, batch))
        texts = await _run(partial(self.tokenizer.decode_batch, batch), count, OFFLOAD_ABOVE_IDS)
        TOKENS.labels("decode").inc(count)
        return tokenizer_pb2.DecodeBatchResponse(results=[tokenizer_pb2.DecodeResponse(text=t) for t in texts])
