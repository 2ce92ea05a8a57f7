"""The web node's WGSL kernels, run through wgpu-py against numpy and against transformers' GPT-2.

Longer than most test files: it holds one reference per kernel plus a small GPT-2 driver (GpuGpt2)
that chains the kernels exactly as the page does, with the dispatch rules of each kernel's header.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import wgpu
from transformers import GPT2LMHeadModel

from tests.checkpoints import load_reference, make_random_checkpoint
from tests.webnode.wgsl_runner import (
    KERNEL_DIR,
    BufferRange,
    NoAdapter,
    WgslRunner,
    linear_groups,
    request_adapter,
)

Binding = wgpu.GPUBuffer | BufferRange
INVALID = 0xFFFFFFFF
LOWEST = np.float32(-3.0e38)


@pytest.fixture(scope="module")
def adapter() -> wgpu.GPUAdapter:
    try:
        return request_adapter()
    except NoAdapter as error:
        print(f"skipping the WGSL kernel tests: {error}")
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def gpu(adapter: wgpu.GPUAdapter) -> WgslRunner:
    return WgslRunner(adapter)


@pytest.fixture(scope="module")
def gpu_f16(adapter: wgpu.GPUAdapter) -> WgslRunner:
    if "shader-f16" not in adapter.features:
        reason = f"adapter {adapter.info['device']} ({adapter.info['backend_type']}) lacks shader-f16"
        print(f"skipping the f16 kernel tests: {reason}")
        pytest.skip(reason)
    return WgslRunner(adapter, shader_f16=True)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(generator: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (generator.standard_normal(shape) * scale).astype(np.float32)


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)))


# ---- dispatch helpers: each follows the "Dispatch:" line of its kernel's header ----


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def run_matmul(
    gpu: WgslRunner, x: Binding, w: Binding, bias: Binding, out: Binding, m: int, k: int, n: int,
    *, activation: int = 0, wx: int = 16, wy: int = 16, kernel: str = "matmul",
) -> None:  # fmt: skip
    constants = {"WORKGROUP_X": wx, "WORKGROUP_Y": wy, "ACTIVATION": activation}
    groups = (ceil_div(n, 4 * wx), ceil_div(m, 4 * wy), 1)
    gpu.dispatch(kernel, [gpu.uniform(m, k, n), x, w, bias, out], groups, constants)


def run_lm_head(
    gpu: WgslRunner, x: Binding, wte: Binding, logits: Binding, m: int, k: int, n: int, out_stride: int,
    out_offset: int = 0, *, wx: int = 16, wy: int = 16, kernel: str = "lm_head",
) -> None:  # fmt: skip
    params = gpu.uniform(m, k, n, out_stride, out_offset)
    groups = (ceil_div(n, 4 * wx), ceil_div(m, 4 * wy), 1)
    gpu.dispatch(kernel, [params, x, wte, logits], groups, {"WORKGROUP_X": wx, "WORKGROUP_Y": wy})


def run_layernorm(
    gpu: WgslRunner, x: Binding, weight: Binding, bias: Binding, out: Binding, rows: int, n_embd: int,
    *, workgroup: int = 128,
) -> None:  # fmt: skip
    params = gpu.uniform(rows, n_embd, 1e-5)
    gpu.dispatch("layernorm", [params, x, weight, bias, out], (rows, 1, 1), {"WORKGROUP_SIZE": workgroup})


def attention_params(
    gpu: WgslRunner, rows: int, n_embd: int, n_head: int, max_positions: int, slots: int
) -> wgpu.GPUBuffer:
    return gpu.uniform(rows, n_embd, n_head, max_positions, slots)


def run_kv_append(
    gpu: WgslRunner, params: Binding, qkv: Binding, row_meta: Binding, k_cache: Binding, v_cache: Binding,
    rows: int, n_embd: int,
) -> None:  # fmt: skip
    gpu.dispatch("kv_append", [params, qkv, row_meta, k_cache, v_cache], (ceil_div(n_embd, 64), rows, 1))


def run_attention(
    gpu: WgslRunner, params: Binding, qkv: Binding, row_meta: Binding, k_cache: Binding, v_cache: Binding,
    out: Binding, rows: int, n_head: int, *, workgroup: int = 64,
) -> None:  # fmt: skip
    bindings = [params, qkv, row_meta, k_cache, v_cache, out]
    gpu.dispatch("attention", bindings, (n_head, rows, 1), {"WORKGROUP_SIZE": workgroup})


def run_topk(
    gpu: WgslRunner, values: Binding, rows: int, n: int, k: int, *, chunk: int = 1024, workgroup: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """All passes of topk.wgsl over a (rows, n) buffer; returns the (rows, k) values and indices."""
    assert 2 * k <= chunk, "topk.wgsl needs k <= CHUNK / 2 for every pass to shrink the candidates"
    indices = gpu.empty(1, np.uint32)
    indexed = False
    while True:
        chunks = ceil_div(n, chunk)
        out_values, out_indices = gpu.empty(rows * chunks * k), gpu.empty(rows * chunks * k, np.uint32)
        constants = {"WORKGROUP_SIZE": workgroup, "CHUNK": chunk, "INDEXED": indexed}
        bindings = [gpu.uniform(rows, n, k), values, indices, out_values, out_indices]
        gpu.dispatch("topk", bindings, (chunks, rows, 1), constants)
        if chunks == 1:
            return gpu.read(out_values, (rows, k)), gpu.read(out_indices, (rows, k), np.uint32)
        values, indices, n, indexed = out_values, out_indices, chunks * k, True


def row_meta_buffer(gpu: WgslRunner, placements: list[tuple[int, int]]) -> wgpu.GPUBuffer:
    return gpu.storage(np.array(placements, np.uint32).reshape(-1))


# ---- numpy references ----


def gelu_new(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layernorm_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight + bias


def attention_reference(
    q_row: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slot: int, position: int, n_head: int
) -> np.ndarray:
    """Output (n_embd,) of one row attending over cache positions [0, position] of its slot."""
    head_dim = q_row.size // n_head
    outputs = []
    for h in range(n_head):
        q = q_row[h * head_dim : (h + 1) * head_dim].astype(np.float64)
        keys = k_cache[slot, h, : position + 1].astype(np.float64)
        scores = keys @ q / math.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        outputs.append(weights / weights.sum() @ v_cache[slot, h, : position + 1])
    return np.concatenate(outputs)


def topk_reference(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k largest, ties by lower index (a stable sort of -value)."""
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(values, order, -1), order


