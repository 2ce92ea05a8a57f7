// One GPT-2 stage on WebGPU: its weights on the GPU, a batched forward over many requests of different
// lengths through the KV caches, and on the last stage ln_f, the LM head and top-K, all in one submit.

import { KvCache } from "./cache.js";
import { ceilDiv, linearGroups } from "./kernels.js";
import { matmulGroups, matmulShape, topkWorkgroupSize } from "./shapes.js";
import { uploadWeights, weightBytes } from "./weights.js";

const MIB = 1 << 20;
const MAX_SLOTS = 64;

/**
 * @typedef {{n_layer: number, n_head: number, n_embd: number, vocab_size: number, n_positions: number,
 *   layer_norm_epsilon?: number}} Gpt2Config
 * @typedef {{slot: number, start: number, rows: number, ids?: Int32Array, hidden?: Float32Array,
 *   predicted?: boolean}} StepItem
 *   one request of a step: its KV slot, tokens already cached, new rows (token ids or activations), and
 *   whether the rows after the first are a speculative draft the last stage answers row by row
 * @typedef {{hidden?: Float32Array, values?: Float32Array, ids?: Int32Array, logits?: Float32Array}} StepOutput
 */

export class Gpt2Stage {
  /**
   * Upload a parsed shard and size the KV caches from what is left of `memoryBytes`.
   * @param {import("./kernels.js").Kernels} kernels
   * @param {{config: Gpt2Config, layer_start: number, layer_end: number, dtype: string}} manifest
   * @param {Map<string, import("./weights.js").Tensor>} tensors
   * @param {{f16: boolean, cpu: boolean, memoryBytes: number, maxBindingBytes: number, topK: number}} options
   *   cpu: a CPU (fallback) adapter, which gets matvec.wgsl for every row count (shapes.js)
   */
  constructor(kernels, manifest, tensors, { f16, cpu, memoryBytes, maxBindingBytes, topK }) {
    const config = manifest.config;
    this.kernels = kernels;
    this.device = kernels.device;
    this.start = manifest.layer_start;
    this.end = manifest.layer_end;
    this.nEmbd = config.n_embd;
    this.nHead = config.n_head;
    this.vocab = config.vocab_size;
    this.nPositions = config.n_positions;
    this.eps = config.layer_norm_epsilon ?? 1e-5;
    this.isFirst = this.start === 0;
    this.isLast = this.end === config.n_layer;
    this.half = f16 && manifest.dtype === "float16";
    this.suffix = this.half ? "_f16" : "";
    this.maxBindingBytes = maxBindingBytes;
    this.setTopK(topK);
    const headDim = this.nEmbd / this.nHead;
    this.attentionConstants = { WORKGROUP_SIZE: 64, MAX_HEAD_DIM: Math.max(128, headDim) };
    this.cpu = Boolean(cpu);
    this.topkWorkgroup = topkWorkgroupSize({ cpu: this.cpu });

    const needed = weightBytes(tensors, { half: this.half });
    if (needed > memoryBytes) {
      const [want, have] = [needed, memoryBytes].map((bytes) => (bytes / MIB).toFixed(0));
      throw new Error(`shard needs ${want} MiB of GPU memory; this device offers ${have} MiB`);
    }
    const weights = uploadWeights(kernels, tensors, { half: this.half, maxBindingBytes, nEmbd: this.nEmbd });
    this.weights = weights.buffers;
    this.table = weights.table;
    this.weightBytes = weights.bytes;
    const slotBytes = 2 * (this.end - this.start) * this.nPositions * this.nEmbd * 4;
    const bySize = Math.floor(maxBindingBytes / (this.nPositions * this.nEmbd * 4));
    const byMemory = Math.floor((memoryBytes - this.weightBytes) / 2 / slotBytes); // half of what is left
    this.cache = new KvCache(kernels, {
      layers: this.end - this.start,
      nEmbd: this.nEmbd,
      maxPositions: this.nPositions,
      maxSlots: Math.max(1, Math.min(MAX_SLOTS, bySize, byMemory)),
    });
    this.scratch = new Map(); // name -> GPUBuffer, grown on demand
    this.dummy = kernels.empty(16, "unused binding"); // topk pass 1 reads no indices, the LM head no bias
  }

