// Entry point: check WebGPU, load the kernels, probe memory, run the speed benchmark, then join the gateway.
//
// Query parameters (all optional): gateway=<ws(s) URL>, node_id=<id>, join_token=<token from `synapse token`,
// when the gateway asks for one>, speed=<layer passes/s> (skips the benchmark), memory_mib=<cap on the memory
// probe>, max_binding_mib=<smaller storage bindings, to test the piecewise token table>, f16=off (ignore
// shader-f16), cpu=0|1 (treat the adapter as a GPU or as a CPU when picking matmul kernels and blocks,
// js/shapes.js; detected from adapter.info.isFallbackAdapter otherwise).

import { measureSpeed } from "./benchmark.js";
import { gatewayUrl } from "./connection.js";
import { openGpu, probeMemory, watchDevice, WebGpuUnavailable } from "./gpu.js";
import { Kernels } from "./kernels.js";
import { WebNode } from "./node.js";
import * as ui from "./ui.js";

const MIB = 1 << 20;
const DEFAULT_PROBE_CAP_MIB = 2048;
const query = new URLSearchParams(location.search);

/** ?node_id=, else one id per tab kept in sessionStorage: stable across reloads, distinct between tabs. */
function nodeId() {
  const given = query.get("node_id");
  if (given) return given;
  let id = sessionStorage.getItem("synapse-node-id");
  if (!id) {
    const random = crypto.getRandomValues(new Uint8Array(4));
    id = `web-${Array.from(random, (byte) => byte.toString(16).padStart(2, "0")).join("")}`;
    sessionStorage.setItem("synapse-node-id", id);
  }
  return id;
}

/**
 * ?join_token=, kept for this tab so a reload still joins, and taken out of the address bar so that
 * copying the page's URL does not hand the token on.
 */
function joinToken() {
  const given = query.get("join_token");
  if (given) {
    sessionStorage.setItem("synapse-join-token", given);
    const shown = new URL(location.href);
    shown.searchParams.delete("join_token");
    history.replaceState(history.state, "", shown);
  }
  return given ?? sessionStorage.getItem("synapse-join-token") ?? "";
}

function positiveNumber(name) {
  const value = Number(query.get(name));
  return query.has(name) && Number.isFinite(value) && value > 0 ? value : null;
}

async function boot() {
  ui.init();
  const url = gatewayUrl(location);
  const id = nodeId();
  ui.update({ gateway: url, nodeId: id });
  let gpu;
  try {
    gpu = await openGpu({ forceF32: query.get("f16") === "off" });
  } catch (error) {
    if (!(error instanceof WebGpuUnavailable)) throw error;
    ui.showError(`${error.message} This page does not join the gateway.`, "unsupported");
    return;
  }
  if (query.has("cpu")) gpu.cpu = query.get("cpu") === "1";
  Object.defineProperty(ui.status, "gpu", { value: gpu, enumerable: false }); // for diagnostics, not JSON
  ui.update({ device: gpu.description, f16: gpu.f16, cpu: gpu.cpu, limits: gpu.limits });
  let node = null;
  let failed = false; // a GPU failure before the node exists: it never joins
  watchDevice(gpu, (message) => {
    failed = true;
    if (node) node.fatal(message);
    else ui.showError(message, "error");
  });
  const kernels = await Kernels.load(gpu.device, { f16: gpu.f16 });
  const capMib = positiveNumber("memory_mib") ?? DEFAULT_PROBE_CAP_MIB;
  const probe = await probeMemory(gpu.device, { capBytes: capMib * MIB, minBytes: Math.min(16, capMib) * MIB });
  if (probe.totalBytes === 0) throw new Error("the GPU would not allocate even a 16 MiB buffer");
  const limits = gpu.device.limits;
  const maxBindingBytes = Math.min(
    limits.maxStorageBufferBindingSize,
    limits.maxBufferSize,
    probe.largestBufferBytes,
    (positiveNumber("max_binding_mib") ?? Infinity) * MIB,
  );
  ui.update({ memoryBytes: probe.totalBytes });
  const sizes = { f16: gpu.f16, cpu: gpu.cpu, memoryBytes: probe.totalBytes, maxBindingBytes };
  const speed = positiveNumber("speed") ?? (await measureSpeed(kernels, sizes));
  ui.update({ speed });
  if (failed) return;
  const options = { gpu, kernels, nodeId: id, url, memoryBytes: probe.totalBytes, speed, maxBindingBytes };
  node = new WebNode({ ...options, joinToken: joinToken() });
  node.start();
}

boot().catch((error) => ui.showError(`start-up failed: ${error.message}`, "error"));
