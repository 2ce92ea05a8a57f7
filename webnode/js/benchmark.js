// Start-up benchmark: GPT-2 124M-sized layer decode passes per second, the unit services/node/benchmark.py
// reports and placement weighs nodes by (one block, one token over a 32-token KV cache; no head).

import { f32ToF16Bits } from "../syn1.js";
import { Gpt2Stage } from "./model.js";

// One layer of GPT-2 124M, as the middle stage [1, 2) of a 3-layer model: activations in and out.
// A slow GPU stops after BUDGET_MS (but not before MIN_STEPS steps) instead of running all 16 steps.
const MIN_STEPS = 4;
const BUDGET_MS = 2000;
const CONFIG = { n_layer: 3, n_head: 12, n_embd: 768, vocab_size: 1, n_positions: 128, layer_norm_epsilon: 1e-5 };

/**
 * Layer forward passes per second for single-token decode over a `context`-token cache.
 * @param {import("./kernels.js").Kernels} kernels
 * @param {{f16: boolean, cpu: boolean, memoryBytes: number, maxBindingBytes: number}} gpu
 */
export async function measureSpeed(kernels, gpu, { steps = 16, context = 32 } = {}) {
  const { f16 } = gpu;
  const tensors = randomLayer(1, CONFIG.n_embd, f16);
  const manifest = { config: CONFIG, layer_start: 1, layer_end: 2, dtype: f16 ? "float16" : "float32" };
  const stage = new Gpt2Stage(kernels, manifest, tensors, { ...gpu, topK: 0 });
  try {
    // Decode steps at positions context, context + 1, ...: attention reads that many cached keys. What the
    // cache holds does not change the time, so slot 0 is used as it is, without a prefill.
    const hidden = new Float32Array(CONFIG.n_embd).map((_, i) => Math.sin(i));
    const step = (position) => stage.run([{ slot: 0, start: position, rows: 1, hidden }], { read: false });
    await step(context); // warm-up: builds the decode pipelines
    await kernels.device.queue.onSubmittedWorkDone();
    const started = performance.now();
    let done = 0;
    while (done < steps && (done < MIN_STEPS || performance.now() - started < BUDGET_MS)) {
      await step(context + 1 + done);
      done++;
      if (done % 4 === 0) await kernels.device.queue.onSubmittedWorkDone(); // keep the queue short
    }
    await kernels.device.queue.onSubmittedWorkDone();
    return (done * 1000) / (performance.now() - started);
  } finally {
    stage.destroy();
  }
}

/** Tensors of layer `layer` with values like a trained model's scale (1/sqrt(fan_in)); any will do. */
function randomLayer(layer, C, f16) {
  let seed = 12345;
  const random = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  const shapes = {
    "ln_1.weight": [C], "ln_1.bias": [C], "attn.c_attn.weight": [C, 3 * C], "attn.c_attn.bias": [3 * C],
    "attn.c_proj.weight": [C, C], "attn.c_proj.bias": [C], "ln_2.weight": [C], "ln_2.bias": [C],
    "mlp.c_fc.weight": [C, 4 * C], "mlp.c_fc.bias": [4 * C], "mlp.c_proj.weight": [4 * C, C], "mlp.c_proj.bias": [C],
  };
  const tensors = new Map();
  for (const [name, shape] of Object.entries(shapes)) {
    const count = shape.reduce((a, b) => a * b, 1);
    const scale = shape.length === 2 ? 1 / Math.sqrt(shape[0]) : 0.1;
    const offset = name.startsWith("ln") && name.endsWith("weight") ? 1 : 0; // LayerNorm gains near 1
    const values = new Float32Array(count).map(() => random() * scale + offset);
    const data = f16 ? f32ToF16Bits(values) : values;
    tensors.set(`h.${layer}.${name}`, { dtype: f16 ? "F16" : "F32", shape, bytes: new Uint8Array(data.buffer) });
  }
  return tensors;
}
