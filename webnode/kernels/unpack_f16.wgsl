// f16 -> f32 conversion of a weight tensor, with no shader-f16 feature needed (unpack2x16float is core).
//
// Shards store weights as little-endian IEEE half floats; upload the bytes as they are into a u32
// storage buffer (pad an odd count to a whole u32 word) and this kernel writes the f32 tensor.
//
// Bindings, group 0:
//   0  uniform             params   UnpackParams (below), 16 bytes
//   1  storage, read       words    array<u32> (ceil(count / 2),)   element 2i in the low 16 bits of word i
//   2  storage, read_write out      array<f32> (count,)
// Overrides: WORKGROUP_SIZE (default 256).
// Dispatch: groups = ceil(ceil(count / 2) / WORKGROUP_SIZE) laid out in two dimensions so that no
// dimension passes maxComputeWorkgroupsPerDimension (65535 by default):
// (min(groups, 65535), ceil(groups / 65535), 1). One invocation converts one word (two values).
// A tensor larger than maxStorageBufferBindingSize is converted in pieces with binding offsets.

struct UnpackParams {
  count: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

override WORKGROUP_SIZE: u32 = 256u;

@group(0) @binding(0) var<uniform> params: UnpackParams;
@group(0) @binding(1) var<storage, read> words: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
  @builtin(workgroup_id) group_id: vec3<u32>,
  @builtin(num_workgroups) group_count: vec3<u32>,
  @builtin(local_invocation_index) lane: u32,
) {
  let word = (group_id.y * group_count.x + group_id.x) * WORKGROUP_SIZE + lane;
  let first = 2u * word;
  if (first >= params.count) {
    return;
  }
  let pair = unpack2x16float(words[word]);
  out[first] = pair.x;
  if (first + 1u < params.count) {
    out[first + 1u] = pair.y;
  }
}
