// The node itself: answers what the gateway asks (assign, release, steps) with progress, ready, step replies
// and errors, tying the connection, shard loading, the GPU stage and the status view together.

import { FrameError } from "../syn1.js";
import { GatewayConnection } from "./connection.js";
import { withErrorScopes } from "./gpu.js";
import { Gpt2Stage } from "./model.js";
import { fetchShard, mayHold, parseSafetensors } from "./shards.js";
import { StepRunner } from "./steps.js";
import * as ui from "./ui.js";

const PROGRESS_EVERY_BYTES = 8 << 20; // as the native node: a progress message every 8 MiB and at the end
const IDLE_TIMEOUT_MS = 300_000; // a request's KV cache unused this long is freed
const HEARTBEAT_MS = 10_000;
const NO_SHARD = "step received before any shard was loaded";

export class WebNode {
  /**
   * @param {{gpu: object, kernels: import("./kernels.js").Kernels, nodeId: string, url: string,
   *   memoryBytes: number, speed: number, maxBindingBytes: number, joinToken?: string}} options
   */
  constructor(options) {
    Object.assign(this, options);
    this.loaded = null; // {stage, sha256, shard: HeldShard, layers, wireDtype}: what serves steps
    this.loading = null; // {generation, assign, abort, feeder, fetched: Promise<HeldShard | null>, settleFetched}
    this.generation = 0;
    this.dead = false;
    this.stepTimes = { count: 0, totalMs: 0 };
    this.steps = new StepRunner({
      serving: () => (this.loaded && !this.loading ? this.loaded : null),
      why: () => (this.loading ? `this node is loading layers [${this.loading.layers}]` : NO_SHARD),
      sendBinary: (bytes) => this.connection.sendBinary(bytes),
      sendJson: (message) => this.connection.send(message),
      onServed: (figures) => this.served(figures),
      onFatal: (message) => this.fatal(message),
    });
    this.connection = new GatewayConnection(this.url, () => this.hello(), {
      onStatus: (state, detail) => this.connectionStatus(state, detail),
      onWelcome: () => this.welcomed(),
      onControl: (message) => this.control(message),
      onBinary: (data) => this.binary(data),
      onGatewayError: (message) => ui.showError(message),
    });
  }

  start() {
    if (this.dead) return;
    this.connection.start();
    this.timers = [
      setInterval(() => this.sweepIdle(), 30_000),
      setInterval(() => this.heartbeat(), HEARTBEAT_MS),
    ];
    addEventListener("pagehide", () => this.leave("page closed"));
  }

  hello() {
    const { nodeId, memoryBytes, speed, joinToken = "" } = this;
    const device = this.gpu.description;
    return { node_id: nodeId, node_kind: "web", device, memory_bytes: memoryBytes, speed, join_token: joinToken };
  }

  connectionStatus(state, detail) {
    const keep = ["error", "unsupported"].includes(ui.status.state);
    if (state === "left") ui.update({ connection: `left: ${detail}`, state: keep ? ui.status.state : "left" });
    else ui.update({ connection: `${state}: ${detail}`, state: keep ? ui.status.state : "connecting" });
  }

  welcomed() {
    this.steps.clear(); // a new session: the request ids of the last one mean nothing now
    this.loaded?.stage.cache.releaseAll();
    const { sessions } = this.connection;
    const state = this.loading ? "loading" : "joined"; // ready again once the router's assign is answered
    ui.update({ state, connection: `joined ${this.url}`, sessions, cachedRequests: 0 });
  }

  control(message) {
    if (message.kind === "assign") {
      this.assign(message);
    } else if (message.kind === "release") {
      this.loaded?.stage.cache.release(message.request_ids ?? []);
      ui.update({ cachedRequests: this.loaded?.stage.cache.cachedRequests ?? 0 });
    }
  }

  binary(data) {
    try {
      this.steps.push(data);
    } catch (error) {
      if (!(error instanceof FrameError)) throw error;
      this.steps.clear();
      this.connection.reject(`bad frames from the gateway: ${error.message}`);
    }
  }

