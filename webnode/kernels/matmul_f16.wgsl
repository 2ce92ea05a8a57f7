// Matmul with bias and optional GELU, f16 weights (shader-f16): twin of matmul.wgsl.
//
// Needs the device feature "shader-f16" (request it in requestDevice when the adapter has it).
// Identical to the f32 kernel except that the weights marked f16 below hold IEEE half floats, read
// as uploaded from the shard (2 bytes an element; pad the buffer to a multiple of 4 bytes);
// arithmetic stays f32. tests/webnode/test_kernels.py checks that the two files stay in step.
//
// Bindings, group 0 (shapes row-major; w f16, the rest f32):
//   0  uniform             params   MatmulParams (below), 16 bytes
//   1  storage, read       x        (m, k)
//   2  storage, read       w        (k, n)   c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights as stored
//   3  storage, read       bias     (n,)
//   4  storage, read_write out      (m, n)   a different buffer from x
// Overrides:
//   WORKGROUP_X (default 16): threads along n; the workgroup's block is 4 * WORKGROUP_X columns wide
//   WORKGROUP_Y (default 16): threads along m; the block is 4 * WORKGROUP_Y rows tall
//   TILE_K      (default 16): depth of the shared tiles
//   ACTIVATION  (default 0): 0 none, 1 GELU tanh approximation (gelu_new), fused after the bias
//   Leave the *_SIZE overrides at their defaults: they follow from the three above.
//   Workgroup memory: 16 * (WORKGROUP_X + WORKGROUP_Y) * TILE_K bytes (8 KiB at the defaults).
// Dispatch: (ceil(n / (4 * WORKGROUP_X)), ceil(m / (4 * WORKGROUP_Y)), 1).
// Any m, k, n work (no multiple of the tile needed). For decode (m of a few rows) WORKGROUP_Y = 1 and
// WORKGROUP_X = 64 keep the wasted rows of a block to at most 3.
// Each invocation owns a 4 x 4 block of outputs strided by the workgroup size, so shared-memory reads
// of a w tile and the writes of out are consecutive across a row of invocations.

enable f16;

struct MatmulParams {
  m: u32,
  k: u32,
  n: u32,
  _pad: u32,
}

const ROWS_PER_THREAD: u32 = 4u;
const COLUMNS_PER_THREAD: u32 = 4u;
const GELU_SCALE: f32 = 0.7978845608028654; // sqrt(2 / pi)

override WORKGROUP_X: u32 = 16u;
override WORKGROUP_Y: u32 = 16u;
override TILE_K: u32 = 16u;
override ACTIVATION: u32 = 0u;
override BLOCK_M: u32 = ROWS_PER_THREAD * WORKGROUP_Y;
override BLOCK_N: u32 = COLUMNS_PER_THREAD * WORKGROUP_X;
override X_TILE_SIZE: u32 = BLOCK_M * TILE_K;
override W_TILE_SIZE: u32 = TILE_K * BLOCK_N;

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f16>;
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
  var acc: array<f32, 16>; // (ROWS_PER_THREAD, COLUMNS_PER_THREAD), zero-initialised

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
      var a: array<f32, 4>;
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
        let value = acc[r * COLUMNS_PER_THREAD + c] + bias[column];
        out[row * params.n + column] = activate(value);
      }
    }
  }
}
