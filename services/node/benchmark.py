"""Start-up benchmark: how many GPT-2 (124M-sized) layer decode steps per second this device runs."""

from __future__ import annotations

import time

import torch

from services.common.gpt2.config import GPT2Config
from services.common.gpt2.model import GPT2Stage

# One layer of GPT-2 124M: the unit of "speed" that placement weighs nodes by.
REFERENCE = GPT2Config(n_layer=1, n_head=12, n_embd=768, vocab_size=1, n_positions=128)


def measure_speed(device: torch.device, dtype: torch.dtype, *, steps: int = 16, context: int = 32) -> float:
    """Layer forward passes per second for single-token decode after a `context`-token prefill."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        stage = GPT2Stage(REFERENCE, 0, 1).to(device=device, dtype=dtype).eval().requires_grad_(False)
    hidden = torch.randn(context, REFERENCE.n_embd, device=device, dtype=dtype)
    # Layer 0 is the first and the last stage here; time only the block, not embeddings or head.
    cache = stage.new_cache()
    block = stage.h[0]
    lengths = [context]
    cache.reserve(context)
    with torch.inference_mode():
        block(hidden[None], [cache], 0, lengths, None)
        cache.commit(context)
        token = hidden[:1][None]
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            cache.reserve(1)
            block(token, [cache], 0, [1], None)
            cache.commit(1)
        _synchronize(device)
    return steps / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
