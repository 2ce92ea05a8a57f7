// LayerNorm over the last dimension: out[r, :] = (x[r, :] - mean) / sqrt(var + eps) * weight + bias.
//
// Bindings, group 0 (shapes row-major, f32):
//   0  uniform             params   LayerNormParams (below), 16 bytes
//   1  storage, read       x        (rows, n_embd)
//   2  storage, read       weight   (n_embd,)
//   3  storage, read       bias     (n_embd,)
//   4  storage, read_write out      (rows, n_embd)   a different buffer from x
// Overrides: WORKGROUP_SIZE (default 128, a power of two).
// Dispatch: (rows, 1, 1): one workgroup per row.
// Two passes over the row (mean, then the mean of squared deviations), as torch does: the variance is
// biased and never negative, unlike E[x^2] - E[x]^2 on rows with a large mean.
// Every barrier is in the entry point itself: Tint's GLSL for a helper function holding barriers
// ran wrong on Mesa's GLES driver (llvmpipe, through Dawn's compatibility mode), inlined it ran right.

struct LayerNormParams {
  rows: u32,
  n_embd: u32,
  eps: f32,
  _pad: u32,
}

override WORKGROUP_SIZE: u32 = 128u;

@group(0) @binding(0) var<uniform> params: LayerNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let row = group_id.x;
  if (row >= params.rows) {
    return;
  }
  let n = params.n_embd;
  let base = row * n;

  var sum = 0.0;
  for (var i = lane; i < n; i = i + WORKGROUP_SIZE) {
    sum = sum + x[base + i];
  }
  partial[lane] = sum;
  workgroupBarrier();
  for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
    if (lane < stride) {
      partial[lane] = partial[lane] + partial[lane + stride];
    }
    workgroupBarrier();
  }
  let mean = partial[0] / f32(n);
  workgroupBarrier(); // all have read partial[0] before it is rewritten

  var squares = 0.0;
  for (var i = lane; i < n; i = i + WORKGROUP_SIZE) {
    let deviation = x[base + i] - mean;
    squares = squares + deviation * deviation;
  }
  partial[lane] = squares;
  workgroupBarrier();
  for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
    if (lane < stride) {
      partial[lane] = partial[lane] + partial[lane + stride];
    }
    workgroupBarrier();
  }
  let inverse_std = inverseSqrt(partial[0] / f32(n) + params.eps);

  for (var i = lane; i < n; i = i + WORKGROUP_SIZE) {
    out[base + i] = (x[base + i] - mean) * inverse_std * weight[i] + bias[i];
  }
}
