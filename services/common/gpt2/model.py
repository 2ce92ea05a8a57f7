"""The GPT-2 math of one pipeline stage (a layer range) over a pooled KV cache, and top-k of logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.common.errors import InvalidArgument
from services.common.gpt2.checkpoint import expected_shapes, stage_tensor_names
from services.common.gpt2.config import GPT2Config
from services.common.gpt2.kv_pool import BatchMeta, KVCache, KVPool, StepPlan, pool_attention

# Hugging Face stores these as Conv1D (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
OWN_POOL_SLOTS = 4  # first size of the pool a stage keeps for new_cache(); it doubles when full


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, kv: Tensor, meta: BatchMeta, kv_rows: Tensor) -> Tensor:
        N, C = x.size()  # new tokens of every request in the batch, n_embd
        qkv = self.c_attn(x).view(N, 3, self.n_head, C // self.n_head)  # (N, 3, nh, hs)
        kv.index_copy_(0, kv_rows, qkv[:, 1:])  # every new key and value into the pool, in one write
        y = pool_attention(qkv[:, 0], kv, meta)  # (N, nh, hs)
        return self.c_proj(y.reshape(N, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv: Tensor, meta: BatchMeta, kv_rows: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, meta, kv_rows)
        return x + self.mlp(self.ln_2(x))


class GPT2Stage(nn.Module):
    """Layers [start, end) of a GPT-2 model, run for a batch of requests whose keys and values live in a KVPool.

    The first stage (start == 0) owns the token and position embeddings (wte, wpe) and takes token ids.
    The last stage (end == n_layer) owns ln_f and the LM head, which GPT-2 ties to wte: so the last
    stage holds wte too and receives it as `wte.weight` in its tensors even when it is not the first
    stage. Other stages take and return activations (T, n_embd). Model layer i is self.h[i - start].
    forward_step is the serving path (graph-safe, one batch laid out by a StepPlan); forward is the
    convenience form over per-request KVCache handles.
    """

    def __init__(self, config: GPT2Config, start: int, end: int) -> None:
        super().__init__()
        config.check_layer_range(start, end)
        self.config, self.start, self.end = config, start, end
        self.is_first, self.is_last = start == 0, end == config.n_layer
        if self.is_first or self.is_last:
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # also the LM head
        if self.is_first:
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(start, end))
        if self.is_last:
            self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    @classmethod
    def from_tensors(
        cls,
        config: GPT2Config,
        start: int,
        end: int,
        tensors: Mapping[str, Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> GPT2Stage:
        """Build the stage from canonical tensors (Conv1D layout, any float dtype; extras ignored)."""
        with torch.device("meta"):
            stage = cls(config, start, end)  # no memory, no random init: the tensors are assigned below
        shapes = expected_shapes(config)
        state: dict[str, Tensor] = {}
        for name in stage_tensor_names(config, start, end):
            if name not in tensors:
                raise InvalidArgument(f"stage [{start}, {end}) needs tensor {name!r}, which was not given")
            tensor = tensors[name]
            if tuple(tensor.shape) != shapes[name]:
                raise InvalidArgument(f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shapes[name])}")
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # Conv1D (in, out) -> nn.Linear (out, in)
            state[_local_name(name, start)] = tensor.to(device=device, dtype=dtype).contiguous()
        if stage.is_last:
            # The LM head reads wte as (n_embd, vocab), contiguous: on CPU a one-row x @ W over that layout
            # runs about twice as fast as F.linear over (vocab, n_embd) (GPT-2 124M: 6.7 vs 12 ms a token).
            # The embedding keeps a transposed view of the same memory, so nothing is stored twice.
            head = state["wte.weight"].t().contiguous()  # (C, vocab)
            state["wte.weight"] = head.t()
        stage.load_state_dict(state, strict=True, assign=True)
        if stage.is_last:
            stage.register_buffer("lm_head", head, persistent=False)
        return stage.eval().requires_grad_(False)

    def _lm_head(self, x: Tensor) -> Tensor:
        head = getattr(self, "lm_head", None)  # set by from_tensors; a stage built directly has only wte
        return x @ head if head is not None else F.linear(x, self.wte.weight)

    def logits(self, hidden: Tensor) -> Tensor:
        """Last stage: (rows, n_embd) hidden states after the last layer -> (rows, vocab) logits."""
        return self._lm_head(self.ln_f(hidden))

    def new_pool(self, slots: int) -> KVPool:
        """A KV pool of `slots` requests for this stage's layers, on its device, in its dtype."""
        weight, config = self.h[0].ln_1.weight, self.config
        return KVPool(
            len(self.h),
            config.n_head,
            config.head_dim,
            slots=slots,
            max_positions=config.n_positions,
            dtype=weight.dtype,
            device=weight.device,
        )

    def new_cache(self) -> KVCache:
        """A KV cache for one request, a slot of a pool this stage keeps for forward() (doubled when full)."""
        pool = self.__dict__.get("own_pool")
        if pool is None:
            pool = self.own_pool = self.new_pool(OWN_POOL_SLOTS)
        if not pool.free_slots:
            pool.grow(2 * pool.slots)
        return KVCache(pool, pool.acquire())

    @torch.inference_mode()
    def forward_step(self, meta: BatchMeta, pool: KVPool, activations: Tensor | None = None) -> Tensor:
        """One step of a batch laid out by a StepPlan: the new tokens of every request, concatenated.

        The first stage reads token ids from meta.tokens; the others take (N, n_embd) activations.
        Writes every new key and value into the pool; returns (N, n_embd) hidden states after the last
        layer (before ln_f). No host synchronization on CUDA, so a CUDA graph can capture it.
        """
        x = self.wte(meta.tokens) + self.wpe(meta.positions) if self.is_first else activations  # (N, C)
        kv_rows = meta.kv_rows.long()  # index_copy_ takes int64
        for layer, block in enumerate(self.h):
            x = block(x, pool.layer(layer), meta, kv_rows)
        return x

    @torch.inference_mode()
    def forward(self, inputs: Sequence[Tensor], caches: Sequence[KVCache], *, last_only: bool = False) -> list[Tensor]:
        """Run new tokens of several requests at once, appending them to each request's cache.

        inputs[i]: token ids (T_i,) on the first stage, else activations (T_i, n_embd).
        Returns activations (T_i, n_embd), or on the last stage logits (T_i, vocab), or (1, vocab)
        for each request's last token when last_only.
        """
        lengths = self._check_batch(inputs, caches)
        pool = caches[0].pool
        plan = StepPlan.of([c.slot for c in caches], [c.length for c in caches], lengths, pool.max_positions)
        token_ids = self._token_ids(inputs) if self.is_first else None
        meta = plan.meta(torch.from_numpy(plan.ints(token_ids)).to(pool.kv.device))
        weight = self.h[0].ln_1.weight
        activations = None if self.is_first else torch.cat(list(inputs)).to(weight.device, weight.dtype)
        hidden = self.forward_step(meta, pool, activations)
        for cache, length in zip(caches, lengths, strict=True):
            pool.commit(cache.slot, length)
        if not self.is_last:
            return list(hidden.split(lengths))
        if last_only:
            hidden, lengths = hidden[meta.last_rows.long()], [1] * len(lengths)
        return list(self.logits(hidden).split(lengths))

    def _check_batch(self, inputs: Sequence[Tensor], caches: Sequence[KVCache]) -> list[int]:
        if not inputs or len(inputs) != len(caches):
            raise InvalidArgument(f"got {len(inputs)} inputs and {len(caches)} caches; need one each per request")
        if len({id(cache) for cache in caches}) != len(caches):
            raise InvalidArgument("the same KV cache appears twice in one batch")
        config = self.config
        expected = "token ids (T,)" if self.is_first else f"activations (T, {config.n_embd})"
        lengths = []
        for index, (tensor, cache) in enumerate(zip(inputs, caches, strict=True)):
            good_shape = tensor.dim() == 1 if self.is_first else tensor.dim() == 2
            if not good_shape or tensor.shape[0] == 0 or (not self.is_first and tensor.shape[1] != config.n_embd):
                raise InvalidArgument(f"request {index}: expected {expected}, got shape {list(tensor.shape)}")
            if cache.pool is not self.__dict__.get("own_pool"):
                raise InvalidArgument(f"request {index}: KV cache was not made by this stage's new_cache()")
            if cache.length + tensor.shape[0] > config.n_positions:
                raise InvalidArgument(
                    f"request {index}: {cache.length} cached + {tensor.shape[0]} new tokens exceed "
                    f"the model's {config.n_positions} positions"
                )
            lengths.append(tensor.shape[0])
        return lengths

    def _token_ids(self, inputs: Sequence[Tensor]) -> np.ndarray:
        token_ids = torch.cat([tensor.cpu() for tensor in inputs]).numpy()  # checked without a device sync
        if token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.config.vocab_size})")
        return token_ids


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits along the last dimension, largest first: values float32, token ids int64."""
    if k < 1:
        raise InvalidArgument(f"top-k needs k >= 1, got {k}")
    values, token_ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    return values.float(), token_ids.long()


def ranked_top_k(logits: Tensor, k: int) -> Tensor:
    """(B, vocab) logits -> (B, 2k) int32 on the same device: the k largest values as float32 bits, then their
    token ids, ranked by exact float32 value descending, then lower id (as argmax breaks ties). Graph-safe."""
    values, token_ids = torch.topk(logits, k, dim=-1)  # (B, k), largest first, ties in any order
    token_ids, order = token_ids.sort(dim=-1)  # lower id first ...
    values = values.gather(-1, order).float()  # exact: float16 and bfloat16 values widen without rounding
    values, order = values.sort(dim=-1, descending=True, stable=True)  # ... kept among equal values
    token_ids = token_ids.gather(-1, order)
    return torch.cat([values.view(torch.int32), token_ids.int()], dim=-1)


def _local_name(name: str, start: int) -> str:
    """Model layer i is stage block i - start: "h.7.ln_1.weight" -> "h.1.ln_1.weight" when start is 6."""
    if not name.startswith("h."):
        return name
    _, layer, rest = name.split(".", 2)
    return f"h.{int(layer) - start}.{rest}"
