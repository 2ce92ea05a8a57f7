"""KVPool slots, the StepPlan layout of a batched step, and attention over the pool against plain attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.gpt2.kv_pool import KVPool, StepPlan, _gathered_attention, _varlen_attention, pool_attention

N_HEAD, HEAD_DIM, POSITIONS = 2, 8, 16


def make_pool(slots: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(2, N_HEAD, HEAD_DIM, slots=slots, max_positions=POSITIONS, dtype=dtype, device=device)


def test_slots_are_handed_out_lowest_first_and_a_full_pool_is_resource_exhausted() -> None:
    pool = make_pool()
    assert [pool.acquire() for _ in range(3)] == [0, 1, 2]
    assert pool.scratch_slot == 3 and pool.free_slots == 0
    with pytest.raises(ResourceExhausted, match="all 3 KV cache slots of this stage are in use") as raised:
        pool.acquire()
    assert raised.value.status == "RESOURCE_EXHAUSTED"
    pool.commit(1, 5)
    pool.release(1)
    pool.release(1)  # twice: ignored, the slot is handed out once
    assert pool.acquire() == 1 and pool.lengths[1] == 0 and pool.free_slots == 0
    pool.commit(1, 5)
    pool.truncate(1, 2)
    assert pool.lengths[1] == 2
    with pytest.raises(InvalidArgument, match="cannot truncate a cache of 2 tokens to 3"):
        pool.truncate(1, 3)
    assert pool.nbytes == 2 * 4 * POSITIONS * 2 * N_HEAD * HEAD_DIM * 4  # layers, slots + scratch, ..., f32


def test_step_plan_lays_out_a_mixed_batch_in_one_int32_array() -> None:
    # Request 0: slot 2, decode at position 5. Request 1: slot 0, prompt of 3 tokens from position 0.
    plan = StepPlan.of([2, 0], [5, 0], [1, 3], POSITIONS)
    assert (plan.batch, plan.tokens, plan.max_query, plan.max_key) == (2, 4, 3, 6)
    ints = plan.ints(np.array([7, 8, 9, 10]))
    assert ints.dtype == np.int32 and ints.shape == (5 * 4 + 2 * 3 + 2 * 2,)
    meta = plan.meta(torch.from_numpy(ints))
    assert meta.tokens.tolist() == [7, 8, 9, 10]
    assert meta.positions.tolist() == [5, 0, 1, 2]
    assert meta.kv_rows.tolist() == [2 * POSITIONS + 5, 0, 1, 2]
    assert meta.token_request.tolist() == [0, 1, 1, 1] and meta.token_offset.tolist() == [0, 0, 1, 2]
    assert meta.seqstart_q.tolist() == [0, 1, 4] and meta.seqstart_k.tolist() == [2 * POSITIONS, 0, 0]
    assert meta.seqlen_k.tolist() == [6, 3] and meta.last_rows.tolist() == [0, 3]
    padded = plan.padded(4, scratch_slot=3)
    assert padded.slots.tolist() == [2, 0, 3, 3] and padded.starts.tolist() == [5, 0, 0, 0]
    assert padded.counts.tolist() == [1, 3, 1, 1]
    with pytest.raises(InvalidArgument, match="cannot pad a batch of 2 requests to 1"):
        plan.padded(1, 3)


def reference_attention(queries: Tensor, keys: Tensor, values: Tensor, past: int) -> Tensor:
    """Plain causal attention in float64: (T, nh, hs) queries over (past + T, nh, hs) keys and values."""
    q, k, v = (tensor.double().transpose(0, 1) for tensor in (queries, keys, values))  # (nh, *, hs)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (nh, T, S)
    T, S = q.shape[1], k.shape[1]
    visible = torch.arange(S).view(1, S) <= past + torch.arange(T).view(T, 1)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1)  # (T, nh, hs)


def check_against_reference(pool: KVPool, plan: StepPlan, tolerance: float, attention=pool_attention) -> None:
    """Random keys/values for every slot's positions < its end, random queries; pool attention vs plain."""
    generator = torch.Generator().manual_seed(plan.tokens)
    kv = pool.layer(0)
    kv.copy_(torch.randn(kv.shape, generator=generator).to(kv.dtype))
    queries = torch.randn(plan.tokens, N_HEAD, HEAD_DIM, generator=generator).to(kv.dtype).to(kv.device)
    meta = plan.meta(torch.from_numpy(plan.ints()).to(kv.device))
    output = attention(queries, kv, meta).float().cpu()
    offset = 0
    for slot, start, count in zip(plan.slots, plan.starts, plan.counts, strict=True):
        rows = kv[slot * POSITIONS : slot * POSITIONS + start + count].cpu()
        expected = reference_attention(queries[offset : offset + count].cpu(), rows[:, 0], rows[:, 1], int(start))
        assert (output[offset : offset + count] - expected).abs().max().item() <= tolerance
        offset += count


PLANS = {
    "one decode": ([1], [9], [1]),
    "one prompt with a cached past": ([2], [4], [5]),
    "decodes in any slot order": ([2, 0, 1], [3, 12, 0], [1, 1, 1]),
    "decodes and prompts mixed": ([1, 2, 0], [7, 0, 2], [1, 6, 3]),
}


@pytest.mark.parametrize("case", PLANS)
def test_pool_attention_matches_plain_causal_attention(case: str) -> None:
    pool = make_pool()
    check_against_reference(pool, StepPlan.of(*PLANS[case], POSITIONS), tolerance=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-only: the varlen kernel needs CUDA")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("case", PLANS)
def test_varlen_kernel_on_cuda_matches_plain_and_gathered_attention(case, dtype, tolerance) -> None:
    pool = make_pool(device="cuda", dtype=dtype)
    plan = StepPlan.of(*PLANS[case], POSITIONS)
    check_against_reference(pool, plan, tolerance, attention=_varlen_attention)
    check_against_reference(pool, plan, tolerance, attention=_gathered_attention)