# ---- one test (or a few) per kernel ----


@pytest.mark.parametrize(("rows", "n_embd", "workgroup"), [(1, 48, 64), (5, 200, 64), (3, 7, 32)])
def test_embedding(gpu: WgslRunner, rows: int, n_embd: int, workgroup: int) -> None:
    g = rng(1)
    vocab, n_positions = 97, 64
    wte, wpe = normal(g, vocab, n_embd), normal(g, n_positions, n_embd)
    ids = g.integers(0, vocab, rows).astype(np.uint32)
    positions = g.integers(0, n_positions, rows)
    out = gpu.empty(rows * n_embd)
    params = gpu.uniform(rows, n_embd, 0, vocab, n_positions)
    bindings = [params, gpu.storage(ids), row_meta_buffer(gpu, [(0, p) for p in positions])]
    bindings += [gpu.storage(wte), gpu.storage(wpe), out]
    gpu.dispatch("embedding", bindings, (ceil_div(n_embd, workgroup), rows, 1), {"WORKGROUP_SIZE": workgroup})
    assert max_error(gpu.read(out, (rows, n_embd)), wte[ids] + wpe[positions]) == 0.0


def test_embedding_in_pieces(gpu: WgslRunner) -> None:
    """A token table bound in two pieces (binding offsets): each dispatch writes the rows it holds."""
    g = rng(2)
    vocab, n_embd, rows, split = 97, 48, 6, 64  # 64 rows * 192 B is a multiple of the 256 B alignment
    wte, wpe = normal(g, vocab, n_embd), normal(g, 64, n_embd)
    ids = np.array([0, 63, 64, 96, 5, 70], np.uint32)
    positions = [3, 0, 63, 1, 2, 9]
    wte_buffer, out = gpu.storage(wte), gpu.empty(rows * n_embd)
    shared = [gpu.storage(ids), row_meta_buffer(gpu, [(1, p) for p in positions])]
    for start, count in ((0, split), (split, vocab - split)):
        piece = (wte_buffer, start * n_embd * 4, count * n_embd * 4)
        params = gpu.uniform(rows, n_embd, start, count, 64)
        gpu.dispatch("embedding", [params, *shared, piece, gpu.storage(wpe), out], (1, rows, 1))
    assert max_error(gpu.read(out, (rows, n_embd)), wte[ids] + wpe[positions]) == 0.0


