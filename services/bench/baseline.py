"""Single-process baselines on the bench's device: a transformers greedy loop with its KV cache, and (CUDA) the
project's own GPT2Stage decoding from a static KV cache, each step replayed as one CUDA graph."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.common.gpt2.model import GPT2Stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformersBaseline:
    """transformers' GPT2LMHeadModel in this process: greedy, next token fed back, its own KV cache."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import GPT2LMHeadModel

        # transformers 5 renames past_key_values; the old name still works, and warns on every call
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        self.device = device
        self.model = GPT2LMHeadModel.from_pretrained(model).to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor):
        out = self.model(ids, use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def _decode(self, past, token: torch.Tensor, steps: int):
        for _ in range(steps):
            out = self.model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return past, token

    def decode_rate(self, prompt: Sequence[int], tokens: int, repeats: int = 3) -> float:
        """Single-stream decode tokens/s, prefill excluded; the median of `repeats` after an untimed run."""
        ids = torch.tensor([list(prompt)], device=self.device)
        self._decode(*self._prefill(ids), tokens)
        rates = []
        for _ in range(repeats):
            past, token = self._prefill(ids)
            _sync(self.device)
            started = time.perf_counter()
            self._decode(past, token, tokens)
            _sync(self.device)
            rates.append(tokens / (time.perf_counter() - started))
        return statistics.median(rates)

    def streams_rate(self, prompt: Sequence[int], tokens: int, streams: int, repeats: int = 3) -> float:
        """Aggregate tokens/s of `streams` prompts decoded as one batch, prefill included (as a stack's
        concurrent streams are timed from the first request to the last token); median of `repeats` after
        one untimed run."""
        ids = torch.tensor([list(prompt)] * streams, device=self.device)
        rates = []
        for _ in range(repeats + 1):
            _sync(self.device)
            started = time.perf_counter()
            self._decode(*self._prefill(ids), tokens - 1)  # the prefill gives each stream its first token
            _sync(self.device)
            rates.append(streams * tokens / (time.perf_counter() - started))
        return statistics.median(rates[1:])

    def prefill_ms(self, length: int, repeats: int = 3) -> float:
        """ms from a `length`-token prompt to its first token; the median of `repeats`."""
        ids = torch.randint(0, self.model.config.vocab_size, (1, length), device=self.device)
        self._prefill(ids)
        timings = []
        for _ in range(repeats):
            _sync(self.device)
            started = time.perf_counter()
            _, token = self._prefill(ids)
            token.item()
            timings.append((time.perf_counter() - started) * 1e3)
        return statistics.median(timings)


def load_stage(model: str, device: torch.device, dtype: torch.dtype) -> GPT2Stage:
    """Every layer of a checkpoint (folder or hub name) as one GPT2Stage, the native node's model code."""
    from services.common.gpt2.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model, progress=False)
    tensors = {name: torch.from_numpy(array) for name, array in checkpoint.tensors.items()}
    config = checkpoint.config
    return GPT2Stage.from_tensors(config, 0, config.n_layer, tensors, dtype=dtype, device=device)


class StaticReference:
    """Greedy decode of `batch` streams from a static KV cache (n_layer, B, nh, length, hs): one CUDA graph a step."""

    def __init__(self, stage: GPT2Stage, batch: int, length: int) -> None:
        config, weight = stage.config, stage.h[0].ln_1.weight
        shape = (config.n_layer, batch, config.n_head, length, config.head_dim)
        self.stage, self.batch, self.length = stage, batch, length
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=weight.device)
        self.position = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.inference_mode()
    @sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])  # cuDNN would rebuild plans; flash takes no mask
    def step(self) -> None:
        stage, B = self.stage, self.batch
        C, nh = stage.config.n_embd, stage.config.n_head
        x = stage.wte(self.tokens) + stage.wpe(self.position)  # (B, C)
        visible = (torch.arange(self.length, device=x.device) <= self.position).view(1, 1, 1, -1)
        for layer, block in enumerate(stage.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, 3, nh, C // nh).unbind(1)  # (B, nh, hs) each
            self.keys[layer].index_copy_(2, self.position, k.unsqueeze(2))
            self.values[layer].index_copy_(2, self.position, v.unsqueeze(2))
            y = F.scaled_dot_product_attention(q.unsqueeze(2), self.keys[layer], self.values[layer], attn_mask=visible)
            x = x + block.attn.c_proj(y.reshape(B, C))
            x = x + block.mlp(block.ln_2(x))
        self.tokens.copy_(stage.logits(x).argmax(-1))
        self.position.add_(1)

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def ms_per_step(self, steps: int) -> float:
        self.position.fill_(0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps


def cuda_graph_rates(stage: GPT2Stage, streams: Sequence[int], tokens: int) -> dict[str, float]:
    """Decode tokens/s of the CUDA-graph reference at each stream count (prefill not included)."""
    rates = {}
    for batch in streams:
        reference = StaticReference(stage, batch, length=min(stage.config.n_positions, tokens + 64))
        reference.capture()
        steps = min(tokens, reference.length)
        reference.ms_per_step(steps)  # warm-up
        rates[str(batch)] = batch / reference.ms_per_step(steps) * 1e3
    return rates
