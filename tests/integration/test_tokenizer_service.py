"""TokenizerService over real gRPC on loopback: round trips, batches, limits as statuses, health, start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from services.common.pb import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import GrpcServer, channel
from services.tokenizer.__main__ import EXIT_NO_VOCABULARY, SERVICE_NAME
from services.tokenizer.servicer import OFFLOAD_ABOVE_CHARS
from services.tokenizer.settings import TokenizerSettings
from services.tokenizer.vocab import EOS_TOKEN_ID

DEADLINE_S = 10.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TEXTS = ["Hello, world!", "", " naïve café 😀👍🏽", "中文分词测试", "def f(x):\n\treturn x ** 2\n"]


@pytest.fixture
async def connection(tokenizer_server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with channel(tokenizer_server.address) as opened:
        yield opened


@pytest.fixture
def stub(connection: grpc.aio.Channel) -> tokenizer_pb2_grpc.TokenizerServiceStub:
    return tokenizer_pb2_grpc.TokenizerServiceStub(connection)


async def encode(stub: tokenizer_pb2_grpc.TokenizerServiceStub, text: str, special: bool = False) -> list[int]:
    request = tokenizer_pb2.EncodeRequest(text=text, allow_special=special)
    return list((await stub.Encode(request, timeout=DEADLINE_S)).token_ids)


async def decode(stub: tokenizer_pb2_grpc.TokenizerServiceStub, ids: list[int]) -> str:
    return (await stub.Decode(tokenizer_pb2.DecodeRequest(token_ids=ids), timeout=DEADLINE_S)).text


def tokens_counted(direction: str) -> float:
    return REGISTRY.get_sample_value("synapse_tokenizer_tokens_total", {"direction": direction}) or 0.0


async def test_encode_decode_round_trip(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    encoded_before, decoded_before = tokens_counted("encode"), tokens_counted("decode")
    assert await encode(stub, "Hello, world!") == [15496, 11, 995, 0]
    for text in TEXTS:
        assert await decode(stub, await encode(stub, text)) == text
    encoded = tokens_counted("encode") - encoded_before
    assert encoded > 4
    assert tokens_counted("decode") - decoded_before == encoded - 4


async def test_special_token_only_when_allowed(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    assert await encode(stub, "<|endoftext|>", special=True) == [EOS_TOKEN_ID]
    plain = await encode(stub, "<|endoftext|>")
    assert EOS_TOKEN_ID not in plain
    assert await decode(stub, plain) == "<|endoftext|>"


async def test_split_character_decodes_to_replacement(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    ids = await encode(stub, "😀")
    assert len(ids) > 1  # one emoji spans several byte-level tokens
    assert await decode(stub, ids[:1]) == "\ufffd"


async def test_batches_match_single_calls(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    singles = [await encode(stub, text) for text in TEXTS]
    request = tokenizer_pb2.EncodeBatchRequest(texts=TEXTS)
    encoded = await stub.EncodeBatch(request, timeout=DEADLINE_S)
    assert [list(result.token_ids) for result in encoded.results] == singles
    sequences = [tokenizer_pb2.DecodeRequest(token_ids=ids) for ids in singles]
    decoded = await stub.DecodeBatch(tokenizer_pb2.DecodeBatchRequest(sequences=sequences), timeout=DEADLINE_S)
    assert [result.text for result in decoded.results] == TEXTS
    empty = await stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(), timeout=DEADLINE_S)
    assert list(empty.results) == []


async def test_large_batch_runs_off_the_event_loop(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, tokenizer_settings: TokenizerSettings
) -> None:
    # Above OFFLOAD_ABOVE_CHARS in total, so the worker-thread path answers, errors included.
    texts = [f"{index} The quick brown fox. " * 300 for index in range(tokenizer_settings.max_batch)]
    assert sum(map(len, texts)) > OFFLOAD_ABOVE_CHARS
    encoded = await stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=texts), timeout=DEADLINE_S)
    assert [list(result.token_ids) for result in encoded.results][3] == await encode(stub, texts[3])
    too_long = [*texts[:-1], "x" * (tokenizer_settings.max_input_chars + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=too_long), timeout=DEADLINE_S)
    assert raised.value.code() == INVALID
    assert f"texts[{len(texts) - 1}]" in raised.value.details()


def _cases(limits: TokenizerSettings) -> dict[str, tuple[str, object, tuple[str, ...]]]:
    """name -> (rpc, request, words the error message must hold)."""
    pb = tokenizer_pb2
    too_long = "x" * (limits.max_input_chars + 1)
    too_many_ids = [1] * (limits.max_tokens + 1)
    too_many_texts = ["a"] * (limits.max_batch + 1)
    too_many_sequences = [pb.DecodeRequest(token_ids=[1])] * (limits.max_batch + 1)
    one_bad_sequence = [pb.DecodeRequest(token_ids=[1]), pb.DecodeRequest(token_ids=[60000])]
    return {
        "text_too_long": ("Encode", pb.EncodeRequest(text=too_long), ("text", "max_input_chars")),
        # 4 MB: refused by its length, never tokenized.
        "text_far_too_long": (
            "Encode",
            pb.EncodeRequest(text="word " * 800_000),
            ("text", "max_input_chars"),
        ),
        "too_many_tokens": ("Encode", pb.EncodeRequest(text=" a" * (limits.max_tokens + 1)), ("max_tokens",)),
        "batch_too_big": ("EncodeBatch", pb.EncodeBatchRequest(texts=too_many_texts), ("texts", "max_batch")),
        "batch_text_too_long": (
            "EncodeBatch",
            pb.EncodeBatchRequest(texts=["ok", too_long]),
            ("texts[1]", "max_input_chars"),
        ),
        "id_past_vocabulary": ("Decode", pb.DecodeRequest(token_ids=[50257]), ("ids", "50257", "vocabulary")),
        "largest_uint32_id": (
            "Decode",
            pb.DecodeRequest(token_ids=[2**32 - 1]),
            ("ids", "4294967295", "vocabulary"),
        ),
        "decode_too_long": ("Decode", pb.DecodeRequest(token_ids=too_many_ids), ("ids", "max_tokens")),
        "decode_batch_too_big": (
            "DecodeBatch",
            pb.DecodeBatchRequest(sequences=too_many_sequences),
            ("sequences", "max_batch"),
        ),
        "decode_batch_bad_id": (
            "DecodeBatch",
            pb.DecodeBatchRequest(sequences=one_bad_sequence),
            ("[1]", "60000", "vocabulary"),
        ),
    }


CASE_NAMES = [
    *("text_too_long", "text_far_too_long", "too_many_tokens", "batch_too_big", "batch_text_too_long"),
    *(
        "id_past_vocabulary",
        "largest_uint32_id",
        "decode_too_long",
        "decode_batch_too_big",
        "decode_batch_bad_id",
    ),
]


@pytest.mark.parametrize("case", CASE_NAMES)
async def test_bad_input_is_invalid_argument(
    case: str, stub: tokenizer_pb2_grpc.TokenizerServiceStub, tokenizer_settings: TokenizerSettings
) -> None:
    cases = _cases(tokenizer_settings)
    assert sorted(cases) == sorted(CASE_NAMES)
    rpc, request, words = cases[case]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, rpc)(request, timeout=DEADLINE_S)
    assert raised.value.code() == INVALID, raised.value.details()
    for word in words:
        assert word in raised.value.details()
    handled = {"service": "tokenizer", "method": rpc, "code": "INVALID_ARGUMENT"}
    assert REGISTRY.get_sample_value("synapse_grpc_server_handled_total", handled) >= 1


async def test_health_serving_and_reflection(connection: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(connection)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(connection)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name async for reply in call for service in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_missing_vocabulary_fails_start_up_at_once(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "SYNAPSE_TOKENIZER_VOCAB_CACHE_DIR": str(tmp_path / "empty"),
        "SYNAPSE_TOKENIZER_PORT": "0",
        "SYNAPSE_TOKENIZER_ALLOW_DOWNLOAD": "false",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "services.tokenizer"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == EXIT_NO_VOCABULARY, finished.stderr
    assert "FAILED_PRECONDITION" in finished.stderr
    assert "missing" in finished.stderr
    assert "provision-vocab.sh" in finished.stderr
