"""The GPT-2 math of one pipeline stage (a layer range), its per-request KV cache, and top-k of logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.common.errors import InvalidArgument
from services.common.gpt2.checkpoint import expected_shapes, stage_tensor_names
from services.common.gpt2.config import GPT2Config

INITIAL_CACHE_CAPACITY = 16  # tokens; the cache doubles from here
# Hugging Face stores these as Conv1D (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
# cuDNN attention builds a new plan for every new key length, i.e. every decode step: on an H200 that
# made a GPT-2 124M decode step 58 ms instead of 4 ms. The other backends have no such setup cost.
# Only applied on CUDA: on the CPU the default choice is the fast one for small shapes.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of one request for every layer of one stage, preallocated and grown by doubling."""

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        head_dim: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        self.n_layer, self.n_head, self.head_dim, self.max_length = n_layer, n_head, head_dim, max_length
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0  # tokens stored and committed
        self._keys = torch.empty(n_layer, n_head, 0, head_dim, dtype=dtype, device=self.device)
        self._values = torch.empty_like(self._keys)

    @property
    def capacity(self) -> int:
        """Tokens that fit before the next reallocation."""
        return self._keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self._keys.nbytes + self._values.nbytes

    def keys(self, layer: int) -> Tensor:
        """Committed keys of a stage-local layer: (n_head, length, head_dim)."""
        return self._keys[layer, :, : self.length]

    def values(self, layer: int) -> Tensor:
        """Committed values of a stage-local layer: (n_head, length, head_dim)."""
        return self._values[layer, :, : self.length]

    def reserve(self, new_tokens: int) -> None:
        """Make room for new_tokens more tokens, doubling the capacity as needed."""
        needed = self.length + new_tokens
        if needed > self.max_length:
            raise InvalidArgument(
                f"context is full: {self.length} cached + {new_tokens} new tokens exceed "
                f"the model's {self.max_length} positions"
            )
        if needed <= self.capacity:
            return
        capacity = max(INITIAL_CACHE_CAPACITY, self.capacity)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_length)
        shape = (self.n_layer, self.n_head, capacity, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        keys[:, :, : self.length] = self._keys[:, :, : self.length]
        values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values

    def write(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store (n_head, T, head_dim) new keys/values after the committed ones (call reserve first).

        Returns the layer's keys and values including the new ones: (n_head, length + T, head_dim).
        The new tokens count only once commit(T) is called, after every layer has been written.
        """
        end = self.length + keys.shape[1]
        self._keys[layer, :, self.length : end] = keys
        self._values[layer, :, self.length : end] = values
        return self._keys[layer, :, :end], self._values[layer, :, :end]

    def commit(self, new_tokens: int) -> None:
        """Count the last written new_tokens as cached."""
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (keeps the memory)."""
        if not 0 <= length <= self.length:
            raise InvalidArgument(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(
        self, x: Tensor, caches: Sequence[KVCache], layer: int, lengths: list[int], mask: Tensor | None
    ) -> Tensor:
        B, T, C = x.size()  # batch, padded new tokens, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # Each request stores only its real new tokens, then attends to its whole cache.
        cached = [cache.write(layer, k[b, :, : lengths[b]], v[b, :, : lengths[b]]) for b, cache in enumerate(caches)]
        if B == 1:
            keys, values = cached[0][0].unsqueeze(0), cached[0][1].unsqueeze(0)  # (1, nh, S, hs), no copy
        else:
            S = max(request_keys.shape[1] for request_keys, _ in cached)
            keys = k.new_zeros(B, self.n_head, S, C // self.n_head)  # (B, nh, S, hs), padded
            values = torch.zeros_like(keys)
            for b, (request_keys, request_values) in enumerate(cached):
                keys[b, :, : request_keys.shape[1]] = request_keys
                values[b, :, : request_values.shape[1]] = request_values
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


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

    def forward(
        self, x: Tensor, caches: Sequence[KVCache], layer: int, lengths: list[int], mask: Tensor | None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), caches, layer, lengths, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Stage(nn.Module):
    """Layers [start, end) of a GPT-2 model, run for a batch of requests that each bring their own KV cache.

    The first stage (start == 0) owns the token and position embeddings (wte, wpe) and takes token ids.
    The last stage (end == n_layer) owns ln_f and the LM head, which GPT-2 ties to wte: so the last
    stage holds wte too and receives it as `wte.weight` in its tensors even when it is not the first
    stage. Other stages take and return activations (T, n_embd). Model layer i is self.h[i - start].
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

    def new_cache(self) -> KVCache:
        """An empty KV cache for one request on this stage."""
        weight = self.h[0].ln_1.weight
        config = self.config
        return KVCache(
            len(self.h),
            config.n_head,
            config.head_dim,
            config.n_positions,
            dtype=weight.dtype,
            device=weight.device,
        )

    @torch.inference_mode()
    def forward(
        self,
        inputs: Sequence[Tensor],
        caches: Sequence[KVCache],
        *,
        positions: Sequence[Tensor] | None = None,
        last_only: bool = False,
    ) -> list[Tensor]:
        """Run new tokens of several requests at once, appending them to each request's cache.

        inputs[i]: token ids (T_i,) on the first stage, else activations (T_i, n_embd).
        positions[i]: (T_i,) position ids, used by the first stage; default cache.length + arange(T_i).
        Returns activations (T_i, n_embd), or on the last stage logits (T_i, vocab), or (1, vocab)
        for each request's last token when last_only.
        """
        lengths = self._check_batch(inputs, caches, positions)
        past = [cache.length for cache in caches]
        x = self._embed(inputs, past, positions) if self.is_first else self._pad(inputs)  # (B, T, C)
        for cache, length in zip(caches, lengths, strict=True):
            cache.reserve(length)
        mask = _attention_mask(past, lengths, x.device)
        with sdpa_kernel(ATTENTION_BACKENDS) if x.is_cuda else nullcontext():
            for layer, block in enumerate(self.h):
                x = block(x, caches, layer, lengths, mask)
        for cache, length in zip(caches, lengths, strict=True):
            cache.commit(length)
        if not self.is_last:
            return [x[b, :length] for b, length in enumerate(lengths)]
        if last_only:
            rows = x[torch.arange(len(lengths)), torch.tensor(lengths) - 1]  # (B, C)
            lengths = [1] * len(lengths)
        else:
            rows = torch.cat([x[b, :length] for b, length in enumerate(lengths)])  # (sum T_i, C)
        logits = self._lm_head(self.ln_f(rows))  # (rows, vocab), tied to wte
        return list(logits.split(lengths))

    def _check_batch(
        self, inputs: Sequence[Tensor], caches: Sequence[KVCache], positions: Sequence[Tensor] | None
    ) -> list[int]:
        if not inputs or len(inputs) != len(caches):
            raise InvalidArgument(f"got {len(inputs)} inputs and {len(caches)} caches; need one each per request")
        if len({id(cache) for cache in caches}) != len(caches):
            raise InvalidArgument("the same KV cache appears twice in one batch")
        if positions is not None and len(positions) != len(inputs):
            raise InvalidArgument(f"got {len(positions)} position tensors for {len(inputs)} requests")
        config = self.config
        expected = "token ids (T,)" if self.is_first else f"activations (T, {config.n_embd})"
        lengths = []
        for index, (tensor, cache) in enumerate(zip(inputs, caches, strict=True)):
            good_shape = tensor.dim() == 1 if self.is_first else tensor.dim() == 2
            if not good_shape or tensor.shape[0] == 0 or (not self.is_first and tensor.shape[1] != config.n_embd):
                raise InvalidArgument(f"request {index}: expected {expected}, got shape {list(tensor.shape)}")
            if cache.n_layer != len(self.h) or cache.head_dim != config.head_dim or cache.n_head != config.n_head:
                raise InvalidArgument(f"request {index}: KV cache was not made by this stage's new_cache()")
            if cache.length + tensor.shape[0] > config.n_positions:
                raise InvalidArgument(
                    f"request {index}: {cache.length} cached + {tensor.shape[0]} new tokens exceed "
                    f"the model's {config.n_positions} positions"
                )
            if self.is_first and positions is not None and positions[index].shape != tensor.shape:
                raise InvalidArgument(
                    f"request {index}: positions have shape {list(positions[index].shape)}, "
                    f"expected {list(tensor.shape)} like its token ids"
                )
            lengths.append(tensor.shape[0])
        return lengths

    def _embed(self, inputs: Sequence[Tensor], past: list[int], positions: Sequence[Tensor] | None) -> Tensor:
        B, T = len(inputs), max(tensor.shape[0] for tensor in inputs)
        tokens = torch.zeros(B, T, dtype=torch.long)  # built on the CPU: checked without a device sync
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for b, tensor in enumerate(inputs):
            length = tensor.shape[0]
            tokens[b, :length] = tensor.cpu()
            given = None if positions is None else positions[b].cpu()
            position_ids[b, :length] = torch.arange(past[b], past[b] + length) if given is None else given
        config = self.config
        if tokens.min() < 0 or tokens.max() >= config.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {config.vocab_size})")
        if position_ids.min() < 0 or position_ids.max() >= config.n_positions:
            raise InvalidArgument(f"positions must be in [0, {config.n_positions})")
        device = self.wte.weight.device
        return self.wte(tokens.to(device)) + self.wpe(position_ids.to(device))  # (B, T, C)

    def _pad(self, inputs: Sequence[Tensor]) -> Tensor:
        weight = self.h[0].ln_1.weight
        if len(inputs) == 1:
            return inputs[0].to(device=weight.device, dtype=weight.dtype).unsqueeze(0)  # (1, T, C)
        T = max(tensor.shape[0] for tensor in inputs)
        x = weight.new_zeros(len(inputs), T, self.config.n_embd)  # (B, T, C)
        for b, tensor in enumerate(inputs):
            x[b, : tensor.shape[0]] = tensor
        return x


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits along the last dimension, largest first: values float32, token ids int64."""
    if k < 1:
        raise InvalidArgument(f"top-k needs k >= 1, got {k}")
    values, token_ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    return values.float(), token_ids.long()


def _attention_mask(past: list[int], lengths: list[int], device: torch.device) -> Tensor | None:
    """Boolean (B, 1, T, S) mask: query j of request b sees cached/new keys s <= past[b] + j."""
    if len(past) == 1 and lengths[0] == 1:
        return None  # one new token sees its whole cache
    S = max(p + n for p, n in zip(past, lengths, strict=True))
    T = max(lengths)
    last_visible = torch.tensor(past).view(-1, 1, 1) + torch.arange(T).view(1, T, 1)  # (B, T, 1)
    return (torch.arange(S).view(1, 1, S) <= last_visible).unsqueeze(1).to(device)  # (B, 1, T, S)


def _local_name(name: str, start: int) -> str:
    """Model layer i is stage block i - start: "h.7.ln_1.weight" -> "h.1.ln_1.weight" when start is 6."""
    if not name.startswith("h."):
        return name
    _, layer, rest = name.split(".", 2)
    return f"h.{int(layer) - start}.{rest}"
