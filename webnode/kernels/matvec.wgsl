// Matrix times a few rows, no workgroup memory: out = act(x @ w + bias), the Hugging Face Conv1D layout.
// The decode kernel (one row per request), and on CPU adapters the kernel for every row count.
//
// Bindings, group 0 (shapes row-major; w is Weight: f32 here, f16 in the generated twin matvec_f16):
//   0  uniform             params   MatmulParams (below), 32 bytes; the same struct as matmul.wgsl
//   1  storage, read       x        (m, k)
//   2  storage, read       w        (k, n)            c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights as
//                                                     stored, or the LM head's transposed token table piece
//   3  storage, read       bias     (n,)              read only when BIAS == 1 (bind any buffer otherwise)
//   4  storage, read_write out      (m, out_stride)   columns [out_offset, out_offset + n) are written;
//                                                     a different buffer from x
// Overrides:
//   WORKGROUP_SIZE (default 64): invocations of a workgroup, side by side along n
//   ROWS           (default 1, at most 8): rows of x each invocation computes
//   COLUMNS        (default 4, at most 8): columns each invocation computes, WORKGROUP_SIZE apart
//   ACTIVATION     (default 0): 0 none, 1 GELU tanh approximation (gelu_new), fused after the bias
//   BIAS           (default 1): 0 adds no bias (the LM head)
// Dispatch: (ceil(n / (COLUMNS * WORKGROUP_SIZE)), ceil(m / ROWS), 1). Any m, k, n work.
// Why no tiles: each invocation keeps ROWS x COLUMNS sums in registers and reads w straight from the
// buffer, each element once per group of ROWS rows; neighbouring invocations read neighbouring columns
// (one vector load on SIMD CPUs, coalesced on GPUs) and the same x element (a broadcast). There is no
// barrier, which on SwiftShader (WebGPU on the CPU) costs a fiber switch per invocation group. The depth
// loop is unrolled by 4 (a dot of 4 depths per sum); a last loop takes k % 4.

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

const MAX_ROWS: u32 = 8u;
const MAX_COLUMNS: u32 = 8u;
const GELU_SCALE: f32 = 0.7978845608028654; // sqrt(2 / pi)

override WORKGROUP_SIZE: u32 = 64u;
override ROWS: u32 = 1u;
override COLUMNS: u32 = 4u;
override ACTIVATION: u32 = 0u;
override BIAS: u32 = 1u;

// f16 in the shader-f16 twin matvec_f16, which webnode/js/twins.js generates from this file.
alias Weight = f32;

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<Weight>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

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

@compute @workgroup_size(WORKGROUP_SIZE, 1, 1)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
  let column0 = group_id.x * WORKGROUP_SIZE * COLUMNS + local.x;
  let row0 = group_id.y * ROWS;
  // Rows past m and columns past n compute on the last valid one (in bounds) and are not written.
  var x_start: array<u32, MAX_ROWS>;
  for (var r = 0u; r < ROWS; r = r + 1u) {
    x_start[r] = min(row0 + r, params.m - 1u) * params.k;
  }
  var columns: array<u32, MAX_COLUMNS>;
  for (var c = 0u; c < COLUMNS; c = c + 1u) {
    columns[c] = min(column0 + c * WORKGROUP_SIZE, params.n - 1u);
  }
  var acc: array<f32, MAX_ROWS * MAX_COLUMNS>; // (MAX_ROWS, MAX_COLUMNS), zero-initialised

  let k4 = params.k & ~3u;
  for (var depth = 0u; depth < k4; depth = depth + 4u) {
    var xs: array<vec4<f32>, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r = r + 1u) {
      let i = x_start[r] + depth;
      xs[r] = vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
    }
    let w_row = depth * params.n;
    for (var c = 0u; c < COLUMNS; c = c + 1u) {
      let i = w_row + columns[c];
      let b = vec4<f32>(weight(i), weight(i + params.n), weight(i + 2u * params.n), weight(i + 3u * params.n));
      for (var r = 0u; r < ROWS; r = r + 1u) {
        acc[r * MAX_COLUMNS + c] = acc[r * MAX_COLUMNS + c] + dot(xs[r], b);
      }
    }
  }
  for (var depth = k4; depth < params.k; depth = depth + 1u) {
    for (var c = 0u; c < COLUMNS; c = c + 1u) {
      let b = weight(depth * params.n + columns[c]);
      for (var r = 0u; r < ROWS; r = r + 1u) {
        acc[r * MAX_COLUMNS + c] = fma(x[x_start[r] + depth], b, acc[r * MAX_COLUMNS + c]);
      }
    }
  }

  for (var r = 0u; r < ROWS; r = r + 1u) {
    let row = row0 + r;
    for (var c = 0u; c < COLUMNS; c = c + 1u) {
      let column = column0 + c * WORKGROUP_SIZE;
      if (row < params.m && column < params.n) {
        var value = acc[r * MAX_COLUMNS + c];
        if (BIAS == 1u) {
          value = value + bias[column];
        }
        out[row * params.out_stride + params.out_offset + column] = activate(value);
      }
    }
  }
}