def test_embedding_leaves_rows_out_of_range_alone(gpu: WgslRunner) -> None:
    g = rng(15)
    n_embd, vocab, n_positions = 8, 97, 64
    wte, wpe = normal(g, vocab, n_embd), normal(g, n_positions, n_embd)
    ids, positions = np.array([3, 97, 5], np.uint32), [1, 2, 64]  # id past the table; position past wpe
    out = gpu.storage(np.full((3, n_embd), 7.0, np.float32))
    bindings = [gpu.uniform(3, n_embd, 0, vocab, n_positions), gpu.storage(ids)]
    bindings += [row_meta_buffer(gpu, [(0, p) for p in positions]), gpu.storage(wte), gpu.storage(wpe), out]
    gpu.dispatch("embedding", bindings, (1, 3, 1))
    actual = gpu.read(out, (3, n_embd))
    assert max_error(actual[0], wte[3] + wpe[1]) == 0.0
    assert np.all(actual[1:] == 7.0)


@pytest.mark.parametrize(("rows", "n_embd", "workgroup"), [(1, 48, 128), (7, 200, 128), (4, 1, 32), (3, 769, 64)])
def test_layernorm(gpu: WgslRunner, rows: int, n_embd: int, workgroup: int) -> None:
    g = rng(3)
    x = normal(g, rows, n_embd) + np.float32(50.0)  # a large mean: the two-pass variance must hold
    weight, bias = 1 + normal(g, n_embd, scale=0.2), normal(g, n_embd, scale=0.2)
    out = gpu.empty(rows * n_embd)
    run_layernorm(gpu, gpu.storage(x), gpu.storage(weight), gpu.storage(bias), out, rows, n_embd, workgroup=workgroup)
    assert max_error(gpu.read(out, (rows, n_embd)), layernorm_reference(x, weight, bias)) < 3e-5


MATMUL_SHAPES = [(1, 48, 144), (3, 97, 1), (97, 48, 97), (7, 33, 50), (1, 1, 3), (65, 130, 67)]


@pytest.mark.parametrize(("m", "k", "n"), MATMUL_SHAPES)
@pytest.mark.parametrize(("wx", "wy"), [(16, 16), (64, 1), (8, 4)])
def test_matmul(gpu: WgslRunner, m: int, k: int, n: int, wx: int, wy: int) -> None:
    g = rng(m * 1000 + k + n)
    x, w, bias = normal(g, m, k), normal(g, k, n, scale=1 / math.sqrt(k)), normal(g, n)
    out = gpu.empty(m * n)
    run_matmul(gpu, gpu.storage(x), gpu.storage(w), gpu.storage(bias), out, m, k, n, wx=wx, wy=wy)
    expected = x.astype(np.float64) @ w + bias
    assert max_error(gpu.read(out, (m, n)), expected) < 1e-5


