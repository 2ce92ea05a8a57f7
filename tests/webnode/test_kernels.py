"""Every WGSL kernel of the web node, and the f16 twins the page generates, run through wgpu-py against numpy.

Matmuls run with the shapes webnode/js/shapes.js picks for their row count (for GPU and for CPU adapters)
and with a few more; tests/webnode/test_kernels_gpt2.py chains the kernels into GPT-2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.webnode.kernel_calls import (
    INVALID,
    LOWEST,
    Shape,
    attention_params,
    attention_reference,
    ceil_div,
    gelu_new,
    layernorm_reference,
    matvec_shape,
    max_error,
    normal,
    page_shape,
    rng,
    row_meta_buffer,
    run_attention,
    run_kv_append,
    run_layernorm,
    run_matmul,
    run_topk,
    tiled_shape,
    topk_reference,
)
from tests.webnode.wgsl_runner import KERNEL_DIR, WgslRunner, f16_twins, linear_groups


def embed(gpu: WgslRunner, ids: np.ndarray, positions: list[int], wte: np.ndarray, wpe: np.ndarray, out,
          *, pieces: list[tuple[int, int]] | None = None, workgroup: int = 64, suffix: str = "") -> None:  # fmt: skip
    """embedding.wgsl over the token table transposed (as the page uploads it), one dispatch per piece."""
    rows, n_embd = len(ids), wte.shape[1]
    shared = [gpu.storage(ids), row_meta_buffer(gpu, [(0, p) for p in positions])]
    for start, count in pieces or [(0, wte.shape[0])]:
        params = gpu.uniform(rows, n_embd, start, count, wpe.shape[0])
        piece = gpu.storage(np.ascontiguousarray(wte[start : start + count].T))
        groups = (ceil_div(n_embd, workgroup), rows, 1)
        bindings = [params, *shared, piece, gpu.storage(wpe), out]
        gpu.dispatch("embedding" + suffix, bindings, groups, {"WORKGROUP_SIZE": workgroup})


@pytest.mark.parametrize(("rows", "n_embd", "workgroup"), [(1, 48, 64), (5, 200, 64), (3, 7, 32)])
def test_embedding(gpu: WgslRunner, rows: int, n_embd: int, workgroup: int) -> None:
    g = rng(1)
    vocab, n_positions = 97, 64
    wte, wpe = normal(g, vocab, n_embd), normal(g, n_positions, n_embd)
    ids = g.integers(0, vocab, rows).astype(np.uint32)
    positions = list(g.integers(0, n_positions, rows))
    out = gpu.empty(rows * n_embd)
    embed(gpu, ids, positions, wte, wpe, out, workgroup=workgroup)
    assert max_error(gpu.read(out, (rows, n_embd)), wte[ids] + wpe[positions]) == 0.0


def test_embedding_in_pieces(gpu: WgslRunner) -> None:
    """A token table bound in two pieces: each dispatch writes the rows whose ids it holds."""
    g = rng(2)
    wte, wpe = normal(g, 97, 48), normal(g, 64, 48)
    ids, positions = np.array([0, 63, 64, 96, 5, 70], np.uint32), [3, 0, 63, 1, 2, 9]
    out = gpu.empty(6 * 48)
    embed(gpu, ids, positions, wte, wpe, out, pieces=[(0, 64), (64, 33)])
    assert max_error(gpu.read(out, (6, 48)), wte[ids] + wpe[positions]) == 0.0


def test_embedding_leaves_rows_out_of_range_alone(gpu: WgslRunner) -> None:
    g = rng(15)
    wte, wpe = normal(g, 97, 8), normal(g, 64, 8)
    ids, positions = np.array([3, 97, 5], np.uint32), [1, 2, 64]  # id past the table; position past wpe
    out = gpu.storage(np.full((3, 8), 7.0, np.float32))
    embed(gpu, ids, positions, wte, wpe, out)
    actual = gpu.read(out, (3, 8))
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


MATMUL_SIZES = [(1, 48, 144), (3, 97, 1), (10, 64, 300), (7, 33, 50), (1, 1, 3), (17, 40, 70), (65, 130, 67)]
# Beyond what the page picks: matvec with the other row and column counts, tiled blocks of every height.
MORE_SHAPES = {
    "matvec 3 rows 1 column": matvec_shape(3, 1, 32),
    "matvec 8 rows 8 columns": matvec_shape(8, 8, 16),
    "tiled 4 x 256": tiled_shape(64, 1),
    "tiled 2 x 64 (rows per thread 1)": tiled_shape(16, 2, 1),
    "tiled 16 x 32": tiled_shape(8, 4, 4, 8),
}


def shape_for(name: str, m: int) -> Shape:
    return page_shape(m, name.split()[1]) if name.startswith("page") else MORE_SHAPES[name]


@pytest.mark.parametrize(("m", "k", "n"), MATMUL_SIZES)
@pytest.mark.parametrize("shape_name", ["page gpu", "page cpu", *MORE_SHAPES])
def test_matmul_and_matvec(gpu: WgslRunner, m: int, k: int, n: int, shape_name: str) -> None:
    g = rng(m * 1000 + k + n)
    x, w, bias = normal(g, m, k), normal(g, k, n, scale=1 / math.sqrt(k)), normal(g, n)
    out = gpu.empty(m * n)
    run_matmul(gpu, gpu.storage(x), gpu.storage(w), gpu.storage(bias), out, m, k, n, shape_for(shape_name, m))
    assert max_error(gpu.read(out, (m, n)), x.astype(np.float64) @ w + bias) < 1e-5


def test_the_page_picks_matvec_for_few_rows_and_tiles_sized_to_the_rows() -> None:
    for m in range(1, 17):
        assert page_shape(m, "gpu")["kernel"] == "matvec" and page_shape(m, "gpu")["rowsPerGroup"] <= 8
    assert page_shape(10, "gpu")["rowsPerGroup"] == 5  # two groups of 5 rows, none wasted
    for m in range(17, 301):
        shape = page_shape(m, "gpu")
        padded = ceil_div(m, shape["rowsPerGroup"]) * shape["rowsPerGroup"]
        assert shape["kernel"] == "matmul" and padded - m < 16, (m, shape)
        assert page_shape(m, "cpu")["kernel"] == "matvec"


@pytest.mark.parametrize(("m", "k", "n"), [(3, 48, 192), (1, 97, 33), (20, 48, 70)])
@pytest.mark.parametrize("adapter_kind", ["gpu", "cpu"])
def test_matmul_gelu(gpu: WgslRunner, m: int, k: int, n: int, adapter_kind: str) -> None:
    g = rng(4)
    x, w, bias = normal(g, m, k, scale=2.0), normal(g, k, n, scale=2 / math.sqrt(k)), normal(g, n)
    bias[:4] = [40.0, -40.0, 1e4, -1e4]  # saturated tanh, and x^3 far past the f32 range of exp
    out = gpu.empty(m * n)
    buffers = gpu.storage(x), gpu.storage(w), gpu.storage(bias), out
    run_matmul(gpu, *buffers, m, k, n, page_shape(m, adapter_kind), activation=1)
    expected = gelu_new(x.astype(np.float64) @ w + bias)
    actual = gpu.read(out, (m, n))
    assert np.all(np.isfinite(actual))
    tolerance = 2e-5 * max(1.0, float(np.abs(expected).max()) / 100)
    assert max_error(actual, expected) < tolerance
    torch_gelu = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64) @ w + bias), approximate="tanh")
    assert max_error(actual, torch_gelu.numpy()) < tolerance


def lm_head(gpu: WgslRunner, x: np.ndarray, wte: np.ndarray, pieces: list[tuple[int, int]], shape: Shape,
            suffix: str = "") -> np.ndarray:  # fmt: skip
    """The page's LM head: a matmul without bias per transposed piece of wte, each into its logit columns."""
    m, vocab = x.shape[0], wte.shape[0]
    x_buffer, logits, unused = gpu.storage(x), gpu.empty(m * vocab), gpu.empty(4)
    for start, count in pieces:
        piece = gpu.storage(np.ascontiguousarray(wte[start : start + count].T))
        run_matmul(gpu, x_buffer, piece, unused, logits, m, x.shape[1], count, shape,
                   with_bias=False, out_stride=vocab, out_offset=start, suffix=suffix)  # fmt: skip
    return gpu.read(logits, (m, vocab))