  /**
   * Load the assigned shard, then say ready; a newer assignment supersedes it. A shard inside the one held
   * (loaded, or being fetched by the load this one supersedes) is cut from it rather than downloaded.
   */
  async assign(assign) {
    const generation = ++this.generation;
    const previous = this.loading;
    // A re-plan to a narrower range of the shard on its way in: let that download finish and cut from it.
    const feeder =
      previous !== null && mayHold(previous.assign.shard_id, previous.assign.layers, assign.shard_id, assign.layers);
    if (!feeder) abortLoad(previous);
    const loading = { generation, assign, abort: new AbortController(), feeder: feeder ? previous : null };
    loading.fetched = new Promise((resolve) => (loading.settleFetched = resolve)); // its shard, once verified
    this.loading = loading;
    const current = () => this.generation === generation;
    const progress = { done: 0, total: assign.size_bytes };
    ui.update({ state: "loading", layers: assign.layers, shardId: assign.shard_id, progress });
    try {
      if (this.loaded?.sha256 === assign.sha256) {
        this.loaded.stage.setTopK(assign.top_k);
        const size = assign.size_bytes;
        this.connection.send({ kind: "progress", shard_id: assign.shard_id, done_bytes: size, total_bytes: size });
      } else {
        await this.steps.idle(); // the step running now still uses the old stage
        const held = feeder ? await previous.fetched : (this.loaded?.shard ?? null);
        if (!current()) return;
        this.loaded?.stage.destroy();
        this.loaded = null;
        const built = await this.load(loading, held, current);
        if (!current()) return built?.stage.destroy();
        this.loaded = { stage: built.stage, sha256: assign.sha256, shard: built.shard };
      }
      Object.assign(this.loaded, { layers: assign.layers, wireDtype: assign.activation_dtype });
      this.connection.send({ kind: "ready", shard_id: assign.shard_id, layers: assign.layers });
      this.loading = null;
      ui.update({ state: "ready", loads: ui.status.loads + 1, cachedRequests: 0 });
    } catch (error) {
      if (!current()) return;
      this.loading = null;
      // A node that cannot load its shard blocks the plan: leave cleanly (the router re-plans without
      // it) and join again after the backoff; the error stays on the page.
      const message = `loading ${assign.shard_id} failed: ${error.message}`;
      ui.showError(message, "joined");
      this.connection.rejoin("shard load failed", message);
    } finally {
      loading.settleFetched(this.loaded?.sha256 === assign.sha256 ? this.loaded.shard : null); // no-op once settled
    }
  }

  /**
   * Fetch (or cut from `held`) and upload the shard of `loading`; null when superseded on the way. Sets
   * loading.fetched to the verified shard as soon as it is fetched, for a load that cuts from it.
   * @returns {Promise<{stage: Gpt2Stage, shard: import("./shards.js").HeldShard} | null>}
   */
  async load(loading, held, current) {
    const { assign } = loading;
    let sent = 0;
    const progress = (done, total) => {
      if (!current()) return; // a superseded load that still fetches for its successor says nothing
      if (done - sent >= PROGRESS_EVERY_BYTES || (done === total && sent !== total)) {
        this.connection.send({ kind: "progress", shard_id: assign.shard_id, done_bytes: done, total_bytes: total });
        sent = done;
      }
      ui.update({ progress: { done, total } });
    };
    const fetching = fetchShard(assign, progress, loading.abort.signal, held);
    fetching.then(
      (shard) => loading.settleFetched({ sha256: assign.sha256, manifest: shard.manifest }),
      () => loading.settleFetched(null),
    );
    const shard = await fetching;
    const counter = { cache: "cacheHits", held: "cuts", download: "downloads" }[shard.source];
    ui.update({ [counter]: ui.status[counter] + 1 });
    if (shard.warning) ui.showError(shard.warning);
    if (!current()) return null;
    const tensors = parseSafetensors(shard.bytes, shard.manifest);
    const { memoryBytes, maxBindingBytes } = this;
    const options = { f16: this.gpu.f16, cpu: this.gpu.cpu, memoryBytes, maxBindingBytes, topK: assign.top_k };
    const stage = await withErrorScopes(this.kernels.device, "uploading the shard", async () => {
      const built = new Gpt2Stage(this.kernels, shard.manifest, tensors, options);
      await this.kernels.device.queue.onSubmittedWorkDone();
      return built;
    });
    return { stage, shard: { sha256: assign.sha256, manifest: shard.manifest } };
  }

  served({ steps, requests, computeMs }) {
    this.stepTimes.count += 1;
    this.stepTimes.totalMs += computeMs;
    ui.update({
      stepsServed: ui.status.stepsServed + steps,
      requestsServed: ui.status.requestsServed + requests,
      cachedRequests: this.loaded?.stage.cache.cachedRequests ?? 0,
      lastStepMs: computeMs,
      meanStepMs: this.stepTimes.totalMs / this.stepTimes.count,
    });
  }

  sweepIdle() {
    const cache = this.loaded?.stage.cache;
    if (cache?.releaseIdle(IDLE_TIMEOUT_MS)) ui.update({ cachedRequests: cache.cachedRequests });
  }

  heartbeat() {
    if (!this.connection.connected) return;
    const { requestsServed, cachedRequests, meanStepMs } = ui.status;
    this.connection.send({
      kind: "heartbeat",
      requests_served: requestsServed,
      cached_requests: cachedRequests,
      step_ms: meanStepMs,
    });
  }

  /** The GPU is gone or misbehaved: report it to the gateway (fatal), say bye, close, never rejoin. */
  fatal(message) {
    if (this.dead) return;
    this.dead = true;
    this.steps.clear();
    abortLoad(this.loading);
    ui.showError(message, "error");
    this.connection.leave("fatal GPU error", message);
    for (const timer of this.timers ?? []) clearInterval(timer);
  }

  leave(reason) {
    this.gpu.closing = true;
    this.connection.leave(reason);
  }
}

/** Abort a load and the superseded loads still fetching for it. */
function abortLoad(loading) {
  for (let load = loading; load; load = load.feeder) load.abort.abort();
}