@pytest.mark.parametrize(("m", "k", "n"), [(3, 48, 192), (1, 97, 33)])
def test_matmul_gelu(gpu: WgslRunner, m: int, k: int, n: int) -> None:
    g = rng(4)
    x, w, bias = normal(g, m, k, scale=2.0), normal(g, k, n, scale=2 / math.sqrt(k)), normal(g, n)
    bias[:4] = [40.0, -40.0, 1e4, -1e4]  # saturated tanh, and x^3 far past the f32 range of exp
    out = gpu.empty(m * n)
    run_matmul(gpu, gpu.storage(x), gpu.storage(w), gpu.storage(bias), out, m, k, n, activation=1)
    expected = gelu_new(x.astype(np.float64) @ w + bias)
    actual = gpu.read(out, (m, n))
    assert np.all(np.isfinite(actual))
    assert max_error(actual, expected) < 2e-5 * max(1.0, float(np.abs(expected).max()) / 100)
    torch_gelu = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64) @ w + bias), approximate="tanh")
    assert max_error(actual, torch_gelu.numpy()) < 2e-5 * max(1.0, float(np.abs(expected).max()) / 100)


@pytest.mark.parametrize(("m", "n_embd", "vocab"), [(1, 48, 97), (3, 48, 1000), (70, 20, 97)])
@pytest.mark.parametrize(("wx", "wy"), [(16, 16), (64, 1)])
def test_lm_head(gpu: WgslRunner, m: int, n_embd: int, vocab: int, wx: int, wy: int) -> None:
    g = rng(5)
    x, wte = normal(g, m, n_embd), normal(g, vocab, n_embd, scale=0.5)
    logits = gpu.empty(m * vocab)
    run_lm_head(gpu, gpu.storage(x), gpu.storage(wte), logits, m, n_embd, vocab, vocab, wx=wx, wy=wy)
    assert max_error(gpu.read(logits, (m, vocab)), x.astype(np.float64) @ wte.T) < 2e-5


def test_lm_head_in_pieces(gpu: WgslRunner) -> None:
    """wte bound as two row ranges (binding offset), each dispatch writing its columns of the logits."""
    g = rng(6)
    m, n_embd, vocab, split = 2, 48, 1000, 512  # 512 rows * 192 B: a multiple of 256 B
    x, wte = normal(g, m, n_embd), normal(g, vocab, n_embd, scale=0.5)
    x_buffer, wte_buffer, logits = gpu.storage(x), gpu.storage(wte), gpu.empty(m * vocab)
    for start, count in ((0, split), (split, vocab - split)):
        piece = (wte_buffer, start * n_embd * 4, count * n_embd * 4)
        run_lm_head(gpu, x_buffer, piece, logits, m, n_embd, count, vocab, start)
    assert max_error(gpu.read(logits, (m, vocab)), x.astype(np.float64) @ wte.T) < 2e-5


def test_residual_add(gpu: WgslRunner) -> None:
    g = rng(7)
    a, b = normal(g, 1001), normal(g, 1001)
    residual = gpu.storage(a)
    gpu.dispatch("add", [gpu.uniform(a.size), residual, gpu.storage(b)], linear_groups(ceil_div(a.size, 256)))
    assert max_error(gpu.read(residual, (a.size,)), a.astype(np.float64) + b) < 1e-6


@pytest.mark.parametrize("count", [1, 2, 1001, 4096])
def test_unpack_f16(gpu: WgslRunner, count: int) -> None:
    g = rng(8)
    halves = (g.standard_normal(count) * 100).astype(np.float16)
    special = np.array([0.0, -0.0, 65504.0, -65504.0, 6e-8, 6.1e-5, 1e-4, 1.0], np.float16)  # max, subnormals
    halves[: min(count, special.size)] = special[: min(count, special.size)]
    out = gpu.empty(count)
    # A deliberately two-dimensional grid: the kernel numbers its words across both dimensions.
    groups = ceil_div(ceil_div(count, 2), 256)
    grid = (max(1, ceil_div(groups, 3)), 3, 1)
    gpu.dispatch("unpack_f16", [gpu.uniform(count), gpu.storage(halves), out], grid)
    actual = gpu.read(out, (count,))
    np.testing.assert_array_equal(actual, halves.astype(np.float32))
    assert np.array_equal(np.signbit(actual), np.signbit(halves))


