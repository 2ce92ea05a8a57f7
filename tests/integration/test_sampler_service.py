"""SamplerService over real gRPC on loopback: greedy and seeded draws, batches, bad input, health."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from services.common.pb import common_pb2, sampler_pb2, sampler_pb2_grpc
from services.common.server import GrpcServer, channel
from services.sampler.__main__ import SERVICE_NAME
from services.sampler.convert import full_logits_to_pb, params_to_pb
from services.sampler.sampling import SamplingParams, sample_next
from services.sampler.seeding import SteppedSampler, sample_batch_stepped, sample_step
from services.sampler.servicer import OFFLOAD_ABOVE_ENTRIES
from services.sampler.settings import SamplerSettings

DEADLINE_S = 10.0
VOCAB = 50257
K = 64
# Float32-exact values, so params survive the proto's float fields bit for bit.
SEEDED = SamplingParams(
    temperature=0.75, top_k=40, top_p=0.875, repetition_penalty=1.25, frequency_penalty=0.5, seed=1234
)


@pytest.fixture
async def connection(sampler_server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with channel(sampler_server.address) as opened:
        yield opened


@pytest.fixture
def stub(connection: grpc.aio.Channel) -> sampler_pb2_grpc.SamplerServiceStub:
    return sampler_pb2_grpc.SamplerServiceStub(connection)


def top_k(row: np.ndarray, k: int = K) -> sampler_pb2.Candidates:
    ids = np.argsort(-row, kind="stable")[:k]
    return sampler_pb2.Candidates(values=row[ids].tolist(), token_ids=ids.tolist())


def request(logits: np.ndarray | sampler_pb2.Candidates, params: SamplingParams, **fields: object):
    if isinstance(logits, sampler_pb2.Candidates):
        return sampler_pb2.SampleRequest(candidates=logits, params=params_to_pb(params), **fields)
    return sampler_pb2.SampleRequest(full=full_logits_to_pb(logits), params=params_to_pb(params), **fields)


async def sample(stub: sampler_pb2_grpc.SamplerServiceStub, message: sampler_pb2.SampleRequest):
    return await stub.Sample(message, timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    """(12, VOCAB) float32 rows, one per decode step."""
    return np.random.default_rng(0).normal(0, 3, size=(12, VOCAB)).astype(np.float32)


async def test_greedy_full_and_candidates_agree(stub: sampler_pb2_grpc.SamplerServiceStub, logits: np.ndarray) -> None:
    greedy = SamplingParams(temperature=0.0, top_logprobs=5)
    for row in logits[:4]:
        full = await sample(stub, request(row, greedy))
        cut = await sample(stub, request(top_k(row), greedy))
        assert full.token_id == cut.token_id == int(np.argmax(row))
        assert [a.token_id for a in full.top_logprobs] == [a.token_id for a in cut.top_logprobs]
        exact = row.astype(np.float64) - np.logaddexp.reduce(row.astype(np.float64))
        assert math.isclose(full.logprob, exact[full.token_id], abs_tol=1e-5)
        assert cut.logprob >= full.logprob  # normalised over K candidates only


async def test_same_seed_same_tokens_as_in_process(
    stub: sampler_pb2_grpc.SamplerServiceStub, logits: np.ndarray
) -> None:
    prompt = [11, 13, 15]

    async def generate(params: SamplingParams, cut: bool) -> list[int]:
        generated: list[int] = []
        for step, row in enumerate(logits):
            message = request(top_k(row) if cut else row, params, step=step)
            message.prompt_token_ids.extend(prompt)
            message.generated_token_ids.extend(generated)
            generated.append((await sample(stub, message)).token_id)
        return generated

    first = await generate(SEEDED, cut=False)
    assert await generate(SEEDED, cut=False) == first
    assert await generate(replace(SEEDED, seed=4321), cut=False) != first
    in_process = SteppedSampler(SEEDED, prompt)
    assert [in_process.sample(row).token_id for row in logits] == first
    # top_k 40 <= K: the candidates path is exact, so it draws the same tokens.
    assert await generate(SEEDED, cut=True) == first


async def test_no_seed_draws_fresh_entropy(stub: sampler_pb2_grpc.SamplerServiceStub) -> None:
    flat = np.zeros(1000, dtype=np.float32)
    draws = {(await sample(stub, request(flat, SamplingParams(temperature=1.0), step=0))).token_id for _ in range(8)}
    assert len(draws) > 1


async def test_proto_zero_defaults_mean_off(stub: sampler_pb2_grpc.SamplerServiceStub, logits: np.ndarray) -> None:
    params = common_pb2.SamplingParams(temperature=1.0, top_p=0.0, repetition_penalty=0.0, seed=7)
    reply = await sample(stub, sampler_pb2.SampleRequest(full=full_logits_to_pb(logits[0]), params=params, step=2))
    assert reply.token_id == sample_step(logits[0], SamplingParams(temperature=1.0, seed=7), 2).token_id
    # The documented derivation: step n of seed s draws from default_rng([s, n]).
    pinned = sample_next(logits[0], SamplingParams(temperature=1.0, seed=7), np.random.default_rng([7, 2]))
    assert reply.token_id == pinned.token_id
    unset = await sample(stub, sampler_pb2.SampleRequest(full=full_logits_to_pb(logits[0])))
    assert unset.token_id == int(np.argmax(logits[0]))  # no params at all: temperature 0, greedy


async def test_penalties_read_the_request_ids(stub: sampler_pb2_grpc.SamplerServiceStub) -> None:
    row = np.zeros(16, dtype=np.float32)
    row[5], row[9], row[3] = 2.0, 1.9, 1.8
    repeated = request(row, SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_token_ids=[5])
    assert (await sample(stub, repeated)).token_id == 9
    present = request(row, SamplingParams(temperature=0.0, presence_penalty=0.5), generated_token_ids=[5, 9])
    assert (await sample(stub, present)).token_id == 3


async def test_batch_matches_single_calls(stub: sampler_pb2_grpc.SamplerServiceStub, logits: np.ndarray) -> None:
    seeded = [replace(SEEDED, seed=seed) for seed in (1, 2, 3)]
    generated = [7, 7, 8]  # three tokens so far: this is step 3
    candidates = [top_k(row) for row in logits[:3]]
    rows = [request(c, p, step=3, generated_token_ids=generated) for c, p in zip(candidates, seeded, strict=True)]
    rows.append(request(logits[3], SamplingParams(temperature=0.0, top_logprobs=3)))
    batch = await stub.SampleBatch(sampler_pb2.SampleBatchRequest(requests=rows), timeout=DEADLINE_S)
    assert list(batch.results) == [await sample(stub, row) for row in rows]
    # The router's vectorised in-process batch draws the same tokens for the same (seed, step).
    samplers = [SteppedSampler(params) for params in seeded]
    for sampler in samplers:
        for token_id in generated:
            sampler.history.append(token_id)
    values = np.array([list(c.values) for c in candidates])
    token_ids = np.array([list(c.token_ids) for c in candidates])
    expected = sample_batch_stepped(samplers, values, token_ids)
    assert [r.token_id for r in batch.results[:3]] == [r.token_id for r in expected]
    assert [r.logprob for r in batch.results[:3]] == pytest.approx([r.logprob for r in expected], abs=1e-6)


async def test_large_batch_runs_off_the_event_loop(
    stub: sampler_pb2_grpc.SamplerServiceStub, logits: np.ndarray
) -> None:
    rows = [request(row, SamplingParams(temperature=0.0)) for row in logits[:6]]
    assert VOCAB * len(rows) > OFFLOAD_ABOVE_ENTRIES  # the worker-thread path answers
    batch = await stub.SampleBatch(sampler_pb2.SampleBatchRequest(requests=rows), timeout=DEADLINE_S)
    assert [r.token_id for r in batch.results] == np.argmax(logits[:6], axis=1).tolist()
    rows[4].params.top_p = 2.0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SampleBatch(sampler_pb2.SampleBatchRequest(requests=rows), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[4]: top_p" in raised.value.details()


def _bad_tensor(**fields: object) -> sampler_pb2.SampleRequest:
    tensor = common_pb2.Tensor(data=np.zeros(8, np.float32).tobytes(), shape=[8], dtype=common_pb2.DTYPE_FLOAT32)
    for name, value in fields.items():
        tensor.ClearField(name)
        if isinstance(value, list):
            getattr(tensor, name).extend(value)
        else:
            setattr(tensor, name, value)
    return sampler_pb2.SampleRequest(full=tensor)


def _bad_requests(limits: SamplerSettings) -> dict[str, tuple[sampler_pb2.SampleRequest, tuple[str, ...]]]:
    """name -> (request, words the error message must hold)."""
    row = np.zeros(8, dtype=np.float32)
    nan_row = row.copy()
    nan_row[2] = np.nan
    return {
        "temperature": (request(row, SamplingParams(temperature=-1.0)), ("temperature", ">= 0")),
        "top_p": (request(row, SamplingParams(top_p=1.5)), ("top_p", "1.5")),
        "min_p": (request(row, SamplingParams(min_p=1.0)), ("min_p",)),
        "presence_penalty": (request(row, SamplingParams(presence_penalty=3.0)), ("presence_penalty",)),
        "top_logprobs": (request(row, SamplingParams(top_logprobs=21)), ("top_logprobs", "21")),
        "top_k_above_candidates": (request(top_k(row, 4), SamplingParams(top_k=5)), ("top_k", "candidates")),
        "no_logits": (sampler_pb2.SampleRequest(), ("logits must be set",)),
        "nan_logits": (request(nan_row, SamplingParams()), ("logits", "finite")),
        "float16": (_bad_tensor(dtype=common_pb2.DTYPE_FLOAT16), ("full.dtype", "DTYPE_FLOAT16")),
        "unknown_dtype": (_bad_tensor(dtype=99), ("full.dtype", "99")),
        "short_data": (_bad_tensor(data=b"\0" * 31), ("full.data", "31 bytes", "32")),
        "two_dimensions": (_bad_tensor(shape=[2, 4]), ("full.shape", "(2, 4)")),
        "empty": (_bad_tensor(shape=[0], data=b""), ("full", "max_vocab")),
        "above_max_vocab": (
            request(np.zeros(limits.max_vocab + 1, np.float32), SamplingParams()),
            ("max_vocab",),
        ),
        "unpaired_candidates": (
            sampler_pb2.SampleRequest(candidates=sampler_pb2.Candidates(values=[1.0, 2.0], token_ids=[1])),
            ("candidates.token_ids", "candidates.values"),
        ),
        "repeated_candidates": (
            sampler_pb2.SampleRequest(candidates=sampler_pb2.Candidates(values=[1.0, 2.0], token_ids=[4, 4])),
            ("token_ids", "unique"),
        ),
    }


BAD_NAMES = [
    *("temperature", "top_p", "min_p", "presence_penalty", "top_logprobs", "top_k_above_candidates"),
    *("no_logits", "nan_logits", "float16", "unknown_dtype", "short_data", "two_dimensions", "empty"),
    *("above_max_vocab", "unpaired_candidates", "repeated_candidates"),
]


@pytest.mark.parametrize("case", BAD_NAMES)
async def test_bad_request_is_invalid_argument(
    case: str, stub: sampler_pb2_grpc.SamplerServiceStub, sampler_settings: SamplerSettings
) -> None:
    cases = _bad_requests(sampler_settings)
    assert sorted(cases) == sorted(BAD_NAMES)
    bad, words = cases[case]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await sample(stub, bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    for word in words:
        assert word in raised.value.details()
    handled = {"service": "sampler", "method": "Sample", "code": "INVALID_ARGUMENT"}
    assert REGISTRY.get_sample_value("synapse_grpc_server_handled_total", handled) >= 1


async def test_bad_batches_are_invalid_argument(
    stub: sampler_pb2_grpc.SamplerServiceStub, sampler_settings: SamplerSettings
) -> None:
    good = request(np.zeros(8, np.float32), SamplingParams())
    too_many = sampler_pb2.SampleBatchRequest(requests=[good] * (sampler_settings.max_batch + 1))
    bad_row = sampler_pb2.SampleBatchRequest(
        requests=[good, request(np.zeros(8, np.float32), SamplingParams(top_p=2.0))]
    )
    for batch, words in ((too_many, ("requests", "max_batch")), (bad_row, ("requests[1]", "top_p"))):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SampleBatch(batch, timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for word in words:
            assert word in raised.value.details()


async def test_samples_are_counted(stub: sampler_pb2_grpc.SamplerServiceStub) -> None:
    labels = {"input": "candidates", "mode": "sampled"}
    before = REGISTRY.get_sample_value("synapse_sampler_samples_total", labels) or 0.0
    await sample(stub, request(top_k(np.arange(8, dtype=np.float32), 8), SamplingParams(seed=1)))
    assert REGISTRY.get_sample_value("synapse_sampler_samples_total", labels) == before + 1


async def test_health_serving_and_reflection(connection: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(connection)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(connection)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name async for reply in call for service in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
