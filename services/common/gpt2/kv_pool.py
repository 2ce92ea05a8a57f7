"""The pooled KV cache of a stage: preallocated slots, the layout of one batched step, and attention over the pool."""

from __future__ import annotations

import heapq
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from services.common.errors import InvalidArgument, ResourceExhausted

# custom_mask_type of aten's memory-efficient attention: query j of a request with T new tokens and S keys
# sees keys <= S - T + j, i.e. its cached keys and the new ones up to itself.
CAUSAL_FROM_BOTTOM_RIGHT = 2


class KVPool:
    """Keys and values of up to `slots` requests for every layer of a stage, allocated once.

    kv: (n_layer, (slots + 1) * max_positions, 2, n_head, head_dim). Slot s owns the rows
    [s * max_positions, (s + 1) * max_positions): position p of its request is row s * max_positions + p.
    The extra last slot is scratch: the padding rows of a CUDA graph write and read there.
    `lengths[s]` counts the tokens of slot s that are stored and committed.
    """

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        head_dim: int,
        *,
        slots: int,
        max_positions: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if slots < 1 or max_positions < 1:
            raise InvalidArgument(f"a KV pool needs at least one slot and one position, got {slots}, {max_positions}")
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.slots, self.max_positions = slots, max_positions
        self.kv = _allocate((n_layer, (slots + 1) * max_positions, 2, n_head, head_dim), dtype, torch.device(device))
        self.lengths = [0] * (slots + 1)
        self._free = list(range(slots))  # a heap: acquire() hands out the lowest free slot
        self._in_use: set[int] = set()

    @property
    def scratch_slot(self) -> int:
        return self.slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def layer(self, index: int) -> Tensor:
        """Keys and values of one stage-local layer: (rows, 2, n_head, head_dim), a view."""
        return self.kv[index]

    def acquire(self) -> int:
        """A free slot, emptied; ResourceExhausted when every slot is taken."""
        if not self._free:
            raise ResourceExhausted(
                f"all {self.slots} KV cache slots of this stage are in use; "
                "retry once requests finish or are released, or give the node more slots"
            )
        slot = heapq.heappop(self._free)
        self._in_use.add(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back (a slot that is not in use is ignored)."""
        if slot in self._in_use:
            self._in_use.remove(slot)
            heapq.heappush(self._free, slot)

    def truncate(self, slot: int, length: int) -> None:
        """Forget every token of a slot from position `length` on (the rows are overwritten later)."""
        if not 0 <= length <= self.lengths[slot]:
            raise InvalidArgument(f"cannot truncate a cache of {self.lengths[slot]} tokens to {length}")
        self.lengths[slot] = length

    def commit(self, slot: int, new_tokens: int) -> None:
        """Count the last written new_tokens of a slot as cached."""
        self.lengths[slot] += new_tokens

    def grow(self, slots: int) -> None:
        """Room for more slots, keeping every stored row (the tensor moves: never under a captured graph)."""
        if slots <= self.slots:
            return
        rows = self.slots * self.max_positions
        shape = (self.n_layer, (slots + 1) * self.max_positions, *self.kv.shape[2:])
        kv = _allocate(shape, self.kv.dtype, self.kv.device)
        kv[:, :rows] = self.kv[:, :rows]
        for slot in range(self.slots, slots):
            heapq.heappush(self._free, slot)
        self.kv, self.lengths = kv, [*self.lengths[:-1], *[0] * (slots - self.slots), 0]
        self.slots = slots


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # CUDA memory is committed by cudaMalloc anyway, so zero it. On the CPU torch.empty leaves the pages
    # uncommitted until a request writes them (RSS grows with use); attention never reads an unwritten row.
    allocate = torch.zeros if device.type == "cuda" else torch.empty
    return allocate(shape, dtype=dtype, device=device)


class KVCache:
    """One request's slot in a KVPool, for GPT2Stage.forward; the slot goes back when this is released or freed."""

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool, self.slot = pool, slot
        self._release = weakref.finalize(self, pool.release, slot)

    @property
    def length(self) -> int:
        """Tokens stored and committed."""
        return self.pool.lengths[self.slot]

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on."""
        self.pool.truncate(self.slot, length)

    def release(self) -> None:
        self._release()


@dataclass(frozen=True)
class StepPlan:
    """Where the new tokens of one batched step go: request b brings counts[b] tokens at positions
    starts[b], starts[b] + 1, ... of slot slots[b]. Host arrays, (B,) int64 each."""

    slots: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    max_positions: int

    @classmethod
    def of(cls, slots: list[int], starts: list[int], counts: list[int], max_positions: int) -> StepPlan:
        return cls(*(np.asarray(values, dtype=np.int64) for values in (slots, starts, counts)), max_positions)

    @property
    def batch(self) -> int:
        return len(self.slots)

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def max_query(self) -> int:
        """Most new tokens of one request (1: a decode-only step)."""
        return int(self.counts.max())

    @property
    def max_key(self) -> int:
        """Most keys one request attends to."""
        return int((self.starts + self.counts).max())

    def padded(self, size: int, scratch_slot: int) -> StepPlan:
        """The plan with one-token requests at position 0 of the scratch slot appended, up to `size` requests."""
        extra = size - self.batch
        if extra < 0:
            raise InvalidArgument(f"cannot pad a batch of {self.batch} requests to {size}")
        return StepPlan(
            np.concatenate([self.slots, np.full(extra, scratch_slot)]),
            np.concatenate([self.starts, np.zeros(extra, np.int64)]),
            np.concatenate([self.counts, np.ones(extra, np.int64)]),
            self.max_positions,
        )

    def ints(self, token_ids: np.ndarray | None = None) -> np.ndarray:
        """Everything a step reads, as one int32 array uploaded in one copy (laid out as meta() reads it)."""
        B, N = self.batch, self.tokens
        ends = np.cumsum(self.counts)
        request = np.repeat(np.arange(B), self.counts)  # (N,) the request of each new token
        offset = np.arange(N) - (ends - self.counts)[request]  # (N,) its index among that request's new tokens
        positions = self.starts[request] + offset
        first_rows = self.slots * self.max_positions
        tokens = np.zeros(N, np.int64) if token_ids is None else np.pad(token_ids, (0, N - len(token_ids)))
        parts = [
            tokens,
            positions,
            first_rows[request] + positions,  # kv row of each new token
            request,
            offset,
            np.concatenate([[0], ends]),  # seqstart_q (B + 1,)
            np.concatenate([first_rows, [0]]),  # seqstart_k (B + 1,); the last entry is unused
            self.starts + self.counts,  # seqlen_k (B,)
            ends - 1,  # last_rows (B,): each request's last new token
        ]
        return np.concatenate(parts).astype(np.int32)

    def meta(self, ints: Tensor) -> BatchMeta:
        """Views of an ints() array on the device, with the host-side sizes kernels are launched with."""
        B, N = self.batch, self.tokens
        sections = ints.split([N] * 5 + [B + 1, B + 1, B, B])
        return BatchMeta(*sections, batch=B, max_query=self.max_query, max_key=self.max_key)


@dataclass(frozen=True)
class BatchMeta:
    """One step's layout on the device (int32 tensors), read by the embedding, the KV write and attention."""

    tokens: Tensor  # (N,) token ids (first stage) else zeros
    positions: Tensor  # (N,) position of each new token
    kv_rows: Tensor  # (N,) pool row each new token's key and value go to
    token_request: Tensor  # (N,) request index of each new token
    token_offset: Tensor  # (N,) index of each new token within its request
    seqstart_q: Tensor  # (B + 1,) first new token of each request, then N
    seqstart_k: Tensor  # (B + 1,) first pool row of each request's slot
    seqlen_k: Tensor  # (B,) keys each request attends to: cached + new
    last_rows: Tensor  # (B,) each request's last new token
    batch: int
    max_query: int
    max_key: int


def pool_attention(queries: Tensor, kv: Tensor, meta: BatchMeta) -> Tensor:
    """Causal attention of every new token over its own request's slot: (N, nh, hs) queries, one layer's
    (rows, 2, nh, hs) pool -> (N, nh, hs). On CUDA one kernel reads the pool in place."""
    if queries.is_cuda:
        return _varlen_attention(queries, kv, meta)
    return _gathered_attention(queries, kv, meta)


def _varlen_attention(queries: Tensor, kv: Tensor, meta: BatchMeta) -> Tensor:
    """aten's memory-efficient kernel in its variable-length form: request b's keys are the seqlen_k[b] pool
    rows from seqstart_k[b], so requests may sit in any slots and any order, with no copy. Graph-safe:
    every per-step number is read from device memory."""
    output = torch.ops.aten._efficient_attention_forward(
        queries.unsqueeze(0),  # (1, N, nh, hs)
        kv[:, 0].unsqueeze(0),  # (1, rows, nh, hs) keys, strided view of the pool
        kv[:, 1].unsqueeze(0),  # values
        None,
        meta.seqstart_q,
        meta.seqstart_k,
        meta.max_query,
        meta.max_key,
        0.0,
        CAUSAL_FROM_BOTTOM_RIGHT,
        False,
        seqlen_k=meta.seqlen_k,
    )[0]
    return output[0]


def _gathered_attention(queries: Tensor, kv: Tensor, meta: BatchMeta) -> Tensor:
    """The portable form (CPU): one request reads its slot as a view; a batch gathers each request's rows
    (clamped, so no unwritten row is read) into (B, S) once per layer, then one masked SDPA."""
    B, T, S = meta.batch, meta.max_query, meta.max_key
    key_positions = torch.arange(S, device=kv.device)
    seqlen = meta.seqlen_k.long()
    if B == 1:
        start = int(meta.seqstart_k[0])
        rows = kv[start : start + S].unsqueeze(0)  # (1, S, 2, nh, hs), no copy
    else:
        index = meta.seqstart_k[:B, None].long() + torch.minimum(key_positions, seqlen[:, None] - 1)  # (B, S)
        rows = kv[index]  # (B, S, 2, nh, hs)
    keys, values = rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)  # (B, nh, S, hs)
    if T == 1:
        grid = queries.unsqueeze(2)  # (B, nh, 1, hs): one new token per request
    else:
        grid = queries.new_zeros(B, T, *queries.shape[1:])  # (B, T, nh, hs), padded
        grid[meta.token_request, meta.token_offset] = queries
        grid = grid.transpose(1, 2)
    mask = None
    if B > 1 or T > 1:  # one decode token sees every key; otherwise key s is visible to query j iff s <= past + j
        past = seqlen - (meta.seqstart_q[1:] - meta.seqstart_q[:-1]).long()  # (B,)
        last_visible = past.view(B, 1, 1) + torch.arange(T, device=kv.device).view(1, T, 1)  # (B, T, 1)
        mask = (key_positions.view(1, 1, S) <= last_visible).unsqueeze(1)  # (B, 1, T, S)
    y = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask)  # (B, nh, T, hs)
    if T == 1:
        return y.squeeze(2)
    return y.transpose(1, 2)[meta.token_request, meta.token_offset]  # (N, nh, hs)
