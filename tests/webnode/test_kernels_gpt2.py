"""The web node's WGSL kernels chained into GPT-2 exactly as the page chains them, against transformers.

GpuGpt2 follows docs/webnode-kernels.md, "One step of a stage": the same kernels, the token table transposed,
the matmul shapes webnode/js/shapes.js picks for each row count, once as for a GPU and once as for a CPU adapter.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import wgpu
from transformers import GPT2LMHeadModel

from tests.checkpoints import load_reference, make_random_checkpoint
from tests.webnode.kernel_calls import (
    attention_params,
    ceil_div,
    max_error,
    page_shape,
    rng,
    row_meta_buffer,
    run_attention,
    run_kv_append,
    run_layernorm,
    run_matmul,
    run_topk,
)
from tests.webnode.wgsl_runner import WgslRunner, linear_groups

MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GpuGpt2:
    """GPT-2 on the WGSL kernels, dispatched as the page does it: a KV cache pair per layer, many requests a step.

    weights: "f32" uploads f32 tensors; "unpacked-f16" uploads the f16 bits of every tensor and converts them
    on the GPU with unpack_f16.wgsl (the path for adapters without shader-f16); "shader-f16" keeps the
    matrices and embeddings in f16 for the *_f16 kernels and unpacks the small vectors. The token table goes
    up transposed, (n_embd, vocab). adapter_kind: the matmul shapes the page picks for a "gpu" or a "cpu".
    """

    def __init__(
        self, gpu: WgslRunner, model: GPT2LMHeadModel, *, slots: int, weights: str = "f32", adapter_kind: str = "gpu"
    ) -> None:
        config = model.config
        self.gpu, self.slots, self.mode, self.adapter_kind = gpu, slots, weights, adapter_kind
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.vocab, self.n_positions = config.vocab_size, config.n_positions
        state = {name.removeprefix("transformer."): t.float().numpy() for name, t in model.state_dict().items()}
        state["wte.weight"] = np.ascontiguousarray(state["wte.weight"].T)
        self.weights = {name: self._upload(name, array) for name, array in state.items()}
        cache_size = slots * self.n_positions * self.n_embd  # (slots, n_head, n_positions, head_dim)
        self.caches = [(gpu.empty(cache_size), gpu.empty(cache_size)) for _ in range(self.n_layer)]
        self.suffix = "_f16" if weights == "shader-f16" else ""

    def _upload(self, name: str, array: np.ndarray) -> wgpu.GPUBuffer:
        if self.mode == "f32":
            return self.gpu.storage(array)
        halves = array.astype(np.float16)
        if self.mode == "shader-f16" and (name.endswith(MATRICES) or name in ("wte.weight", "wpe.weight")):
            return self.gpu.storage(halves)
        out = self.gpu.empty(halves.size)
        groups = linear_groups(ceil_div(ceil_div(halves.size, 2), 256))
        self.gpu.dispatch("unpack_f16", [self.gpu.uniform(halves.size), self.gpu.storage(halves), out], groups)
        return out

    def step(self, requests: list[tuple[int, int, list[int]]]) -> tuple[wgpu.GPUBuffer, int]:
        """Run (slot, cache length before, new token ids) for each request; the logits buffer and its rows."""
        placements = [(slot, start + t) for slot, start, tokens in requests for t in range(len(tokens))]
        ids = np.array([token for _, _, tokens in requests for token in tokens], np.uint32)
        rows, gpu, n_embd = len(placements), self.gpu, self.n_embd
        row_meta = row_meta_buffer(gpu, placements)
        x = gpu.empty(rows * n_embd)
        params = gpu.uniform(rows, n_embd, 0, self.vocab, self.n_positions)
        bindings = [params, gpu.storage(ids), row_meta, self.weights["wte.weight"], self.weights["wpe.weight"], x]
        gpu.dispatch("embedding" + self.suffix, bindings, (ceil_div(n_embd, 64), rows, 1))
        for layer in range(self.n_layer):
            self.block(layer, x, rows, row_meta)
        h, logits = gpu.empty(rows * n_embd), gpu.empty(rows * self.vocab)
        run_layernorm(gpu, x, self.weights["ln_f.weight"], self.weights["ln_f.bias"], h, rows, n_embd)
        shape, unused = page_shape(rows, self.adapter_kind), gpu.empty(4)
        run_matmul(gpu, h, self.weights["wte.weight"], unused, logits, rows, n_embd, self.vocab, shape,
                   with_bias=False, suffix=self.suffix)  # fmt: skip
        return logits, rows

    def block(self, layer: int, x: wgpu.GPUBuffer, rows: int, row_meta: wgpu.GPUBuffer) -> None:
        """One transformer block on the residual stream x (rows, n_embd), in place."""
        gpu, n_embd = self.gpu, self.n_embd
        weight = {
            name.removeprefix(f"h.{layer}."): b for name, b in self.weights.items() if name.startswith(f"h.{layer}.")
        }
        shape = page_shape(rows, self.adapter_kind)

        def linear(source: wgpu.GPUBuffer, part: str, k: int, n: int, activation: int = 0) -> wgpu.GPUBuffer:
            out = gpu.empty(rows * n)
            run_matmul(gpu, source, weight[f"{part}.weight"], weight[f"{part}.bias"], out, rows, k, n, shape,
                       activation=activation, suffix=self.suffix)  # fmt: skip
            return out

        def residual_add(addend: wgpu.GPUBuffer) -> None:
            count = rows * n_embd
            gpu.dispatch("add", [gpu.uniform(count), x, addend], linear_groups(ceil_div(count, 256)))

        h = gpu.empty(rows * n_embd)
        run_layernorm(gpu, x, weight["ln_1.weight"], weight["ln_1.bias"], h, rows, n_embd)
        qkv = linear(h, "attn.c_attn", n_embd, 3 * n_embd)
        k_cache, v_cache = self.caches[layer]
        params = attention_params(gpu, rows, n_embd, self.n_head, self.n_positions, self.slots)
        run_kv_append(gpu, params, qkv, row_meta, k_cache, v_cache, rows, n_embd)
        attended = gpu.empty(rows * n_embd)
        run_attention(gpu, params, qkv, row_meta, k_cache, v_cache, attended, rows, self.n_head)
        residual_add(linear(attended, "attn.c_proj", n_embd, n_embd))
        run_layernorm(gpu, x, weight["ln_2.weight"], weight["ln_2.bias"], h, rows, n_embd)
        hidden = linear(h, "mlp.c_fc", n_embd, 4 * n_embd, activation=1)
        residual_add(linear(hidden, "mlp.c_proj", 4 * n_embd, n_embd))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> GPT2LMHeadModel:
    folder = tmp_path_factory.mktemp("gpt2")
    make_random_checkpoint(folder, n_layer=2, n_head=3, n_embd=48, vocab_size=97, n_positions=64, seed=0)
    return load_reference(folder)


def rounded_to_f16(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A copy of the model whose parameters are rounded to f16 (what the shard holds), computing in f32."""
    rounded = type(model)(model.config).eval()
    rounded.load_state_dict({name: t.half().float() for name, t in model.state_dict().items()})
    return rounded


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return max_error(actual, expected) / float(np.abs(expected).max())