@pytest.mark.parametrize(("m", "n_embd", "vocab"), [(1, 48, 97), (3, 48, 1000), (70, 20, 97)])
@pytest.mark.parametrize("adapter_kind", ["gpu", "cpu"])
def test_lm_head(gpu: WgslRunner, m: int, n_embd: int, vocab: int, adapter_kind: str) -> None:
    g = rng(5)
    x, wte = normal(g, m, n_embd), normal(g, vocab, n_embd, scale=0.5)
    logits = lm_head(gpu, x, wte, [(0, vocab)], page_shape(m, adapter_kind))
    assert max_error(logits, x.astype(np.float64) @ wte.T) < 2e-5


@pytest.mark.parametrize("adapter_kind", ["gpu", "cpu"])
def test_lm_head_in_pieces(gpu: WgslRunner, adapter_kind: str) -> None:
    """wte in two transposed pieces, each dispatch writing its columns of the logits."""
    g = rng(6)
    x, wte = normal(g, 20, 48), normal(g, 1000, 48, scale=0.5)
    logits = lm_head(gpu, x, wte, [(0, 512), (512, 488)], page_shape(20, adapter_kind))
    assert max_error(logits, x.astype(np.float64) @ wte.T) < 2e-5


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


# ---- the f16 twins (shader-f16), generated by webnode/js/twins.js ----


