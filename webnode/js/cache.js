// KV caches on the GPU: per layer one k and one v buffer of (slots, n_head, max_positions, head_dim) f32,
// one slot per request, grown by doubling up to a memory cap; which request holds which slot, how long.

/** A step this node cannot run (bad input, a lost cache): answered with step_failed; the node stays. */
export class StepError extends Error {
  constructor(message) {
    super(message);
    this.name = "StepError";
  }
}

const INITIAL_BYTES = 64 << 20;

export class KvCache {
  /**
   * @param {import("./kernels.js").Kernels} kernels
   * @param {{layers: number, nEmbd: number, maxPositions: number, maxSlots: number}} shape
   */
  constructor(kernels, { layers, nEmbd, maxPositions, maxSlots }) {
    this.kernels = kernels;
    this.layers = layers;
    this.maxPositions = maxPositions;
    this.maxSlots = maxSlots;
    this.slotBytes = maxPositions * nEmbd * 4; // one slot of one k (or v) buffer
    this.entries = new Map(); // request id -> {slot, length, lastUsed}
    this.slots = 0;
    this.buffers = []; // per layer {k, v}
    // Start with up to 4 slots but at most 64 MiB (GPT-2 124M, 12 layers: one slot is 72 MiB); grow on demand.
    const initial = Math.max(1, Math.min(4, maxSlots, Math.floor(INITIAL_BYTES / (2 * layers * this.slotBytes))));
    this.grow(initial);
  }

  /** GPU bytes held by the caches now. */
  get bytes() {
    return 2 * this.layers * this.slots * this.slotBytes;
  }

  get cachedRequests() {
    return this.entries.size;
  }

  /** Make room for `slots` slots: new buffers, the old slots copied over (queue order), old ones freed. */
  grow(slots) {
    if (slots <= this.slots) return;
    const { device } = this.kernels;
    const encoder = device.createCommandEncoder({ label: "kv cache grow" });
    const buffers = [];
    for (let layer = 0; layer < this.layers; layer++) {
      const pair = {
        k: this.kernels.empty(slots * this.slotBytes, `k cache ${layer}`),
        v: this.kernels.empty(slots * this.slotBytes, `v cache ${layer}`),
      };
      const old = this.buffers[layer];
      if (old && this.slots > 0) {
        encoder.copyBufferToBuffer(old.k, 0, pair.k, 0, this.slots * this.slotBytes);
        encoder.copyBufferToBuffer(old.v, 0, pair.v, 0, this.slots * this.slotBytes);
      }
      buffers.push(pair);
    }
    device.queue.submit([encoder.finish()]);
    this.destroyBuffers();
    this.buffers = buffers;
    this.slots = slots;
  }

  /**
   * Slots and start positions for one step's requests, checked first: a request at position 0 starts
   * over (a replay), one at a position below its cached length rewinds, one past it cannot run.
   * @param {{requestId: number, position: number, rows: number}[]} requests one per frame, in order
   * @returns {{requestId: number, slot: number, start: number, rows: number}[]}
   */
  place(requests) {
    const ids = new Set();
    for (const { requestId, position, rows } of requests) {
      if (ids.has(requestId)) throw new StepError(`request ${requestId} appears twice in one step`);
      ids.add(requestId);
      if (position + rows > this.maxPositions) {
        throw new StepError(
          `request ${requestId}: ${position} cached + ${rows} new tokens exceed ` +
            `the model's ${this.maxPositions} positions`,
        );
      }
      const held = this.entries.get(requestId)?.length ?? 0;
      if (position > held) {
        throw new StepError(
          `request ${requestId} continues at position ${position} but this node holds ${held} tokens of it; ` +
            "replay from position 0",
        );
      }
    }
    this.makeRoom(requests.filter(({ requestId }) => !this.entries.has(requestId)).length, ids);
    const now = performance.now();
    return requests.map(({ requestId, position, rows }) => {
      let entry = this.entries.get(requestId);
      if (entry === undefined) {
        entry = { slot: this.freeSlot(), length: 0, lastUsed: now };
        this.entries.set(requestId, entry);
      }
      entry.lastUsed = now;
      return { requestId, slot: entry.slot, start: position, rows };
    });
  }

  /** After the step ran: each request's cache now holds start + rows tokens. */
  commit(placements) {
    for (const { requestId, start, rows } of placements) {
      const entry = this.entries.get(requestId);
      if (entry) entry.length = start + rows;
    }
  }

  makeRoom(newRequests, inStep) {
    const free = this.slots - this.entries.size;
    if (newRequests <= free) return;
    const wanted = Math.min(this.maxSlots, Math.max(this.entries.size + newRequests, 2 * this.slots));
    this.grow(wanted);
    let missing = this.entries.size + newRequests - this.slots;
    if (missing <= 0) return;
    const idle = [...this.entries.entries()]
      .filter(([requestId]) => !inStep.has(requestId))
      .sort(([, a], [, b]) => a.lastUsed - b.lastUsed);
    for (const [requestId] of idle.slice(0, missing)) this.entries.delete(requestId); // least recently used
    missing = this.entries.size + newRequests - this.slots;
    if (missing > 0) {
      throw new StepError(`this step needs ${newRequests} new KV-cache slots; only ${this.maxSlots} fit this GPU`);
    }
  }

  freeSlot() {
    const used = new Set([...this.entries.values()].map((entry) => entry.slot));
    for (let slot = 0; slot < this.slots; slot++) if (!used.has(slot)) return slot;
    throw new StepError("no free KV-cache slot"); // makeRoom prevents this
  }

  /** Free the caches of these requests; unknown ids are ignored. */
  release(requestIds) {
    for (const requestId of requestIds) this.entries.delete(requestId);
  }

  releaseAll() {
    this.entries.clear();
  }

  /** Free caches unused for `idleMs`; returns how many. */
  releaseIdle(idleMs) {
    const cutoff = performance.now() - idleMs;
    let freed = 0;
    for (const [requestId, entry] of this.entries) {
      if (entry.lastUsed < cutoff) {
        this.entries.delete(requestId);
        freed++;
      }
    }
    return freed;
  }

  destroyBuffers() {
    for (const { k, v } of this.buffers) {
      k.destroy();
      v.destroy();
    }
    this.buffers = [];
    this.kernels.dropBindGroups();
  }
}