  /** K of the top-K the last stage returns (0 = full logits); checked against workgroup memory. */
  setTopK(topK) {
    this.topK = Math.min(topK, this.vocab);
    this.chunk = Math.max(1024, 2 ** Math.ceil(Math.log2(Math.max(1, 2 * this.topK)))); // topk.wgsl: k <= CHUNK / 2
    const needed = 8 * this.chunk + 12 * this.topkWorkgroup;
    const have = this.device.limits.maxComputeWorkgroupStorageSize;
    if (this.isLast && this.topK > 0 && needed > have) {
      throw new Error(`top_k ${topK} needs ${needed} bytes of workgroup memory; this GPU has ${have}`);
    }
  }

  /** A scratch buffer of at least `bytes`; a bigger one replaces it (and the bind groups holding it). */
  buffer(name, bytes, usage = null) {
    let buffer = this.scratch.get(name);
    if (buffer === undefined || buffer.size < bytes) {
      buffer?.destroy();
      const size = Math.max(256, 2 ** Math.ceil(Math.log2(bytes)));
      buffer = usage === null ? this.kernels.empty(size, name) : this.device.createBuffer({ label: name, size, usage });
      this.scratch.set(name, buffer);
      this.kernels.dropBindGroups();
    }
    return buffer;
  }

  /**
   * One step: every item's rows through every layer. Resolves to one output per item: activations
   * (rows, n_embd), or on the last stage the top-K (or all logits) of the item's last row, or of each of
   * its rows when `item.predicted` (a speculative draft), row after row in one array.
   * @param {StepItem[]} items
   * @param {{read?: boolean}} options read: false only submits, reading nothing (the benchmark)
   * @returns {Promise<StepOutput[]>}
   */
  async run(items, { read = true } = {}) {
    const rows = items.reduce((total, item) => total + item.rows, 0);
    const C = this.nEmbd;
    const x = this.buffer("x", rows * C * 4);
    const rowMeta = this.buffer("row meta", rows * 8);
    const meta = new Uint32Array(rows * 2);
    let row = 0;
    for (const item of items) {
      for (let t = 0; t < item.rows; t++, row++) meta.set([item.slot, item.start + t], 2 * row);
    }
    this.device.queue.writeBuffer(rowMeta, 0, meta);
    const encoder = this.device.createCommandEncoder({ label: "step" });
    let pass = encoder.beginComputePass();
    if (this.isFirst) this.embed(pass, items, rows, x, rowMeta);
    else this.device.queue.writeBuffer(x, 0, concat(items.map((item) => item.hidden), rows * C));
    const params = this.blockParams(rows);
    for (let layer = 0; layer < this.end - this.start; layer++) this.block(pass, layer, rows, x, rowMeta, params);
    if (!this.isLast) {
      pass.end();
      const data = await this.submit(encoder, read ? [[x, rows * C * 4]] : []);
      if (!read) return [];
      const hidden = new Float32Array(data);
      let offset = 0;
      return items.map((item) => ({ hidden: hidden.subarray(offset, (offset += item.rows * C)) }));
    }
    const answered = items.map((item) => (item.predicted ? item.rows : 1)); // rows through the LM head
    const m = answered.reduce((total, count) => total + count, 0);
    let last = x;
    if (m !== rows) {
      pass.end();
      last = this.buffer("last rows", m * C * 4);
      let [end, at] = [0, 0];
      items.forEach((item, index) => {
        end += item.rows;
        const count = answered[index];
        encoder.copyBufferToBuffer(x, (end - count) * C * 4, last, at * C * 4, count * C * 4);
        at += count;
      });
      pass = encoder.beginComputePass();
    }
    const outputs = await this.head(encoder, pass, last, m, read);
    if (!read || m === items.length) return outputs;
    let at = 0;
    return answered.map((count) => joinRows(outputs.slice(at, (at += count))));
  }

