// Token + position embedding of the first stage: out[r, :] = wte[ids[r], :] + wpe[position[r], :].
//
// Bindings, group 0 (shapes row-major, f32 unless said; wte and wpe are Weight: f32 here, f16 in the
// generated twin embedding_f16):
//   0  uniform             params       EmbeddingParams (below), 32 bytes
//   1  storage, read       ids          array<u32> (rows,)      token id of each row
//   2  storage, read       row_meta     array<RowMeta> (rows,)  {slot, position} per row, 8 bytes each;
//                                       the same buffer kv_append.wgsl and attention.wgsl read
//   3  storage, read       wte_t        (n_embd, vocab_count)   the token table transposed: column j is
//                                       token vocab_start + j (the layout the LM head's matvec reads)
//   4  storage, read       wpe          (n_positions, n_embd)
//   5  storage, read_write out          (rows, n_embd)
// Overrides: WORKGROUP_SIZE (default 64).
// Dispatch: (ceil(n_embd / WORKGROUP_SIZE), rows, 1).
// A row whose id is outside [vocab_start, vocab_start + vocab_count) or whose position is >= n_positions
// is not written. So a token table larger than maxStorageBufferBindingSize (GPT-2 124M in f32 is 154 MB)
// is bound in pieces, one dispatch per piece, each writing the rows whose ids it holds.
// The page validates ids and positions before the dispatch; the guard only keeps reads in bounds.
// Reading a token's values down a column of wte_t is a strided read, n_embd values a row: nothing next
// to the LM head, which reads the whole table every step.

struct EmbeddingParams {
  rows: u32,
  n_embd: u32,
  vocab_start: u32,
  vocab_count: u32,
  n_positions: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

struct RowMeta {
  slot: u32,
  position: u32,
}

override WORKGROUP_SIZE: u32 = 64u;

// f16 in the shader-f16 twin embedding_f16, which webnode/js/twins.js generates from this file.
alias Weight = f32;

@group(0) @binding(0) var<uniform> params: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> row_meta: array<RowMeta>;
@group(0) @binding(3) var<storage, read> wte_t: array<Weight>;
@group(0) @binding(4) var<storage, read> wpe: array<Weight>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

fn table(i: u32) -> f32 {
  return f32(wte_t[i]);
}

fn position_table(i: u32) -> f32 {
  return f32(wpe[i]);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let row = group_id.y;
  let column = group_id.x * WORKGROUP_SIZE + lane;
  if (row >= params.rows || column >= params.n_embd) {
    return;
  }
  let id = ids[row];
  let position = row_meta[row].position;
  if (id < params.vocab_start || id - params.vocab_start >= params.vocab_count
      || position >= params.n_positions) {
    return;
  }
  let token_value = table(column * params.vocab_count + id - params.vocab_start);
  out[row * params.n_embd + column] = token_value + position_table(position * params.n_embd + column);
}