def test_gpt2_block_matches_transformers(gpu: WgslRunner, reference: GPT2LMHeadModel) -> None:
    """Block 0 alone on a 9-token prompt: the GPU output equals transformers' hidden state after block 0."""
    tokens = torch.arange(9) * 7 % 97
    with torch.no_grad():
        hidden = reference(tokens[None], output_hidden_states=True).hidden_states
    model = GpuGpt2(gpu, reference, slots=1)
    x = gpu.storage(hidden[0][0].numpy())
    model.block(0, x, 9, row_meta_buffer(gpu, [(0, p) for p in range(9)]))
    assert relative_error(gpu.read(x, (9, 48)), hidden[1][0].numpy()) < 1e-5


@pytest.mark.parametrize("adapter_kind", ["gpu", "cpu"])
@pytest.mark.parametrize("weights", ["f32", "unpacked-f16", "shader-f16"])
def test_gpt2_prefill_then_decode_in_one_batch(
    request: pytest.FixtureRequest, reference: GPT2LMHeadModel, weights: str, adapter_kind: str
) -> None:
    """Two requests of different lengths, batched: prefill, then 3 decode steps through the KV cache.

    Every row's logits are compared with transformers recomputing the whole sequence, the GPU top-k with
    torch.topk, and the greedy token of each step must agree. The prefill's 19 rows take the tiled matmul
    on a "gpu", the decode steps' 2 rows matvec; a "cpu" takes matvec for both.
    """
    gpu = request.getfixturevalue("gpu_f16" if weights == "shader-f16" else "gpu")
    torch_model = reference if weights == "f32" else rounded_to_f16(reference)
    model = GpuGpt2(gpu, reference, slots=3, weights=weights, adapter_kind=adapter_kind)
    g = rng(14)
    sequences = {0: list(g.integers(0, 97, 13)), 2: list(g.integers(0, 97, 6))}  # slot -> tokens so far
    new = {slot: list(tokens) for slot, tokens in sequences.items()}  # tokens not yet in the cache
    k, worst = 10, 0.0
    started = time.perf_counter()
    for _ in range(4):  # prefill, then 3 decode steps
        requests = [(slot, len(sequences[slot]) - len(new[slot]), new[slot]) for slot in sorted(sequences)]
        logits_buffer, rows = model.step(requests)
        logits = gpu.read(logits_buffer, (rows, 97))
        top_values, top_indices = run_topk(gpu, logits_buffer, rows, 97, k)
        row = 0
        for slot, start, tokens in requests:
            with torch.no_grad():
                expected = torch_model(torch.tensor([sequences[slot]])).logits[0, start:].numpy()
            actual = logits[row : row + len(tokens)]
            worst = max(worst, relative_error(actual, expected))
            assert worst <= 1e-3
            expected_top = torch.topk(torch.from_numpy(actual), k)
            np.testing.assert_array_equal(top_indices[row : row + len(tokens)], expected_top.indices.numpy())
            np.testing.assert_array_equal(top_values[row : row + len(tokens)], expected_top.values.numpy())
            assert np.array_equal(np.argmax(expected, -1), top_indices[row : row + len(tokens), 0])
            next_token = int(top_indices[row + len(tokens) - 1, 0])
            sequences[slot].append(next_token)
            new[slot] = [next_token]
            row += len(tokens)
    print(f"GPT-2 2-layer prefill + 3 decode steps ({weights}, {adapter_kind} shapes) on {gpu.description}: "
          f"{time.perf_counter() - started:.2f} s, max relative logit error {worst:.1e}")  # fmt: skip
