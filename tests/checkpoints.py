"""Small random GPT-2 checkpoints in the Hugging Face layout, and their transformers reference model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GPT2LMHeadModel
from transformers import GPT2Config as HFGPT2Config
from transformers.utils import logging as transformers_logging

WEIGHTS_FILE = "model.safetensors"
HF_PREFIX = "transformer."


def make_random_checkpoint(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    vocab_size: int = 97,
    n_positions: int = 64,
    seed: int = 0,
    with_prefix: bool = True,
) -> Path:
    """Write config.json + model.safetensors of a random GPT-2 to `path` (created) and return it.

    Weights are drawn with a fixed seed and scaled 1/sqrt(fan_in), and every bias and LayerNorm
    parameter is perturbed, so attention is peaked, logits are a few units and a wrong bias, LayerNorm,
    mask or transpose shows up as a large logit error. with_prefix=False stores names without
    "transformer." (like the original hub gpt2 checkpoint).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = HFGPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.transformer.named_parameters():
            parameter.copy_(_random_value(name, parameter, generator))
    with _quiet_transformers():
        model.save_pretrained(path)  # safetensors is the default format
    if not with_prefix:
        weights = path / WEIGHTS_FILE
        tensors = load_file(weights)
        save_file({name.removeprefix(HF_PREFIX): t for name, t in tensors.items()}, weights, {"format": "pt"})
    return path


def torch_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Checkpoint or shard arrays (numpy: the sharder has no torch) as torch tensors over the same memory, as the
    native node wraps them for GPT2Stage.from_tensors."""
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def load_reference(path: str | Path) -> GPT2LMHeadModel:
    """The transformers GPT-2 of a checkpoint folder: float32, eval mode, eager (non-fused) attention."""
    with _quiet_transformers():
        model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    return model.float().eval()


def _random_value(name: str, parameter: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(parameter.shape, generator=generator) * std

    if ".ln_" in f".{name}":
        return 1 + normal(0.2) if name.endswith("weight") else normal(0.2)  # LayerNorm gain, shift
    if name.endswith("bias"):
        return normal(0.1)
    if name in ("wte.weight", "wpe.weight"):
        return normal(0.5)
    return normal(1 / math.sqrt(parameter.shape[0]))  # Conv1D weight (in, out): fan_in is dim 0


class _quiet_transformers:
    """Silence transformers' progress bars and info logs for the duration of a with block."""

    def __enter__(self) -> None:
        self.verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc_info: object) -> None:
        transformers_logging.set_verbosity(self.verbosity)
        transformers_logging.enable_progress_bar()


def greedy_reference(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' generate(), greedy, never stopping early."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), generation_config=config)
    return output[0, len(prompt_ids) :].tolist()
