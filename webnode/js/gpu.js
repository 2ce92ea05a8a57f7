// WebGPU start-up: adapter and device with the limits the kernels need, the memory probe, loss and error reports.

/** No usable WebGPU in this browser: the page says so and does not join. */
export class WebGpuUnavailable extends Error {
  constructor(message) {
    super(message);
    this.name = "WebGpuUnavailable";
  }
}

// Limits requested at the adapter's maximum: larger buffers let GPT-2's wte (154 MB in f32) bind whole.
const RAISED_LIMITS = [
  "maxBufferSize",
  "maxStorageBufferBindingSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxStorageBuffersPerShaderStage",
];

// What the kernels' default overrides need (docs/webnode-kernels.md, "Limits to check").
const REQUIRED_LIMITS = {
  maxComputeInvocationsPerWorkgroup: 256,
  maxComputeWorkgroupSizeX: 256,
  maxComputeWorkgroupStorageSize: 16384,
  maxStorageBuffersPerShaderStage: 5,
  maxComputeWorkgroupsPerDimension: 65535,
  maxStorageBufferBindingSize: 16 << 20,
};

const MIB = 1 << 20;

/**
 * The adapter and a device for the kernels.
 * @param {{forceF32?: boolean}} options forceF32 ignores shader-f16 (weights are unpacked to f32)
 * @returns {Promise<{adapter: GPUAdapter, device: GPUDevice, f16: boolean, cpu: boolean, description: string,
 *   limits: Record<string, number>, closing: boolean}>} cpu: a fallback (CPU) adapter such as SwiftShader
 */
export async function openGpu({ forceF32 = false } = {}) {
  if (!globalThis.navigator?.gpu) {
    const secure = globalThis.isSecureContext ? "" : " (this page is not a secure context: use https or localhost)";
    throw new WebGpuUnavailable(`This browser has no WebGPU: navigator.gpu is missing${secure}.`);
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new WebGpuUnavailable("WebGPU is present but offers no GPU adapter (disabled or blocklisted GPU).");
  }
  const f16 = !forceF32 && adapter.features.has("shader-f16");
  const requiredLimits = {};
  for (const name of RAISED_LIMITS) requiredLimits[name] = adapter.limits[name];
  const device = await adapter.requestDevice({ requiredFeatures: f16 ? ["shader-f16"] : [], requiredLimits });
  checkLimits(device.limits);
  const limits = {};
  for (const name of [...RAISED_LIMITS, "maxComputeWorkgroupsPerDimension", "minStorageBufferOffsetAlignment"]) {
    limits[name] = device.limits[name];
  }
  const cpu = Boolean(adapter.info?.isFallbackAdapter ?? adapter.isFallbackAdapter);
  return { adapter, device, f16, cpu, description: describeAdapter(adapter), limits, closing: false };
}

/** Throws WebGpuUnavailable naming every limit below what the kernels need. */
export function checkLimits(limits) {
  const short = Object.entries(REQUIRED_LIMITS)
    .filter(([name, needed]) => limits[name] < needed)
    .map(([name, needed]) => `${name} ${limits[name]} < ${needed}`);
  if (short.length) throw new WebGpuUnavailable(`this GPU's WebGPU limits are too small: ${short.join(", ")}`);
}

/** "vendor architecture device (description)", whatever the browser reveals; at most 256 characters. */
export function describeAdapter(adapter) {
  const info = adapter.info ?? {};
  const parts = [info.vendor, info.architecture, info.device].filter(Boolean);
  if (info.description) parts.push(`(${info.description})`);
  const text = parts.join(" ") || "unknown WebGPU adapter";
  return `WebGPU ${text}`.slice(0, 256);
}

/**
 * How much the device lets us allocate: the largest single buffer, halving from maxBufferSize until one
 * succeeds, then more buffers of that size (halving again on failure) until capBytes; all freed again.
 * @returns {Promise<{totalBytes: number, largestBufferBytes: number}>}
 */
export async function probeMemory(device, { capBytes = 2048 * MIB, minBytes = 16 * MIB } = {}) {
  let size = Math.min(device.limits.maxBufferSize, capBytes);
  size -= size % 4;
  const held = [];
  let total = 0;
  let largest = 0;
  try {
    while (size >= minBytes && total < capBytes) {
      const buffer = await tryAllocate(device, Math.min(size, capBytes - total));
      if (buffer === null) {
        size = Math.floor(size / 8) * 4; // half, kept a multiple of 4
        continue;
      }
      held.push(buffer);
      total += buffer.size;
      largest = Math.max(largest, buffer.size);
    }
  } finally {
    for (const buffer of held) buffer.destroy();
  }
  return { totalBytes: total, largestBufferBytes: largest };
}

async function tryAllocate(device, size) {
  device.pushErrorScope("out-of-memory");
  device.pushErrorScope("validation");
  const buffer = device.createBuffer({ size, usage: GPUBufferUsage.STORAGE });
  const [invalid, outOfMemory] = [await device.popErrorScope(), await device.popErrorScope()];
  if (invalid || outOfMemory) {
    buffer.destroy();
    return null;
  }
  return buffer;
}

/**
 * Calls onFatal(message) once when the device is lost or raises an error nobody captured. Neither is
 * swallowed: the caller reports it to the gateway and leaves. A loss we caused (gpu.closing) is quiet.
 */
export function watchDevice(gpu, onFatal) {
  let reported = false;
  const report = (message) => {
    if (reported) return;
    reported = true;
    onFatal(message);
  };
  gpu.device.lost.then((info) => {
    if (!gpu.closing) report(`GPU device lost (${info.reason ?? "unknown"}): ${info.message || "no details"}`);
  });
  gpu.device.addEventListener("uncapturederror", (event) => {
    const error = event.error;
    report(`uncaptured GPU error (${error?.constructor?.name ?? "GPUError"}): ${error?.message ?? error}`);
  });
}

/** Runs `body` inside validation + out-of-memory error scopes; a GPU error becomes a thrown Error. */
export async function withErrorScopes(device, what, body) {
  device.pushErrorScope("out-of-memory");
  device.pushErrorScope("validation");
  let result;
  let thrown = null;
  try {
    result = await body();
  } catch (error) {
    thrown = error;
  }
  const invalid = await device.popErrorScope();
  const outOfMemory = await device.popErrorScope();
  if (thrown) throw thrown;
  const error = outOfMemory ?? invalid;
  if (error) {
    throw new Error(`${what}: ${outOfMemory ? "out of GPU memory" : "GPU validation error"}: ${error.message}`);
  }
  return result;
}
