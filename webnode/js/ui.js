// The status view and window.synapse: one state object, rendered into the page at most once a frame.

const MIB = 1 << 20;

/**
 * The node's state, also window.synapse for tests and curious people.
 * state: "starting" | "unsupported" | "connecting" | "joined" | "loading" | "ready" | "error" | "left"
 */
export const status = {
  state: "starting",
  connection: "not connected",
  gateway: "",
  nodeId: "",
  device: "",
  f16: false,
  cpu: false, // a fallback (CPU) adapter: matvec.wgsl for every row count
  limits: {},
  memoryBytes: 0,
  speed: 0,
  layers: null, // [start, end) of the assigned shard
  shardId: "",
  progress: { done: 0, total: 0 },
  downloads: 0, // shards fetched over the network
  cacheHits: 0, // shards loaded from IndexedDB
  cuts: 0, // shards cut from a held one (a re-plan to a narrower range), nothing downloaded
  loads: 0, // shards uploaded to the GPU and announced ready
  stepsServed: 0,
  requestsServed: 0,
  cachedRequests: 0,
  lastStepMs: 0,
  meanStepMs: 0,
  sessions: 0,
  error: null, // the latest error, as shown in #error
  errors: [], // every error: {at: ISO time, message}
};

let scheduled = false;

/** Publish window.synapse and draw the first frame. */
export function init() {
  Object.defineProperty(window, "synapse", { value: status, configurable: true });
  render();
}

/** Merge `changes` into the state and redraw soon. */
export function update(changes) {
  Object.assign(status, changes);
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      render();
    });
    setTimeout(() => scheduled && render(), 250); // hidden tabs get no animation frames
  }
}

/** Show an error on the page (and keep it in status.errors); `state` changes the node state too. */
export function showError(message, state = null) {
  status.errors.push({ at: new Date().toISOString(), message });
  update(state ? { error: message, state } : { error: message });
  console.error(`synapse: ${message}`);
}

const STATE_TEXT = {
  starting: "Starting: checking the GPU",
  unsupported: "No WebGPU: this browser cannot be a node",
  connecting: "Connecting to the gateway",
  joined: "Joined: waiting for an assignment",
  loading: "Loading the assigned layers",
  ready: "Ready: serving steps",
  error: "Stopped by an error",
  left: "Left the gateway",
};

function render() {
  scheduled = false;
  const s = status;
  set("state", STATE_TEXT[s.state] ?? s.state);
  document.body.dataset.state = s.state;
  set("connection", `${s.connection}${s.sessions ? ` (session ${s.sessions})` : ""}`);
  set("gateway", s.gateway || "-");
  set("node-id", s.nodeId || "-");
  set("gpu", s.device ? `${s.device}, ${s.f16 ? "shader-f16" : "f32 compute (f16 weights unpacked)"}` : "-");
  set("limits", describeLimits(s.limits));
  set("memory", s.memoryBytes ? `${(s.memoryBytes / MIB).toFixed(0)} MiB usable` : "-");
  set("speed", s.speed ? `${s.speed.toFixed(1)} GPT-2 layer passes/s` : "-");
  set("layers", s.layers ? `[${s.layers[0]}, ${s.layers[1]})${s.shardId ? ` of ${s.shardId}` : ""}` : "none yet");
  const { done, total } = s.progress;
  const bar = document.getElementById("progress");
  if (bar) {
    bar.max = total || 1;
    bar.value = done;
  }
  set("progress-text", total ? `${(done / MIB).toFixed(1)} / ${(total / MIB).toFixed(1)} MiB` : "-");
  set("downloads", `${s.downloads} downloaded, ${s.cacheHits} from the cache, ${s.cuts} cut from a held shard`);
  set("served", `${s.requestsServed} requests in ${s.stepsServed} steps; ${s.cachedRequests} cached now`);
  set("step-ms", s.stepsServed ? `${s.lastStepMs.toFixed(1)} ms last, ${s.meanStepMs.toFixed(1)} ms mean` : "-");
  const error = document.getElementById("error");
  if (error) {
    error.hidden = !s.error;
    error.textContent = s.error ?? "";
  }
}

function describeLimits(limits) {
  if (!limits.maxBufferSize) return "-";
  const mib = (bytes) => `${(bytes / MIB).toFixed(0)} MiB`;
  return (
    `buffer ${mib(limits.maxBufferSize)}, binding ${mib(limits.maxStorageBufferBindingSize)}, ` +
    `workgroup memory ${limits.maxComputeWorkgroupStorageSize / 1024} KiB, ` +
    `${limits.maxComputeInvocationsPerWorkgroup} invocations`
  );
}

function set(id, text) {
  const element = document.getElementById(id);
  if (element && element.textContent !== text) element.textContent = text;
}