  embed(pass, items, rows, x, rowMeta) {
    const ids = new Uint32Array(rows);
    let row = 0;
    for (const item of items) for (const id of item.ids) ids[row++] = id;
    const idBuffer = this.buffer("ids", rows * 4);
    this.device.queue.writeBuffer(idBuffer, 0, ids);
    const wpe = this.weights.get("wpe.weight");
    for (const [index, piece] of this.table.entries()) {
      const fields = [rows, this.nEmbd, piece.start, piece.count, this.nPositions];
      const params = this.kernels.params(`embedding ${index}`, fields);
      const buffers = [params, idBuffer, rowMeta, piece.buffer, wpe, x];
      this.kernels.dispatch(pass, `embedding${this.suffix}`, {}, buffers, [ceilDiv(this.nEmbd, 64), rows, 1]);
    }
  }

  /** The uniforms and scratch buffers of a block for `rows` rows: the same in every layer of a step. */
  blockParams(rows) {
    const k = this.kernels;
    const C = this.nEmbd;
    const matmul = (inner, outer) => k.params(`matmul ${inner}x${outer}`, [rows, inner, outer, outer, 0]);
    return {
      shape: matmulShape(rows, { cpu: this.cpu }),
      norm: k.params("layernorm", [rows, C, { f32: this.eps }]),
      attention: k.params("attention", [rows, C, this.nHead, this.nPositions, this.cache.slots]),
      add: k.params("add", [rows * C]),
      matmul: { attn: matmul(C, 3 * C), proj: matmul(C, C), fc: matmul(C, 4 * C), out: matmul(4 * C, C) },
      h: this.buffer("h", rows * C * 4),
      qkv: this.buffer("qkv", rows * 3 * C * 4),
      attended: this.buffer("attended", rows * C * 4),
      projected: this.buffer("projected", rows * C * 4),
      hidden: this.buffer("mlp hidden", rows * 4 * C * 4),
    };
  }

  /** One transformer block on the residual stream x (rows, C), in place; docs/webnode-kernels.md. */
  block(pass, layer, rows, x, rowMeta, params) {
    const k = this.kernels;
    const C = this.nEmbd;
    const w = (name) => this.weights.get(`h.${this.start + layer}.${name}`);
    const { shape, norm, attention, add, matmul, h, qkv, attended, projected, hidden } = params;
    const { k: kCache, v: vCache } = this.cache.buffers[layer];
    const addGroups = linearGroups(ceilDiv(rows * C, 256));
    const linear = (input, name, uniform, outer, out, activation = 0) => {
      const constants = { ...shape.constants, ACTIVATION: activation };
      const buffers = [uniform, input, w(`${name}.weight`), w(`${name}.bias`), out];
      k.dispatch(pass, shape.kernel + this.suffix, constants, buffers, matmulGroups(shape, rows, outer));
    };
    k.dispatch(pass, "layernorm", {}, [norm, x, w("ln_1.weight"), w("ln_1.bias"), h], [rows, 1, 1]);
    linear(h, "attn.c_attn", matmul.attn, 3 * C, qkv);
    k.dispatch(pass, "kv_append", {}, [attention, qkv, rowMeta, kCache, vCache], [ceilDiv(C, 64), rows, 1]);
    const attentionBuffers = [attention, qkv, rowMeta, kCache, vCache, attended];
    k.dispatch(pass, "attention", this.attentionConstants, attentionBuffers, [this.nHead, rows, 1]);
    linear(attended, "attn.c_proj", matmul.proj, C, projected);
    k.dispatch(pass, "add", {}, [add, x, projected], addGroups);
    k.dispatch(pass, "layernorm", {}, [norm, x, w("ln_2.weight"), w("ln_2.bias"), h], [rows, 1, 1]);
    linear(h, "mlp.c_fc", matmul.fc, 4 * C, hidden, 1);
    linear(hidden, "mlp.c_proj", matmul.out, C, projected);
    k.dispatch(pass, "add", {}, [add, x, projected], addGroups);
  }