def test_f16_twins_are_generated_from_the_f32_kernels_alone() -> None:
    """No _f16 file is kept; each twin is its f32 file with `enable f16;` and the Weight alias set to f16."""
    twins = f16_twins()
    assert sorted(twins) == ["embedding_f16", "matmul_f16", "matvec_f16"]
    assert [path.stem for path in KERNEL_DIR.glob("*_f16.wgsl")] == ["unpack_f16"]  # a kernel, not a twin
    for name, twin in twins.items():
        source = (KERNEL_DIR / f"{name.removesuffix('_f16')}.wgsl").read_text()
        assert source.count("\nalias Weight = f32;") == 1
        assert twin == "enable f16;\n" + source.replace("\nalias Weight = f32;", "\nalias Weight = f16;")


def test_matmul_and_matvec_f16(gpu_f16: WgslRunner) -> None:
    g = rng(12)
    m, k, n = 5, 97, 67
    x, w, bias = normal(g, m, k), normal(g, k, n, scale=1 / math.sqrt(k)).astype(np.float16), normal(g, n)
    expected = gelu_new(x.astype(np.float64) @ w.astype(np.float64) + bias)
    for shape in (matvec_shape(5), tiled_shape(16, 16)):
        out = gpu_f16.empty(m * n)
        buffers = gpu_f16.storage(x), gpu_f16.storage(w), gpu_f16.storage(bias), out
        run_matmul(gpu_f16, *buffers, m, k, n, shape, activation=1, suffix="_f16")
        assert max_error(gpu_f16.read(out, (m, n)), expected) < 2e-5, shape["kernel"]


def test_lm_head_and_embedding_f16(gpu_f16: WgslRunner) -> None:
    g = rng(13)
    m, n_embd, vocab = 3, 48, 97
    x, wte, wpe = normal(g, m, n_embd), normal(g, vocab, n_embd).astype(np.float16), normal(g, 64, n_embd)
    wpe = wpe.astype(np.float16)
    logits = lm_head(gpu_f16, x, wte, [(0, 64), (64, 33)], matvec_shape(3), suffix="_f16")
    assert max_error(logits, x.astype(np.float64) @ wte.astype(np.float64).T) < 2e-5

    ids, positions = np.array([5, 96, 0], np.uint32), [0, 63, 7]
    out = gpu_f16.empty(m * n_embd)
    embed(gpu_f16, ids, positions, wte, wpe, out, suffix="_f16")
    expected = wte[ids].astype(np.float32) + wpe[positions].astype(np.float32)
    assert max_error(gpu_f16.read(out, (m, n_embd)), expected) < 1e-6


def test_every_kernel_file_has_a_test_that_names_it() -> None:
    here = KERNEL_DIR.parents[1] / "tests" / "webnode"
    tests = "".join(path.read_text() for path in (here / "test_kernels.py", here / "kernel_calls.py"))
    for path in sorted(KERNEL_DIR.glob("*.wgsl")):
        assert f'"{path.stem}"' in tests, f"{path.name} has no test that dispatches it by name"
