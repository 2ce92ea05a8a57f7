"""Memory footprint of a GPT-2 model's pipeline stages: bytes per layer, embeddings, LM head, KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.common.gpt2.config import GPT2Config

# Bytes per element of the dtypes a shard can be stored in (names as in torch / safetensors docs).
DTYPE_BYTES: dict[str, int] = {"float16": 2, "float32": 4}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype`; InvalidArgument for a dtype shards cannot be stored in."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise InvalidArgument(f"unsupported shard dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelFootprint:
    """What each part of the model costs in memory on a node, in bytes.

    A stage [start, end) holds its layers (weights + KV cache reserve), the token embedding `wte` when
    it is first or last (the last stage uses it as the tied LM head), the position embedding `wpe`
    when first, and the final LayerNorm when last. A stage that is both first and last holds one `wte`.
    """

    n_layer: int
    layer_bytes: int  # weights of one transformer block
    kv_bytes_per_layer: int  # KV cache reserved per block on the node (0 = none reserved)
    token_embedding_bytes: int  # wte (vocab_size, n_embd)
    position_embedding_bytes: int  # wpe (n_positions, n_embd)
    final_norm_bytes: int  # ln_f weight + bias
    # Compute of the last stage's LM head (logits = h @ wte.T) in units of one layer's compute; the
    # planner adds it to the last stage's time. 0 ignores it.
    head_work_layers: float = 0.0

    def __post_init__(self) -> None:
        if self.n_layer < 1:
            raise InvalidArgument(f"a model needs at least one layer, got n_layer={self.n_layer}")
        sizes = (
            self.layer_bytes,
            self.kv_bytes_per_layer,
            self.token_embedding_bytes,
            self.position_embedding_bytes,
            self.final_norm_bytes,
        )
        if any(size < 0 for size in sizes) or self.layer_bytes + self.kv_bytes_per_layer <= 0:
            raise InvalidArgument(f"footprint sizes must be >= 0 and a layer must cost bytes: {self}")
        if not (math.isfinite(self.head_work_layers) and self.head_work_layers >= 0):
            raise InvalidArgument(f"head_work_layers must be finite and >= 0, got {self.head_work_layers}")

    @property
    def per_layer_bytes(self) -> int:
        """Weights plus KV cache reserve of one layer."""
        return self.layer_bytes + self.kv_bytes_per_layer

    def extra_bytes(self, *, first: bool, last: bool) -> int:
        """Bytes a stage holds besides its layers, depending on its place in the pipeline."""
        extra = self.token_embedding_bytes if (first or last) else 0
        if first:
            extra += self.position_embedding_bytes
        if last:
            extra += self.final_norm_bytes
        return extra

    def stage_bytes(self, start: int, end: int) -> int:
        """Bytes a node needs to run layers [start, end)."""
        if not 0 <= start < end <= self.n_layer:
            raise InvalidArgument(f"layer range [{start}, {end}) is not inside [0, {self.n_layer})")
        layers = (end - start) * self.per_layer_bytes
        return layers + self.extra_bytes(first=start == 0, last=end == self.n_layer)

    @property
    def total_bytes(self) -> int:
        """Bytes the whole model needs on one node (one copy of wte)."""
        return self.stage_bytes(0, self.n_layer)


def layer_parameter_count(n_embd: int) -> int:
    """Parameters of one GPT-2 block: two LayerNorms, attention (c_attn, c_proj) and MLP (c_fc, c_proj)."""
    layer_norms = 2 * 2 * n_embd
    attention = (n_embd * 3 * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd)
    mlp = (n_embd * 4 * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    return layer_norms + attention + mlp  # 12 * C^2 + 13 * C


def footprint(config: GPT2Config, dtype: str = "float16", *, kv_cache_tokens: int = 0) -> ModelFootprint:
    """Footprint of `config` stored as `dtype`.

    `kv_cache_tokens` is how many token positions of KV cache each node reserves per layer, summed over
    the requests it serves at once (batch x context); each costs 2 (K and V) x n_embd elements.
    The LM head reads vocab_size x n_embd weights per token, about 5.4 layers' worth for GPT-2 124M.
    """
    if kv_cache_tokens < 0:
        raise InvalidArgument(f"kv_cache_tokens must be >= 0, got {kv_cache_tokens}")
    element = dtype_bytes(dtype)
    n_embd = config.n_embd
    return ModelFootprint(
        n_layer=config.n_layer,
        layer_bytes=layer_parameter_count(n_embd) * element,
        kv_bytes_per_layer=2 * kv_cache_tokens * n_embd * element,
        token_embedding_bytes=config.vocab_size * n_embd * element,
        position_embedding_bytes=config.n_positions * n_embd * element,
        final_norm_bytes=2 * n_embd * element,
        head_work_layers=config.vocab_size * n_embd / layer_parameter_count(n_embd),
    )
