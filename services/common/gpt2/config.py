"""The GPT-2 hyperparameters Synapse needs, read from and written to Hugging Face config.json dicts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument

SUPPORTED_ACTIVATION = "gelu_new"  # the tanh approximation of GELU that GPT-2 was trained with


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model: layers, heads, widths, and the LayerNorm epsilon."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"GPT-2 config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise InvalidArgument(f"GPT-2 config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        epsilon = self.layer_norm_epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
            raise InvalidArgument(f"GPT-2 config: layer_norm_epsilon must be in (0, 1), got {epsilon!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (n_embd // n_head)."""
        return self.n_embd // self.n_head

    def check_layer_range(self, start: int, end: int) -> None:
        """Raise InvalidArgument unless [start, end) is a non-empty range of this model's layers."""
        if not 0 <= start < end <= self.n_layer:
            raise InvalidArgument(f"layer range [{start}, {end}) is not a non-empty part of [0, {self.n_layer})")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> GPT2Config:
        """Read a Hugging Face GPT-2 config.json dict, rejecting anything this code cannot run."""
        if not isinstance(config, Mapping):
            raise InvalidArgument(f"GPT-2 config must be a JSON object, got {type(config).__name__}")
        _check_is_gpt2(config)
        _check_supported_features(config)
        n_positions = config.get("n_positions", config.get("n_ctx"))
        missing = [
            name
            for name, value in (
                ("n_layer", config.get("n_layer")),
                ("n_head", config.get("n_head")),
                ("n_embd", config.get("n_embd")),
                ("vocab_size", config.get("vocab_size")),
                ("n_positions", n_positions),
            )
            if value is None
        ]
        if missing:
            raise InvalidArgument(f"GPT-2 config is missing {', '.join(missing)}")
        return cls(
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_embd=config["n_embd"],
            vocab_size=config["vocab_size"],
            n_positions=n_positions,
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        )

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face compatible config.json dict (transformers' GPT2Config accepts it)."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": SUPPORTED_ACTIVATION,
        }


def _check_is_gpt2(config: Mapping[str, Any]) -> None:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "gpt2" or "GPT2LMHeadModel" in architectures:
        return
    raise InvalidArgument(
        f"not a GPT-2 config: model_type is {model_type!r} and architectures is {list(architectures)!r}; "
        "expected model_type 'gpt2' or architectures containing 'GPT2LMHeadModel'"
    )


def _check_supported_features(config: Mapping[str, Any]) -> None:
    """Reject GPT-2 variants whose math differs from the one implemented in model.py."""
    activation = config.get("activation_function", SUPPORTED_ACTIVATION)
    if activation != SUPPORTED_ACTIVATION:
        raise InvalidArgument(
            f"GPT-2 config: activation_function {activation!r} is not supported; only {SUPPORTED_ACTIVATION!r}"
        )
    n_embd, n_inner = config.get("n_embd"), config.get("n_inner")
    if n_inner is not None and n_inner != 4 * (n_embd or 0):
        raise InvalidArgument(f"GPT-2 config: n_inner {n_inner!r} is not supported; only null (4 * n_embd)")
    unsupported = {
        "scale_attn_by_inverse_layer_idx": True,
        "scale_attn_weights": False,
        "add_cross_attention": True,
        "tie_word_embeddings": False,
    }
    for name, bad_value in unsupported.items():
        if config.get(name) is bad_value:
            raise InvalidArgument(f"GPT-2 config: {name}={bad_value} is not supported")