  /** ln_f, the tied LM head (a matmul without bias per transposed wte piece) and the top-K passes over m rows. */
  async head(encoder, pass, last, m, read) {
    const k = this.kernels;
    const C = this.nEmbd;
    const V = this.vocab;
    const normed = this.buffer("normed", m * C * 4);
    const norm = k.params("layernorm ln_f", [m, C, { f32: this.eps }]);
    const lnF = [this.weights.get("ln_f.weight"), this.weights.get("ln_f.bias")];
    k.dispatch(pass, "layernorm", {}, [norm, last, ...lnF, normed], [m, 1, 1]);
    const logits = this.buffer("logits", m * V * 4);
    const shape = matmulShape(m, { cpu: this.cpu });
    const constants = { ...shape.constants, BIAS: 0 };
    for (const [index, piece] of this.table.entries()) {
      const params = k.params(`lm_head ${index}`, [m, C, piece.count, V, piece.start]);
      const buffers = [params, normed, piece.buffer, this.dummy, logits]; // no bias: any buffer at binding 3
      k.dispatch(pass, shape.kernel + this.suffix, constants, buffers, matmulGroups(shape, m, piece.count));
    }
    if (this.topK === 0) {
      pass.end();
      const data = await this.submit(encoder, read ? [[logits, m * V * 4]] : []);
      return read ? split(new Float32Array(data), m, V).map((row) => ({ logits: row })) : [];
    }
    const K = this.topK;
    let [values, indices, n, indexed] = [logits, this.dummy, V, false];
    for (let round = 0; ; round++) {
      const chunks = ceilDiv(n, this.chunk);
      const outValues = this.buffer(`topk values ${round % 2}`, m * chunks * K * 4);
      const outIndices = this.buffer(`topk indices ${round % 2}`, m * chunks * K * 4);
      const params = k.params(`topk ${round}`, [m, n, K]);
      const constants = { WORKGROUP_SIZE: this.topkWorkgroup, CHUNK: this.chunk, INDEXED: indexed };
      k.dispatch(pass, "topk", constants, [params, values, indices, outValues, outIndices], [chunks, m, 1]);
      if (chunks === 1) {
        pass.end();
        const data = await this.submit(encoder, read ? [[outValues, m * K * 4], [outIndices, m * K * 4]] : []);
        if (!read) return [];
        const topValues = split(new Float32Array(data, 0, m * K), m, K);
        const topIds = split(new Int32Array(data, m * K * 4, m * K), m, K); // u32 ids < 2**31
        return topValues.map((row, index) => ({ values: row, ids: topIds[index] }));
      }
      [values, indices, n, indexed] = [outValues, outIndices, chunks * K, true];
    }
  }

  /** Submit, copy `reads` ([buffer, bytes] pairs) back in one mapping; an ArrayBuffer of them in order. */
  async submit(encoder, reads) {
    const total = reads.reduce((sum, [, bytes]) => sum + bytes, 0);
    if (total === 0) {
      this.device.queue.submit([encoder.finish()]); // nothing to read: the caller waits when it needs to
      return new ArrayBuffer(0);
    }
    const staging = this.buffer("read back", total, GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST);
    let offset = 0;
    for (const [buffer, bytes] of reads) {
      encoder.copyBufferToBuffer(buffer, 0, staging, offset, bytes);
      offset += bytes;
    }
    this.device.queue.submit([encoder.finish()]);
    await staging.mapAsync(GPUMapMode.READ, 0, total);
    const data = staging.getMappedRange(0, total).slice(0);
    staging.unmap();
    return data;
  }

  destroy() {
    for (const buffer of this.weights.values()) buffer.destroy();
    for (const piece of this.table ?? []) piece.buffer.destroy();
    for (const buffer of this.scratch.values()) buffer.destroy();
    this.dummy.destroy();
    this.cache.destroyBuffers();
    this.kernels.dropBindGroups();
  }
}

/** Typed arrays of one kind back to back (the first itself when alone). */
function concat(arrays, length = arrays.reduce((total, array) => total + array.length, 0)) {
  if (arrays.length === 1) return arrays[0];
  const out = new arrays[0].constructor(length);
  let offset = 0;
  for (const array of arrays) {
    out.set(array, offset);
    offset += array.length;
  }
  return out;
}

/** Head outputs of consecutive rows as one output, each array row after row. */
function joinRows(outputs) {
  if (outputs.length === 1) return outputs[0];
  const join = (key) => concat(outputs.map((output) => output[key]));
  return outputs[0].logits ? { logits: join("logits") } : { values: join("values"), ids: join("ids") };
}

function split(array, rows, cols) {
  return Array.from({ length: rows }, (_, row) => array.subarray(row * cols, (row + 1) * cols));
}