@pytest.mark.parametrize(
    ("vocab", "rows", "k", "chunk", "workgroup"),
    [
        (97, 2, 5, 1024, 256),
        (70, 3, 20, 64, 32),  # the last chunk holds fewer than k: padding pairs, then merged away
        (1000, 2, 64, 1024, 256),
        (1000, 1, 16, 128, 64),  # four passes
        (10, 1, 16, 1024, 256),  # k larger than the row: the tail is padding
        (50257, 1, 64, 1024, 256),  # GPT-2's vocabulary: three passes
    ],
)
def test_topk(gpu: WgslRunner, vocab: int, rows: int, k: int, chunk: int, workgroup: int) -> None:
    g = rng(vocab + k)
    logits = np.round(normal(g, rows, vocab) * 4) / 4  # coarse values: many ties, broken by lower index
    values, indices = run_topk(gpu, gpu.storage(logits), rows, vocab, k, chunk=chunk, workgroup=workgroup)
    valid = min(k, vocab)
    expected_values, expected_indices = topk_reference(logits, valid)
    np.testing.assert_array_equal(indices[:, :valid], expected_indices)
    np.testing.assert_array_equal(values[:, :valid], expected_values)
    assert np.all(indices[:, valid:] == INVALID) and np.all(values[:, valid:] == LOWEST)


def test_topk_matches_torch_on_distinct_logits(gpu: WgslRunner) -> None:
    logits = normal(rng(9), 4, 1000)
    values, indices = run_topk(gpu, gpu.storage(logits), 4, 1000, 64)
    expected = torch.topk(torch.from_numpy(logits), 64)
    np.testing.assert_array_equal(indices, expected.indices.numpy())
    np.testing.assert_array_equal(values, expected.values.numpy())


@pytest.mark.parametrize(
    ("n_embd", "n_head", "requests"),
    [
        (48, 3, [(2, 0, 5), (0, 11, 1)]),  # a prompt into empty slot 2, and a decode row at position 11
        (40, 4, [(1, 63, 3), (3, 0, 1)]),  # head_dim 10; rows across the 64-key chunk boundary
        (16, 2, [(0, 0, 200), (1, 30, 2)]),  # a long prompt with small hidden
    ],
)
def test_kv_append_and_attention(gpu: WgslRunner, n_embd: int, n_head: int, requests: list) -> None:
    """Requests (slot, cache length before, new tokens) in one dispatch of each kernel."""
    g = rng(n_embd + n_head)
    slots, max_positions, head_dim = 4, 208, n_embd // n_head
    k_cache = normal(g, slots, n_head, max_positions, head_dim)  # earlier steps' keys, and junk beyond
    v_cache = normal(g, slots, n_head, max_positions, head_dim)
    placements = [(slot, start + t) for slot, start, count in requests for t in range(count)]
    rows = len(placements)
    qkv = normal(g, rows, 3 * n_embd, scale=2.0)
    k_buffer, v_buffer, out = gpu.storage(k_cache), gpu.storage(v_cache), gpu.empty(rows * n_embd)
    row_meta = row_meta_buffer(gpu, placements)
    params = attention_params(gpu, rows, n_embd, n_head, max_positions, slots)
    run_kv_append(gpu, params, gpu.storage(qkv), row_meta, k_buffer, v_buffer, rows, n_embd)
    run_attention(gpu, params, gpu.storage(qkv), row_meta, k_buffer, v_buffer, out, rows, n_head)

    for row, (slot, position) in enumerate(placements):
        k_cache[slot, :, position] = qkv[row, n_embd : 2 * n_embd].reshape(n_head, head_dim)
        v_cache[slot, :, position] = qkv[row, 2 * n_embd :].reshape(n_head, head_dim)
    np.testing.assert_array_equal(gpu.read(k_buffer, k_cache.shape), k_cache)
    np.testing.assert_array_equal(gpu.read(v_buffer, v_cache.shape), v_cache)
    expected = np.stack(
        [attention_reference(qkv[r, :n_embd], k_cache, v_cache, s, p, n_head) for r, (s, p) in enumerate(placements)]
    )
    assert max_error(gpu.read(out, (rows, n_embd)), expected) < 2e-5


