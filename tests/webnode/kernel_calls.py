"""Dispatch helpers and numpy references for the WGSL kernel tests: each helper follows the "Dispatch:" line
of its kernel's header, and matmuls take the shapes webnode/js/shapes.js picks (run by Node.js)."""

from __future__ import annotations

import functools
import math

import numpy as np
import wgpu

from tests.webnode.wgsl_runner import BufferRange, WgslRunner, run_page_code

Binding = wgpu.GPUBuffer | BufferRange
Shape = dict  # a MatmulShape of shapes.js: kernel, constants, rowsPerGroup, columnsPerGroup
INVALID = 0xFFFFFFFF
LOWEST = np.float32(-3.0e38)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(generator: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (generator.standard_normal(shape) * scale).astype(np.float32)


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- matmul shapes ----


@functools.cache
def page_shapes() -> dict[tuple[int, str], Shape]:
    """(rows, "gpu" | "cpu") -> the MatmulShape the page picks, for 1..300 rows."""
    shapes: dict[tuple[int, str], Shape] = {}
    for entry in run_page_code("shapes", *map(str, range(1, 301))):
        shapes[(entry["m"], "gpu")], shapes[(entry["m"], "cpu")] = entry["gpu"], entry["cpu"]
    return shapes


def page_shape(m: int, adapter: str) -> Shape:
    return page_shapes()[(m, adapter)]


def matvec_shape(rows: int, columns: int = 4, workgroup: int = 64) -> Shape:
    constants = {"WORKGROUP_SIZE": workgroup, "ROWS": rows, "COLUMNS": columns}
    return {"kernel": "matvec", "constants": constants, "rowsPerGroup": rows, "columnsPerGroup": workgroup * columns}


def tiled_shape(wx: int, wy: int, rows_per_thread: int = 4, tile_k: int = 16) -> Shape:
    constants = {"WORKGROUP_X": wx, "WORKGROUP_Y": wy, "ROWS_PER_THREAD": rows_per_thread, "TILE_K": tile_k}
    return {"kernel": "matmul", "constants": constants, "rowsPerGroup": rows_per_thread * wy, "columnsPerGroup": 4 * wx}


def run_matmul(
    gpu: WgslRunner, x: Binding, w: Binding, bias: Binding, out: Binding, m: int, k: int, n: int, shape: Shape,
    *, activation: int = 0, with_bias: bool = True, out_stride: int | None = None, out_offset: int = 0,
    suffix: str = "",
) -> None:  # fmt: skip
    """out[:, out_offset : out_offset + n] = act(x @ w (+ bias)) with matmul.wgsl or matvec.wgsl (+ suffix)."""
    constants = {**shape["constants"], "ACTIVATION": activation, "BIAS": int(with_bias)}
    groups = (ceil_div(n, shape["columnsPerGroup"]), ceil_div(m, shape["rowsPerGroup"]), 1)
    params = gpu.uniform(m, k, n, n if out_stride is None else out_stride, out_offset)
    gpu.dispatch(shape["kernel"] + suffix, [params, x, w, bias, out], groups, constants)


# ---- the other kernels ----


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
