// Residual add in place: residual[i] += addend[i] (the residual stream plus attn.c_proj or mlp.c_proj).
//
// Bindings, group 0:
//   0  uniform             params   AddParams (below), 16 bytes
//   1  storage, read_write residual   array<f32> (count,)   the residual stream, updated in place
//   2  storage, read       addend   array<f32> (count,)   a different buffer from residual
// Overrides: WORKGROUP_SIZE (default 256).
// Dispatch: groups = ceil(count / WORKGROUP_SIZE) as (min(groups, 65535), ceil(groups / 65535), 1).

struct AddParams {
  count: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

override WORKGROUP_SIZE: u32 = 256u;

@group(0) @binding(0) var<uniform> params: AddParams;
@group(0) @binding(1) var<storage, read_write> residual: array<f32>;
@group(0) @binding(2) var<storage, read> addend: array<f32>;

@compute @workgroup_size(WORKGROUP_SIZE)
fn main(
  @builtin(workgroup_id) group_id: vec3<u32>,
  @builtin(num_workgroups) group_count: vec3<u32>,
  @builtin(local_invocation_index) lane: u32,
) {
  let i = (group_id.y * group_count.x + group_id.x) * WORKGROUP_SIZE + lane;
  if (i < params.count) {
    residual[i] = residual[i] + addend[i];
  }
}