def test_attention_out_of_range_row_gets_zeros(gpu: WgslRunner) -> None:
    n_embd, n_head, slots, max_positions = 16, 2, 2, 8
    cache = gpu.storage(normal(rng(10), slots * n_head * max_positions * n_embd // n_head))
    out = gpu.storage(np.full(2 * n_embd, 7.0, np.float32))
    params = attention_params(gpu, 2, n_embd, n_head, max_positions, slots)
    row_meta = row_meta_buffer(gpu, [(2, 0), (0, 8)])  # slot past the end; position past the end
    run_attention(gpu, params, gpu.storage(normal(rng(11), 2, 3 * n_embd)), row_meta, cache, cache, out, 2, n_head)
    assert np.all(gpu.read(out, (2, n_embd)) == 0.0)


# ---- f16 kernels (shader-f16) and their f32 twins ----

F16_TWINS = {"matmul": ["w"], "lm_head": ["wte"], "embedding": ["wte", "wpe"]}


def code_without_header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("//")) :])


@pytest.mark.parametrize("kernel", sorted(F16_TWINS))
def test_f16_twin_is_the_f32_kernel_with_f16_weights(kernel: str) -> None:
    """The _f16 files are copies; this keeps them from drifting (the f16 tests skip on many adapters)."""
    twin = code_without_header(KERNEL_DIR / f"{kernel}_f16.wgsl")
    assert twin.lstrip().startswith("enable f16;")
    twin = twin.replace("enable f16;", "", 1)
    for name in F16_TWINS[kernel]:
        twin = twin.replace(f"{name}: array<f16>;", f"{name}: array<f32>;")
        twin = twin.replace(f"return f32({name}[i]);", f"return {name}[i];")
    assert twin.strip() == code_without_header(KERNEL_DIR / f"{kernel}.wgsl").strip()
    assert not re.search(r"\bf16\b", twin)


def test_matmul_f16(gpu_f16: WgslRunner) -> None:
    g = rng(12)
    m, k, n = 5, 97, 67
    x, w, bias = normal(g, m, k), normal(g, k, n, scale=1 / math.sqrt(k)).astype(np.float16), normal(g, n)
    out = gpu_f16.empty(m * n)
    buffers = gpu_f16.storage(x), gpu_f16.storage(w), gpu_f16.storage(bias), out
    run_matmul(gpu_f16, *buffers, m, k, n, activation=1, kernel="matmul_f16")
    expected = gelu_new(x.astype(np.float64) @ w.astype(np.float64) + bias)
    assert max_error(gpu_f16.read(out, (m, n)), expected) < 2e-5


def test_lm_head_and_embedding_f16(gpu_f16: WgslRunner) -> None:
    g = rng(13)
    m, n_embd, vocab = 3, 48, 97
    x, wte, wpe = normal(g, m, n_embd), normal(g, vocab, n_embd).astype(np.float16), normal(g, 64, n_embd)
    wpe = wpe.astype(np.float16)
    logits = gpu_f16.empty(m * vocab)
    run_lm_head(
        gpu_f16, gpu_f16.storage(x), gpu_f16.storage(wte), logits, m, n_embd, vocab, vocab, kernel="lm_head_f16"
    )
    assert max_error(gpu_f16.read(logits, (m, vocab)), x.astype(np.float64) @ wte.astype(np.float64).T) < 2e-5

    ids, positions = np.array([5, 96, 0], np.uint32), [0, 63, 7]
    out = gpu_f16.empty(m * n_embd)
    params = gpu_f16.uniform(m, n_embd, 0, vocab, 64)
    bindings = [params, gpu_f16.storage(ids), row_meta_buffer(gpu_f16, [(0, p) for p in positions])]
    bindings += [gpu_f16.storage(wte), gpu_f16.storage(wpe), out]
    gpu_f16.dispatch("embedding_f16", bindings, (1, m, 1))
    expected = wte[ids].astype(np.float32) + wpe[positions].astype(np.float32)
    assert max_error(gpu_f16.read(out, (m, n_embd)), expected) < 1e-6


