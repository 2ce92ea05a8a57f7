// Top-k of each row, one pass: every workgroup selects the k best (value, index) pairs of one chunk.
//
// Ordering: larger value first; equal values by lower index (so the result matches a stable sort).
// Pass 1 reads the logits (INDEXED = false: an element's index is its column). Each pass turns
// (rows, n) candidates into (rows, ceil(n / CHUNK), k) pairs, sorted within each chunk; the next pass
// (INDEXED = true) reads those pairs as (rows, n' = ceil(n / CHUNK) * k) candidates. Repeat until one
// chunk is left: its output is the row's top-k, sorted. GPT-2 (n = 50257) with k = 64 and CHUNK = 1024
// takes 3 passes: 50257 -> 50 * 64 = 3200 -> 4 * 64 = 256 -> 64. k <= CHUNK / 2 keeps each pass shrinking.
// Padding pairs (a chunk with fewer than k valid elements) have index 0xffffffff and value -3e38; later
// passes skip them. A NaN value is skipped where the implementation keeps NaNs (WGSL need not).
//
// Bindings, group 0 (shapes row-major):
//   0  uniform             params        TopKParams (below), 16 bytes
//   1  storage, read       values        (rows, n) f32
//   2  storage, read       indices       (rows, n) u32   read only when INDEXED; bind any u32 storage
//                                                        buffer (e.g. out_indices of another pass) for pass 1
//   3  storage, read_write out_values    (rows, ceil(n / CHUNK), k) f32
//   4  storage, read_write out_indices   (rows, ceil(n / CHUNK), k) u32
// Overrides: WORKGROUP_SIZE (default 256, a power of two), CHUNK (default 1024), INDEXED (default false).
// Workgroup memory: 8 * CHUNK + 12 * WORKGROUP_SIZE bytes (11 KiB at the defaults).
// Dispatch: (ceil(n / CHUNK), rows, 1).
// Cost per workgroup: one read of its chunk, then k rounds of a log2(WORKGROUP_SIZE)-step tree
// reduction (each a barrier); after a pick only the invocation that owned the winner rescans its
// CHUNK / WORKGROUP_SIZE elements. For GPT-2 and k = 64 that is 64 * 9 barriers per workgroup,
// 50 * rows workgroups in pass 1: small next to the LM head matmul.

struct TopKParams {
  rows: u32,
  n: u32,
  k: u32,
  _pad: u32,
}

const INVALID: u32 = 0xffffffffu;
const LOWEST: f32 = -3.0e38;

override WORKGROUP_SIZE: u32 = 256u;
override CHUNK: u32 = 1024u;
override INDEXED: bool = false;

@group(0) @binding(0) var<uniform> params: TopKParams;
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read> indices: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_indices: array<u32>;

var<workgroup> chunk_values: array<f32, CHUNK>;
var<workgroup> chunk_indices: array<u32, CHUNK>;  // INVALID once taken, or for padding
var<workgroup> best_values: array<f32, WORKGROUP_SIZE>;
var<workgroup> best_indices: array<u32, WORKGROUP_SIZE>;
var<workgroup> best_slots: array<u32, WORKGROUP_SIZE>; // position of the candidate in the chunk

// Whether candidate a (value, index) ranks before candidate b; invalid candidates rank last.
fn ranks_before(value_a: f32, index_a: u32, value_b: f32, index_b: u32) -> bool {
  if (index_a == INVALID) {
    return false;
  }
  if (index_b == INVALID) {
    return true;
  }
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

struct Candidate {
  value: f32,
  index: u32,
  slot: u32,
}

// The best remaining candidate among the chunk positions this invocation owns (lane, lane + WG, ...).
fn best_owned(lane: u32) -> Candidate {
  var best = Candidate(LOWEST, INVALID, INVALID);
  for (var slot = lane; slot < CHUNK; slot = slot + WORKGROUP_SIZE) {
    if (ranks_before(chunk_values[slot], chunk_indices[slot], best.value, best.index)) {
      best = Candidate(chunk_values[slot], chunk_indices[slot], slot);
    }
  }
  return best;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
  let chunk = group_id.x;
  let row = group_id.y;
  if (row >= params.rows) {
    return;
  }
  let chunks = (params.n + CHUNK - 1u) / CHUNK;
  let chunk_start = chunk * CHUNK;
  for (var slot = lane; slot < CHUNK; slot = slot + WORKGROUP_SIZE) {
    let column = chunk_start + slot;
    var value = LOWEST;
    var index = INVALID;
    if (column < params.n) {
      value = values[row * params.n + column];
      index = column;
      if (INDEXED) {
        index = indices[row * params.n + column];
      }
      if (value != value) { // NaN
        index = INVALID;
      }
    }
    chunk_values[slot] = value;
    chunk_indices[slot] = index;
  }
  workgroupBarrier();

  var mine = best_owned(lane);
  let out_base = (row * chunks + chunk) * params.k;
  for (var pick = 0u; pick < params.k; pick = pick + 1u) {
    best_values[lane] = mine.value;
    best_indices[lane] = mine.index;
    best_slots[lane] = mine.slot;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
      if (lane < stride) {
        let other = lane + stride;
        if (ranks_before(best_values[other], best_indices[other], best_values[lane], best_indices[lane])) {
          best_values[lane] = best_values[other];
          best_indices[lane] = best_indices[other];
          best_slots[lane] = best_slots[other];
        }
      }
      workgroupBarrier();
    }
    let winner_value = best_values[0];
    let winner_index = best_indices[0];
    let winner_slot = best_slots[0];
    workgroupBarrier(); // everyone has read the winner before the next pick overwrites it

    if (lane == 0u) {
      out_values[out_base + pick] = select(winner_value, LOWEST, winner_index == INVALID);
      out_indices[out_base + pick] = winner_index;
    }
    if (winner_slot != INVALID && winner_slot % WORKGROUP_SIZE == lane) {
      chunk_indices[winner_slot] = INVALID; // owned by this invocation alone: no barrier needed
      mine = best_owned(lane);
    }
  }
}
