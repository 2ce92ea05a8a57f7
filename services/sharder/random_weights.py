"""A GPT-2 of a known shape with random weights, for machines that cannot reach the hub. Always labelled."""

from __future__ import annotations

import hashlib

import numpy as np

from services.common.gpt2.checkpoint import Checkpoint, expected_shapes
from services.common.gpt2.config import GPT2Config

# Shapes of the hub's GPT-2 family, so an offline stack runs the same arithmetic as the real model.
HUB_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
RANDOM_SUFFIX = "-random-weights"


def known_shape(model: str) -> GPT2Config | None:
    shape = HUB_SHAPES.get(model.removeprefix("openai-community/"))
    if shape is None:
        return None
    return GPT2Config(vocab_size=50257, n_positions=1024, **shape)


def random_checkpoint(config: GPT2Config, model_id: str, *, seed: int = 0) -> Checkpoint:
    """GPT-2's own initialisation (normal 0.02, LayerNorm 1/0, biases 0), float32, deterministic for a seed
    (numpy's PCG64 stream, which numpy keeps stable across releases in practice)."""
    generator = np.random.Generator(np.random.PCG64(seed))
    tensors: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(config).items():
        if ".ln_" in name or name.startswith("ln_"):
            tensors[name] = np.ones(shape, np.float32) if name.endswith("weight") else np.zeros(shape, np.float32)
        elif name.endswith("bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = generator.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    recipe = f"random-weights PCG64 seed={seed} normal(0, 0.02) {config.to_dict()}"
    fingerprint = hashlib.sha256(recipe.encode()).hexdigest()  # the same recipe gives the same weights
    return Checkpoint(model_id=model_id + RANDOM_SUFFIX, config=config, tensors=tensors, fingerprint=fingerprint)
