// Causal self-attention over the KV cache for a batch of rows from any number of requests.
//
// Row r (slot s, absolute position p from row_meta) attends, in each head h, over cache positions
// [0, p] of slot s: out[r, h*head_dim : (h+1)*head_dim] = softmax(q . k / sqrt(head_dim)) @ v.
// Run kv_append.wgsl for the same rows first, so the rows' own keys (and earlier rows of the same
// prompt) are in the cache. The softmax is computed online, one chunk of WORKGROUP_SIZE keys at a time,
// so any context length works with fixed workgroup memory.
// Every barrier is in the entry point itself (see layernorm.wgsl for why).
//
// Bindings, group 0 (shapes row-major):
//   0  uniform             params     AttentionParams (below), 32 bytes; same struct as kv_append.wgsl
//   1  storage, read       qkv        (rows, 3 * n_embd) f32   c_attn output; only q (the first n_embd
//                                                              columns) is read
//   2  storage, read       row_meta   array<RowMeta> (rows,)   {slot, position} per row, 8 bytes each
//   3  storage, read       k_cache    (slots, n_head, max_positions, head_dim) f32, see kv_append.wgsl
//   4  storage, read       v_cache    (slots, n_head, max_positions, head_dim) f32
//   5  storage, read_write out        (rows, n_embd) f32       heads concatenated, ready for attn.c_proj
// Overrides: WORKGROUP_SIZE (default 64, a power of two), MAX_HEAD_DIM (default 128, >= head_dim).
// Workgroup memory: 8 * (WORKGROUP_SIZE + MAX_HEAD_DIM) + 4 bytes.
// Dispatch: (n_head, rows, 1): one workgroup per (head, row).
// A row with slot >= slots or position >= max_positions gets zeros.

struct AttentionParams {
  rows: u32,
  n_embd: u32,
  n_head: u32,
  max_positions: u32,
  slots: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

struct RowMeta {
  slot: u32,
  position: u32,
}

// Stands for -infinity: WGSL implementations may assume no infinities, so none is ever produced.
const LOWEST: f32 = -3.0e38;

override WORKGROUP_SIZE: u32 = 64u;
override MAX_HEAD_DIM: u32 = 128u;

@group(0) @binding(0) var<uniform> params: AttentionParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> row_meta: array<RowMeta>;
@group(0) @binding(3) var<storage, read> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> query: array<f32, MAX_HEAD_DIM>;        // q of this (row, head), pre-scaled
var<workgroup> accumulator: array<f32, MAX_HEAD_DIM>;  // running sum of weights * v, before 1 / total
var<workgroup> weights: array<f32, WORKGROUP_SIZE>;    // exp(score - running max) of the chunk's keys
var<workgroup> reduction: array<f32, WORKGROUP_SIZE>;
var<workgroup> key_count: u32;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let head = group_id.x;
  let row = group_id.y;
  let n_embd = params.n_embd;
  let head_dim = n_embd / params.n_head;
  let out_base = row * n_embd + head * head_dim;
  if (row >= params.rows || head >= params.n_head) {
    return;
  }

  if (lane == 0u) {
    let placement = row_meta[row];
    var count = 0u;
    if (placement.slot < params.slots && placement.position < params.max_positions) {
      count = placement.position + 1u;
    }
    key_count = count;
  }
  // The key count is the same for the whole workgroup; loading it through workgroupUniformLoad makes
  // the chunk loop below (which holds barriers) provably uniform.
  let keys = workgroupUniformLoad(&key_count);
  let slot = row_meta[row].slot;

  let scale = inverseSqrt(f32(head_dim));
  for (var d = lane; d < head_dim; d = d + WORKGROUP_SIZE) {
    query[d] = qkv[row * 3u * n_embd + head * head_dim + d] * scale;
    accumulator[d] = 0.0;
  }
  workgroupBarrier();

  let cache_base = (slot * params.n_head + head) * params.max_positions * head_dim;
  var running_max = LOWEST;
  var total = 0.0;
  for (var start = 0u; start < keys; start = start + WORKGROUP_SIZE) {
    let position = start + lane;
    var score = LOWEST;
    if (position < keys) {
      let key_base = cache_base + position * head_dim;
      var product = 0.0;
      for (var d = 0u; d < head_dim; d = d + 1u) {
        product = fma(query[d], k_cache[key_base + d], product);
      }
      score = product;
    }
    reduction[lane] = score;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
      if (lane < stride) {
        reduction[lane] = max(reduction[lane], reduction[lane + stride]);
      }
      workgroupBarrier();
    }
    let new_max = max(running_max, reduction[0]);
    workgroupBarrier(); // all have read reduction[0] before it is rewritten

    var weight = 0.0;
    if (position < keys) {
      weight = exp(score - new_max);
    }
    weights[lane] = weight;
    reduction[lane] = weight;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
      if (lane < stride) {
        reduction[lane] = reduction[lane] + reduction[lane + stride];
      }
      workgroupBarrier();
    }
    let correction = exp(running_max - new_max);
    total = total * correction + reduction[0];
    running_max = new_max;

    let chunk = min(WORKGROUP_SIZE, keys - start);
    for (var d = lane; d < head_dim; d = d + WORKGROUP_SIZE) {
      var sum = accumulator[d] * correction;
      let value_base = cache_base + start * head_dim + d;
      for (var j = 0u; j < chunk; j = j + 1u) {
        sum = fma(weights[j], v_cache[value_base + j * head_dim], sum);
      }
      accumulator[d] = sum;
    }
    workgroupBarrier(); // weights[] and reduction[0] are rewritten by the next chunk
  }

  for (var d = lane; d < head_dim; d = d + WORKGROUP_SIZE) {
    var value = 0.0;
    if (keys > 0u) {
      value = accumulator[d] / total;
    }
    out[out_base + d] = value;
  }
}
