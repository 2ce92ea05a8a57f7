// Tiled matmul with bias and optional GELU: out = act(x @ w + bias), the Hugging Face Conv1D layout.
// For many rows on GPUs (prefill); matvec.wgsl takes a few rows, and every row count on CPU adapters.
//
// Bindings, group 0 (shapes row-major; w is Weight: f32 here, f16 in the generated twin matmul_f16):
//   0  uniform             params   MatmulParams (below), 32 bytes; the same struct as matvec.wgsl
//   1  storage, read       x        (m, k)
//   2  storage, read       w        (k, n)            c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights as
//                                                     stored, or the LM head's transposed token table piece
//   3  storage, read       bias     (n,)              read only when BIAS == 1 (bind any buffer otherwise)
//   4  storage, read_write out      (m, out_stride)   columns [out_offset, out_offset + n) are written;
//                                                     a different buffer from x
// Overrides:
//   WORKGROUP_X     (default 16): threads along n; the workgroup's block is 4 * WORKGROUP_X columns wide
//   WORKGROUP_Y     (default 16): threads along m; the block is ROWS_PER_THREAD * WORKGROUP_Y rows tall
//   ROWS_PER_THREAD (default 4, at most 4): rows each invocation computes, WORKGROUP_Y apart
//   TILE_K          (default 16): depth of the shared tiles
//   ACTIVATION      (default 0): 0 none, 1 GELU tanh approximation (gelu_new), fused after the bias
//   BIAS            (default 1): 0 adds no bias (the LM head)
//   Leave the BLOCK_* and *_SIZE overrides at their defaults: they follow from the ones above.
//   Workgroup memory: 4 * TILE_K * (ROWS_PER_THREAD * WORKGROUP_Y + 4 * WORKGROUP_X) bytes (8 KiB at the
//   defaults). The page sizes the block to the rows it gets (webnode/js/shapes.js).
// Dispatch: (ceil(n / (4 * WORKGROUP_X)), ceil(m / (ROWS_PER_THREAD * WORKGROUP_Y)), 1). Any m, k, n work.
// Each invocation owns a ROWS_PER_THREAD x 4 block of outputs strided by the workgroup size, so
// shared-memory reads of a w tile and the writes of out are consecutive across a row of invocations.

struct MatmulParams {
  m: u32,
  k: u32,
  n: u32,
  out_stride: u32,
  out_offset: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

const MAX_ROWS_PER_THREAD: u32 = 4u;
const COLUMNS_PER_THREAD: u32 = 4u;
const GELU_SCALE: f32 = 0.7978845608028654; // sqrt(2 / pi)

override WORKGROUP_X: u32 = 16u;
override WORKGROUP_Y: u32 = 16u;
override ROWS_PER_THREAD: u32 = 4u;
override TILE_K: u32 = 16u;
override ACTIVATION: u32 = 0u;
override BIAS: u32 = 1u;
override BLOCK_M: u32 = ROWS_PER_THREAD * WORKGROUP_Y;
override BLOCK_N: u32 = COLUMNS_PER_THREAD * WORKGROUP_X;
override X_TILE_SIZE: u32 = BLOCK_M * TILE_K;
override W_TILE_SIZE: u32 = TILE_K * BLOCK_N;

// f16 in the shader-f16 twin matmul_f16, which webnode/js/twins.js generates from this file.
alias Weight = f32;

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<Weight>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> x_tile: array<f32, X_TILE_SIZE>; // (BLOCK_M, TILE_K)
var<workgroup> w_tile: array<f32, W_TILE_SIZE>; // (TILE_K, BLOCK_N)

fn weight(i: u32) -> f32 {
  return f32(w[i]);
}

// tanh without exp overflow: exp of a non-positive argument only.
fn stable_tanh(z: f32) -> f32 {
  let e = exp(-2.0 * abs(z));
  return sign(z) * (1.0 - e) / (1.0 + e);
}

fn activate(value: f32) -> f32 {
  if (ACTIVATION == 1u) {
    let inner = clamp(GELU_SCALE * (value + 0.044715 * value * value * value), -15.0, 15.0);
    return 0.5 * value * (1.0 + stable_tanh(inner));
  }
  return value;
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, 1)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
  let threads = WORKGROUP_X * WORKGROUP_Y;
  let lane = local.y * WORKGROUP_X + local.x;
  let row0 = group_id.y * BLOCK_M;
  let column0 = group_id.x * BLOCK_N;
  var acc: array<f32, MAX_ROWS_PER_THREAD * COLUMNS_PER_THREAD>; // zero-initialised

  for (var k0 = 0u; k0 < params.k; k0 = k0 + TILE_K) {
    for (var i = lane; i < X_TILE_SIZE; i = i + threads) {
      let row = row0 + i / TILE_K;
      let depth = k0 + i % TILE_K;
      var value = 0.0;
      if (row < params.m && depth < params.k) {
        value = x[row * params.k + depth];
      }
      x_tile[i] = value;
    }
    for (var i = lane; i < W_TILE_SIZE; i = i + threads) {
      let depth = k0 + i / BLOCK_N;
      let column = column0 + i % BLOCK_N;
      var value = 0.0;
      if (depth < params.k && column < params.n) {
        value = weight(depth * params.n + column);
      }
      w_tile[i] = value;
    }
    workgroupBarrier();

    for (var kk = 0u; kk < TILE_K; kk = kk + 1u) {
      var a: array<f32, MAX_ROWS_PER_THREAD>;
      for (var r = 0u; r < ROWS_PER_THREAD; r = r + 1u) {
        a[r] = x_tile[(local.y + r * WORKGROUP_Y) * TILE_K + kk];
      }
      for (var c = 0u; c < COLUMNS_PER_THREAD; c = c + 1u) {
        let b = w_tile[kk * BLOCK_N + local.x + c * WORKGROUP_X];
        for (var r = 0u; r < ROWS_PER_THREAD; r = r + 1u) {
          acc[r * COLUMNS_PER_THREAD + c] = fma(a[r], b, acc[r * COLUMNS_PER_THREAD + c]);
        }
      }
    }
    workgroupBarrier();
  }

  for (var r = 0u; r < ROWS_PER_THREAD; r = r + 1u) {
    let row = row0 + local.y + r * WORKGROUP_Y;
    for (var c = 0u; c < COLUMNS_PER_THREAD; c = c + 1u) {
      let column = column0 + local.x + c * WORKGROUP_X;
      if (row < params.m && column < params.n) {
        var value = acc[r * COLUMNS_PER_THREAD + c];
        if (BIAS == 1u) {
          value = value + bias[column];
        }
        out[row * params.out_stride + params.out_offset + column] = activate(value);
      }
    }
  }
}
