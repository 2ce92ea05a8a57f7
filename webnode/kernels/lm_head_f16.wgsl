// LM head with the tied embedding, f16 table (shader-f16): twin of lm_head.wgsl.
//
// Needs the device feature "shader-f16" (request it in requestDevice when the adapter has it).
// Identical to the f32 kernel except that the weights marked f16 below hold IEEE half floats, read
// as uploaded from the shard (2 bytes an element; pad the buffer to a multiple of 4 bytes);
// arithmetic stays f32. tests/webnode/test_kernels.py checks that the two files stay in step.
//
// Bindings, group 0 (shapes row-major; wte f16, the rest f32):
//   0  uniform             params   LmHeadParams (below), 32 bytes
//   1  storage, read       x        (m, k)            final-LayerNorm output, k = n_embd
//   2  storage, read       wte      (n, k)            token rows [out_offset, out_offset + n) of wte,
//                                                     used transposed: no copy of the table is made
//   3  storage, read_write logits   (m, out_stride)   out_stride = vocab_size; columns
//                                                     [out_offset, out_offset + n) are written
// Overrides: WORKGROUP_X, WORKGROUP_Y, TILE_K as in matmul.wgsl (block 4*WORKGROUP_Y x 4*WORKGROUP_X).
// Dispatch: (ceil(n / (4 * WORKGROUP_X)), ceil(m / (4 * WORKGROUP_Y)), 1).
// A table larger than maxStorageBufferBindingSize (GPT-2 124M wte is 154 MB in f32, 77 MB in f16) is
// bound in pieces of whole rows with a binding offset (a multiple of minStorageBufferOffsetAlignment),
// one dispatch per piece with its out_offset.

enable f16;

struct LmHeadParams {
  m: u32,
  k: u32,
  n: u32,
  out_stride: u32,
  out_offset: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

const ROWS_PER_THREAD: u32 = 4u;
const COLUMNS_PER_THREAD: u32 = 4u;

override WORKGROUP_X: u32 = 16u;
override WORKGROUP_Y: u32 = 16u;
override TILE_K: u32 = 16u;
override BLOCK_M: u32 = ROWS_PER_THREAD * WORKGROUP_Y;
override BLOCK_N: u32 = COLUMNS_PER_THREAD * WORKGROUP_X;
override X_TILE_SIZE: u32 = BLOCK_M * TILE_K;
override W_TILE_SIZE: u32 = TILE_K * BLOCK_N;

@group(0) @binding(0) var<uniform> params: LmHeadParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wte: array<f16>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

var<workgroup> x_tile: array<f32, X_TILE_SIZE>; // (BLOCK_M, TILE_K)
var<workgroup> w_tile: array<f32, W_TILE_SIZE>; // (TILE_K, BLOCK_N)

fn weight(i: u32) -> f32 {
  return f32(wte[i]);
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
    // Consecutive invocations read consecutive depths of one token row (the row-major order of wte).
    for (var i = lane; i < W_TILE_SIZE; i = i + threads) {
      let column_in_block = i / TILE_K;
      let depth_in_tile = i % TILE_K;
      let column = column0 + column_in_block;
      let depth = k0 + depth_in_tile;
      var value = 0.0;
      if (depth < params.k && column < params.n) {
        value = weight(column * params.k + depth);
      }
      w_tile[depth_in_tile * BLOCK_N + column_in_block] = value;
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
        logits[row * params.out_stride + params.out_offset + column] = acc[r * COLUMNS_PER_THREAD + c];
      }
    }
  }
}
