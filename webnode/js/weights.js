// Shard tensors onto the GPU: f32 as stored; f16 unpacked to f32 by unpack_f16.wgsl, or kept f16 for the
// shader-f16 kernels; the token table (wte) transposed, in pieces of whole tokens that each fit one binding.

import { ceilDiv, linearGroups } from "./kernels.js";

// Conv1D matrices and embedding tables: what the *_f16 kernels read as f16 (vectors stay f32).
const HALF_CAPABLE = [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"];
const TABLES = ["wte.weight", "wpe.weight"];

/**
 * @typedef {{dtype: "F16"|"F32", shape: number[], bytes: Uint8Array}} Tensor  one tensor of a parsed shard
 * @typedef {{start: number, count: number, buffer: GPUBuffer}} TablePiece  tokens [start, start + count) of
 *   wte, transposed: (n_embd, count), so the LM head is a plain matmul of the final rows with it
 */

const TRANSPOSE_BLOCK = 64; // 64 x 64 elements at a time: both sides of the copy stay in the CPU's cache

/** Whether `name` is read as f16 by the shader-f16 kernels. */
export function isHalfCapable(name) {
  return TABLES.includes(name) || HALF_CAPABLE.some((suffix) => name.endsWith(suffix));
}

/**
 * Upload every tensor but wte; wte goes up in pieces (see uploadTable).
 * @param {import("./kernels.js").Kernels} kernels
 * @param {Map<string, Tensor>} tensors
 * @param {{half: boolean, maxBindingBytes: number, nEmbd: number}} options half: keep matrices f16
 * @returns {{buffers: Map<string, GPUBuffer>, table: TablePiece[] | null, bytes: number}}
 */
export function uploadWeights(kernels, tensors, { half, maxBindingBytes, nEmbd }) {
  const buffers = new Map();
  let bytes = 0;
  for (const [name, tensor] of tensors) {
    if (name === "wte.weight") continue;
    const buffer = uploadTensor(kernels, name, tensor, half && isHalfCapable(name));
    buffers.set(name, buffer);
    bytes += buffer.size;
  }
  let table = null;
  const wte = tensors.get("wte.weight");
  if (wte) {
    table = uploadTable(kernels, wte, { half, maxBindingBytes, nEmbd });
    bytes += table.reduce((total, piece) => total + piece.buffer.size, 0);
  }
  kernels.dropBindGroups(); // the unpack dispatches' groups hold freed f16 staging buffers
  return { buffers, table, bytes };
}

/** GPU bytes the weights will take: f32 for everything unless half keeps the matrices and tables f16. */
export function weightBytes(tensors, { half }) {
  let total = 0;
  for (const [name, tensor] of tensors) {
    const count = tensor.shape.reduce((a, b) => a * b, 1);
    total += count * (half && tensor.dtype === "F16" && isHalfCapable(name) ? 2 : 4);
  }
  return total;
}

function uploadTensor(kernels, name, tensor, keepHalf) {
  if (tensor.dtype === "F32" || keepHalf) return kernels.upload(tensor.bytes, name);
  return unpackHalf(kernels, tensor.bytes, name);
}

/** f16 bits -> a new f32 buffer, on the GPU (unpack_f16.wgsl); the f16 staging buffer is freed. */
function unpackHalf(kernels, bytes, label) {
  const count = bytes.length / 2;
  const words = kernels.upload(bytes, `${label} (f16)`);
  const out = kernels.empty(count * 4, label);
  const params = kernels.params("unpack_f16", [count]);
  const encoder = kernels.device.createCommandEncoder({ label: `unpack ${label}` });
  const pass = encoder.beginComputePass();
  kernels.dispatch(pass, "unpack_f16", {}, [params, words, out], linearGroups(ceilDiv(ceilDiv(count, 2), 256)));
  pass.end();
  kernels.device.queue.submit([encoder.finish()]);
  words.destroy(); // freed once the submitted unpack has run
  return out;
}

/**
 * The token table as transposed pieces of whole tokens, each at most maxBindingBytes on the GPU;
 * embedding.wgsl (vocab_start, vocab_count) and the LM head's matmul (out_offset) take a dispatch per piece.
 * @returns {TablePiece[]}
 */
export function uploadTable(kernels, tensor, { half, maxBindingBytes, nEmbd }) {
  const [rows] = tensor.shape;
  const keepHalf = half && tensor.dtype === "F16";
  const stored = tensor.dtype === "F16" ? 2 : 4; // bytes per element in the shard
  const onGpu = keepHalf ? 2 : 4;
  const rowsPerPiece = Math.max(1, Math.floor(maxBindingBytes / (nEmbd * onGpu)));
  const pieces = [];
  for (let start = 0; start < rows; start += rowsPerPiece) {
    const count = Math.min(rowsPerPiece, rows - start);
    const bytes = transposeRows(tensor.bytes, stored, nEmbd, start, count);
    const label = `wte tokens ${start}-${start + count}, transposed`;
    const buffer = stored === 4 || keepHalf ? kernels.upload(bytes, label) : unpackHalf(kernels, bytes, label);
    pieces.push({ start, count, buffer });
  }
  return pieces;
}

/**
 * Rows [start, start + count) of a row-major (rows, cols) table of `elementBytes`-byte elements, as the bytes
 * of its (cols, count) transpose. Bit patterns are moved, never converted.
 * @param {Uint8Array} bytes the whole table
 * @returns {Uint8Array}
 */
export function transposeRows(bytes, elementBytes, cols, start, count) {
  const Elements = elementBytes === 2 ? Uint16Array : Uint32Array;
  const aligned = bytes.byteOffset % elementBytes === 0 ? bytes : bytes.slice(); // a copy starts at offset 0
  const source = new Elements(aligned.buffer, aligned.byteOffset, aligned.byteLength / elementBytes);
  const out = new Elements(cols * count);
  for (let row0 = 0; row0 < count; row0 += TRANSPOSE_BLOCK) {
    const row1 = Math.min(row0 + TRANSPOSE_BLOCK, count);
    for (let col0 = 0; col0 < cols; col0 += TRANSPOSE_BLOCK) {
      const col1 = Math.min(col0 + TRANSPOSE_BLOCK, cols);
      for (let row = row0; row < row1; row++) {
        const from = (start + row) * cols;
        for (let col = col0; col < col1; col++) out[col * count + row] = source[from + col];
      }
    }
  }
  return new Uint8Array(out.buffer);
}