# ---- the kernels chained into GPT-2, against transformers ----

MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GpuGpt2:
    """GPT-2 on the WGSL kernels, dispatched as the page does it: a KV cache pair per layer, many requests a step.

    weights: "f32" uploads f32 tensors; "unpacked-f16" uploads the f16 bits of every tensor and converts them
    on the GPU with unpack_f16.wgsl (the path for adapters without shader-f16); "shader-f16" keeps the
    matrices and embeddings in f16 for the *_f16 kernels and unpacks the small vectors.
    """

    def __init__(self, gpu: WgslRunner, model: GPT2LMHeadModel, *, slots: int, weights: str = "f32") -> None:
        config = model.config
        self.gpu, self.slots, self.mode = gpu, slots, weights
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.vocab, self.n_positions = config.vocab_size, config.n_positions
        state = {name.removeprefix("transformer."): t for name, t in model.state_dict().items()}
        self.weights = {name: self._upload(name, t.detach().float().numpy()) for name, t in state.items()}
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
        wte, lm_head = self.weights["wte.weight"], "lm_head" + self.suffix
        run_lm_head(gpu, h, wte, logits, rows, n_embd, self.vocab, self.vocab, kernel=lm_head)
        return logits, rows

    def block(self, layer: int, x: wgpu.GPUBuffer, rows: int, row_meta: wgpu.GPUBuffer) -> None:
        """One transformer block on the residual stream x (rows, n_embd), in place."""
        gpu, n_embd = self.gpu, self.n_embd
        weight = {
            name.removeprefix(f"h.{layer}."): b for name, b in self.weights.items() if name.startswith(f"h.{layer}.")
        }
        wx, wy = (64, 1) if rows <= 4 else (16, 16)  # decode-shaped blocks for a handful of rows

        def linear(source: wgpu.GPUBuffer, part: str, k: int, n: int, activation: int = 0) -> wgpu.GPUBuffer:
            out = gpu.empty(rows * n)
            run_matmul(gpu, source, weight[f"{part}.weight"], weight[f"{part}.bias"], out, rows, k, n,
                       activation=activation, wx=wx, wy=wy, kernel="matmul" + self.suffix)  # fmt: skip
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


@pytest.mark.parametrize("weights", ["f32", "unpacked-f16", "shader-f16"])
def test_gpt2_prefill_then_decode_in_one_batch(
    request: pytest.FixtureRequest, reference: GPT2LMHeadModel, weights: str
) -> None:
    """Two requests of different lengths, batched: prefill, then 3 decode steps through the KV cache.

    Every row's logits are compared with transformers recomputing the whole sequence, the GPU top-k with
    torch.topk, and the greedy token of each step must agree.
    """
    gpu = request.getfixturevalue("gpu_f16" if weights == "shader-f16" else "gpu")
    torch_model = reference if weights == "f32" else rounded_to_f16(reference)
    model = GpuGpt2(gpu, reference, slots=3, weights=weights)
    g = rng(14)
    sequences = {0: list(g.integers(0, 97, 11)), 2: list(g.integers(0, 97, 4))}  # slot -> tokens so far
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
    print(f"GPT-2 2-layer prefill + 3 decode steps ({weights}) on {gpu.description}: "
          f"{time.perf_counter() - started:.2f} s, max relative logit error {worst:.1e}")  # fmt: skip
