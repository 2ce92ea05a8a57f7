// The WGSL kernels of webnode/kernels/: fetched once (their shader-f16 twins generated from them), a pipeline
// per (kernel, override constants), uniform params buffers, cached bind groups and the dispatch helper.

import { f16Twins } from "./twins.js";

export const KERNEL_FILES = [
  "embedding",
  "layernorm",
  "matmul",
  "matvec",
  "kv_append",
  "attention",
  "add",
  "topk",
  "unpack_f16",
];
/** Usage of every storage buffer: bindable, written by the queue, copied out for read-back. */
export const storageUsage = () => GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;

/** ceil(a / b) for positive integers. */
export const ceilDiv = (a, b) => Math.floor((a + b - 1) / b);

/** A 1D workgroup count as (x, y, 1) under the per-dimension limit (add.wgsl, unpack_f16.wgsl fold it). */
export function linearGroups(groups, limit = 65535) {
  return [Math.min(groups, limit), ceilDiv(groups, limit), 1];
}

/** A u32 field is a number; an f32 field is written as {f32: value}. */
function paramsWords(fields) {
  const words = new Uint32Array(Math.max(4, ceilDiv(fields.length, 4) * 4));
  const floats = new Float32Array(words.buffer);
  fields.forEach((field, index) => {
    if (typeof field === "object") floats[index] = field.f32;
    else words[index] = field;
  });
  return words;
}

export class Kernels {
  /**
   * Fetch the kernel sources next to this module (../kernels/<name>.wgsl) and compile their modules.
   * @param {GPUDevice} device
   * @param {{f16?: boolean, baseUrl?: URL}} options f16 also compiles the shader-f16 twins (twins.js)
   */
  static async load(device, { f16 = false, baseUrl = new URL("../kernels/", import.meta.url) } = {}) {
    const fetched = await Promise.all(
      KERNEL_FILES.map(async (name) => {
        const response = await fetch(new URL(`${name}.wgsl`, baseUrl));
        if (!response.ok) throw new Error(`kernel ${name}.wgsl: HTTP ${response.status} ${response.statusText}`);
        return [name, await response.text()];
      }),
    );
    const sources = new Map(fetched);
    if (f16) for (const [name, code] of f16Twins(sources)) sources.set(name, code);
    return new Kernels(device, sources);
  }

  constructor(device, sources) {
    this.device = device;
    this.modules = new Map();
    for (const [name, code] of sources) this.modules.set(name, device.createShaderModule({ label: name, code }));
    this.pipelines = new Map(); // "name|constants" -> GPUComputePipeline
    this.uniforms = new Map(); // key -> GPUBuffer
    this.bindGroups = new Map(); // "pipeline|buffers" -> GPUBindGroup
    this.ids = new WeakMap(); // object -> small integer, for cache keys
    this.nextId = 1;
  }

  idOf(object) {
    if (!this.ids.has(object)) this.ids.set(object, this.nextId++);
    return this.ids.get(object);
  }

  /** The pipeline of <name>.wgsl (entry point main) with these override constants, built once. */
  pipeline(name, constants = {}) {
    const entries = Object.entries(constants).sort(([a], [b]) => (a < b ? -1 : 1));
    const key = `${name}|${entries.map(([k, v]) => `${k}=${Number(v)}`).join(",")}`;
    let pipeline = this.pipelines.get(key);
    if (pipeline === undefined) {
      const module = this.modules.get(name);
      if (!module) throw new Error(`kernel ${name}.wgsl was not loaded`);
      const numeric = Object.fromEntries(entries.map(([k, v]) => [k, Number(v)]));
      pipeline = this.device.createComputePipeline({
        label: key,
        layout: "auto",
        compute: { module, entryPoint: "main", constants: numeric },
      });
      this.pipelines.set(key, pipeline);
    }
    return pipeline;
  }

  /**
   * The uniform buffer named `key`, holding `fields` now (queue order: before the next submit).
   * One buffer per kernel and shape of a step serves every layer (the params are the same in each).
   */
  params(key, fields) {
    const words = paramsWords(fields);
    let buffer = this.uniforms.get(key);
    if (buffer === undefined || buffer.size < words.byteLength) {
      buffer = this.device.createBuffer({
        label: `params ${key}`,
        size: words.byteLength,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
      this.uniforms.set(key, buffer);
    }
    this.device.queue.writeBuffer(buffer, 0, words);
    return buffer;
  }

  /** A bind group of whole buffers at bindings 0..n-1, cached while those buffers live. */
  bindGroup(pipeline, buffers) {
    const key = `${this.idOf(pipeline)}|${buffers.map((buffer) => this.idOf(buffer)).join(",")}`;
    let group = this.bindGroups.get(key);
    if (group === undefined) {
      group = this.device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
      });
      this.bindGroups.set(key, group);
    }
    return group;
  }

  /** Forget bind groups (call after destroying buffers they hold). */
  dropBindGroups() {
    this.bindGroups.clear();
  }

  /**
   * One dispatch in an open compute pass.
   * @param {GPUComputePassEncoder} pass
   * @param {string} name kernel file without .wgsl
   * @param {Record<string, number|boolean>} constants override constants
   * @param {GPUBuffer[]} buffers binding i = buffers[i]; binding 0 is the params uniform
   * @param {number[]} groups workgroup counts [x, y, z]
   */
  dispatch(pass, name, constants, buffers, groups) {
    const pipeline = this.pipeline(name, constants);
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, this.bindGroup(pipeline, buffers));
    pass.dispatchWorkgroups(...groups);
  }

  /** A storage buffer holding `data` (a typed array; padded to a multiple of 4 bytes, at least 16). */
  upload(data, label = "") {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const size = Math.max(16, ceilDiv(bytes.length, 4) * 4);
    const buffer = this.device.createBuffer({ label, size, usage: storageUsage(), mappedAtCreation: true });
    new Uint8Array(buffer.getMappedRange()).set(bytes);
    buffer.unmap();
    return buffer;
  }

  /** A zero-filled storage buffer of `bytes` bytes (rounded up to a multiple of 4, at least 16). */
  empty(bytes, label = "") {
    return this.device.createBuffer({ label, size: Math.max(16, ceilDiv(bytes, 4) * 4), usage: storageUsage() });
  }
}
