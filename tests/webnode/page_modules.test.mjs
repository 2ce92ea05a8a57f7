// The page's pure modules under node --test: the f16 twin transform, the matmul shape picker and the token
// table transpose. (The kernels they feed run through wgpu-py in test_kernels.py.)
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  MATVEC_MAX_ROWS,
  MATVEC_ROWS_ON_GPU,
  matmulGroups,
  matmulShape,
  topkWorkgroupSize,
} from "../../webnode/js/shapes.js";
import { f16Twin } from "../../webnode/js/twins.js";
import { transposeRows } from "../../webnode/js/weights.js";

test("a twin is the f32 source with f16 enabled and its Weight alias set to f16", () => {
  const source = "// header\nalias Weight = f32;\nvar<storage> w: array<Weight>;\n";
  assert.equal(f16Twin("k", source), "enable f16;\n// header\nalias Weight = f16;\nvar<storage> w: array<Weight>;\n");
});

test("a kernel without exactly one Weight alias, or one enabling f16 already, gets no twin", () => {
  assert.throws(() => f16Twin("none", "var x: f32;"), /declares "alias Weight = f32;" .* 0 times/);
  assert.throws(() => f16Twin("two", "alias Weight = f32;\nalias Weight = f32;\n"), /2 times/);
  assert.throws(() => f16Twin("comment", "// alias Weight = f32;\n"), /0 times/);
  assert.throws(() => f16Twin("enabled", "enable f16;\nalias Weight = f32;\n"), /already enables f16/);
});

test("few rows get matvec with rows spread evenly; more rows on a GPU get the block wasting fewest", () => {
  assert.deepEqual(matmulShape(1, { cpu: false }).constants, { WORKGROUP_SIZE: 64, COLUMNS: 4, ROWS: 1 });
  assert.equal(matmulShape(10, { cpu: false }).rowsPerGroup, 5);
  assert.equal(matmulShape(MATVEC_ROWS_ON_GPU, { cpu: false }).kernel, "matvec");
  const tiled = (m) => matmulShape(m, { cpu: false });
  assert.deepEqual([17, 20, 33, 40, 64, 65].map((m) => [tiled(m).kernel, tiled(m).rowsPerGroup]), [
    ["matmul", 32], ["matmul", 32], ["matmul", 16], ["matmul", 16], ["matmul", 64], ["matmul", 16],
  ]); // prettier-ignore
  for (let m = 1; m <= 300; m++) {
    const cpu = matmulShape(m, { cpu: true });
    assert.equal(cpu.kernel, "matvec");
    assert.ok(cpu.rowsPerGroup <= MATVEC_MAX_ROWS);
    assert.ok(Math.ceil(m / cpu.rowsPerGroup) * cpu.rowsPerGroup - m < Math.ceil(m / MATVEC_MAX_ROWS), `m ${m}`);
  }
  assert.deepEqual(matmulGroups(matmulShape(10, { cpu: true }), 10, 3072), [12, 2, 1]);
  assert.equal(topkWorkgroupSize({ cpu: true }), 16);
  assert.equal(topkWorkgroupSize({ cpu: false }), 256);
});

test("transposeRows moves the bits of a row range of a table into its transpose", () => {
  const rows = 70;
  const cols = 65; // past one 64 x 64 block each way
  for (const [Elements, bytes] of [[Uint16Array, 2], [Uint32Array, 4]]) {
    const table = new Elements(rows * cols).map((_, i) => i * 7 + 1);
    const raw = new Uint8Array(bytes + table.byteLength);
    raw.set(new Uint8Array(table.buffer), bytes); // an odd offset as well: the view is copied when misaligned
    for (const view of [new Uint8Array(table.buffer), raw.subarray(bytes)]) {
      const out = new Elements(transposeRows(view, bytes, cols, 3, 66).buffer);
      assert.equal(out.length, cols * 66);
      for (let row = 0; row < 66; row++) {
        for (let col = 0; col < cols; col++) assert.equal(out[col * 66 + row], table[(3 + row) * cols + col]);
      }
    }
  }
});
