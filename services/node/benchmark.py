"""Start-up benchmark: how many GPT-2 (124M-sized) layer decode steps per second this device runs."""

from __future__ import annotations

import time

import numpy as np
import torch

from services.common.gpt2.config import GPT2Config
from services.common.gpt2.kv_pool import StepPlan
from services.common.gpt2.model import GPT2Stage
from services.node.engine import StageEngine

# One layer of GPT-2 124M: the unit of "speed" that placement weighs nodes by.
REFERENCE = GPT2Config(n_layer=1, n_head=12, n_embd=768, vocab_size=1, n_positions=128)


def measure_speed(device: torch.device, dtype: torch.dtype, *, steps: int = 16, context: int = 32) -> float:
    """Layer forward passes per second for single-token decode after a `context`-token prefill.

    Runs through the StageEngine the node serves with (its KV pool and attention kernel, a CUDA graph on
    CUDA), step overhead included: what a served decode step of one layer costs on this device.
    """
    torch.manual_seed(0)
    with torch.device("cpu"):
        stage = GPT2Stage(REFERENCE, 0, 1).to(device=device, dtype=dtype).eval().requires_grad_(False)
    engine = StageEngine(stage, slots=1, top_k=1, max_batch=1)
    slot = engine.pool.acquire()
    tokens = np.zeros(context + steps + 1, np.int64)

    def step(start: int, count: int) -> None:
        plan = StepPlan.of([slot], [start], [count], REFERENCE.n_positions)
        engine.compute(plan, token_ids=tokens[:count])  # returns once the device is done

    step(0, context)
    step(context, 1)  # warm-up: first replay, allocator
    started = time.perf_counter()
    for index in range(steps):
        step(context + 1 + index, 1)
    return steps / (time.perf_counter() - started)
