// KV-cache append: copies each new row's k and v heads from the c_attn output into its request slot.
//
// Cache layout (one pair of buffers per layer): k_cache and v_cache are each
// (slots, n_head, max_positions, head_dim) f32, head_dim = n_embd / n_head; the key of head h at
// absolute position p of slot s starts at ((s * n_head + h) * max_positions + p) * head_dim.
// A slot is one request; re-using it for a new request needs no clearing (attention reads [0, p]).
//
// Bindings, group 0 (shapes row-major):
//   0  uniform             params     AttentionParams (below), 32 bytes; same struct as attention.wgsl
//   1  storage, read       qkv        (rows, 3 * n_embd) f32   c_attn output: q | k | v
//   2  storage, read       row_meta   array<RowMeta> (rows,)   {slot, position} per row, 8 bytes each
//   3  storage, read_write k_cache    (slots, n_head, max_positions, head_dim) f32
//   4  storage, read_write v_cache    (slots, n_head, max_positions, head_dim) f32
// Overrides: WORKGROUP_SIZE (default 64).
// Dispatch: (ceil(n_embd / WORKGROUP_SIZE), rows, 1).
// Rows of several requests (different slots, different positions) go in one dispatch. A row with
// slot >= slots or position >= max_positions writes nothing; the page rejects such a step first.

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

override WORKGROUP_SIZE: u32 = 64u;

@group(0) @binding(0) var<uniform> params: AttentionParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> row_meta: array<RowMeta>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let row = group_id.y;
  let channel = group_id.x * WORKGROUP_SIZE + lane; // h * head_dim + d
  if (row >= params.rows || channel >= params.n_embd) {
    return;
  }
  let placement = row_meta[row];
  if (placement.slot >= params.slots || placement.position >= params.max_positions) {
    return;
  }
  let head_dim = params.n_embd / params.n_head;
  let head = channel / head_dim;
  let d = channel % head_dim;
  let cache_row = (placement.slot * params.n_head + head) * params.max_positions + placement.position;
  let destination = cache_row * head_dim + d;
  let source = row * 3u * params.n_embd + channel;
  k_cache[destination] = qkv[source + params.n_embd];
  v_cache[destination] = qkv[source + 2u * params.n_embd];
}
