// Steps from the gateway: SYN1 messages queued as they arrive, batched while request ids stay distinct, run
// on the stage, answered in arrival order with STATS + one output frame per input frame, or step_failed.

import * as syn1 from "../syn1.js";
import { StepError } from "./cache.js";

const WIRE_DTYPES = { float16: syn1.DType.F16, float32: syn1.DType.F32, int8: syn1.DType.I8 };

/**
 * @typedef {{frames: object[], arrived: number, decodeMs: number}} QueuedStep
 * @typedef {{stage: import("./model.js").Gpt2Stage, wireDtype: string}} Serving  what answers steps now
 */

export class StepRunner {
  /**
   * @param {{serving: () => (Serving | null), why: () => string, sendBinary: (bytes: Uint8Array) => boolean,
   *   sendJson: (message: object) => boolean, onServed: (figures: object) => void,
   *   onFatal: (message: string) => void}} hooks why() says why there is no stage to serve
   */
  constructor(hooks, { maxBatch = 64 } = {}) {
    this.hooks = hooks;
    this.maxBatch = maxBatch;
    this.queue = [];
    this.running = null; // the loop's promise while it runs
    this.session = 0; // bumped by clear(): replies to steps of an older session are dropped
  }

  /**
   * A binary message from the gateway. Decoded at once: a malformed one throws syn1.FrameError, and the
   * caller drops the connection (the queue is cleared then).
   */
  push(data) {
    const started = performance.now();
    const frames = syn1.decodeFrames(data);
    this.queue.push({ frames, arrived: started, decodeMs: performance.now() - started, session: this.session });
    this.running ??= this.loop().finally(() => (this.running = null));
  }

  /** Drop queued steps, and the reply of a step running now (a new session: the gateway forgot them). */
  clear() {
    this.queue = [];
    this.session++;
  }

  /** Resolves when no step is running. */
  async idle() {
    while (this.running) await this.running;
  }

  async loop() {
    while (this.queue.length) {
      const batch = this.takeBatch();
      try {
        const replies = await this.answer(batch);
        if (batch[0].session === this.session) for (const reply of replies) this.send(reply);
      } catch (error) {
        this.queue = [];
        this.hooks.onFatal(`step failed on the GPU: ${error.message}`);
        return;
      }
    }
  }

  /** Queued steps from the front whose request ids are all distinct: one forward serves them all. */
  takeBatch() {
    const ids = new Set();
    const batch = [];
    let frames = 0;
    while (this.queue.length && frames < this.maxBatch) {
      const step = this.queue[0];
      if (batch.length && step.frames.some((frame) => ids.has(frame.requestId))) break;
      step.frames.forEach((frame) => ids.add(frame.requestId));
      frames += step.frames.length;
      batch.push(this.queue.shift());
    }
    return batch;
  }

  /** Replies for a batch, in order; a StepError in a batch reruns its steps alone so one bad step fails alone. */
  async answer(batch) {
    const serving = this.hooks.serving();
    if (!serving) return batch.map(() => ({ failed: this.hooks.why() }));
    try {
      return await this.compute(serving, batch);
    } catch (error) {
      if (!(error instanceof StepError)) throw error;
      if (batch.length === 1) return [{ failed: error.message }];
    }
    const replies = [];
    for (const step of batch) replies.push(...(await this.answer([step])));
    return replies;
  }

  send(reply) {
    if (reply.failed !== undefined) this.hooks.sendJson({ kind: "step_failed", message: reply.failed.slice(0, 4000) });
    else this.hooks.sendBinary(reply.bytes);
  }

  async compute({ stage, wireDtype }, batch) {
    const started = performance.now();
    const frames = batch.flatMap((step) => step.frames);
    const items = frames.map((frame) => this.input(stage, frame));
    const placements = stage.cache.place(items);
    placements.forEach((placement, index) => Object.assign(items[index], placement));
    const computeStarted = performance.now();
    const outputs = await stage.run(items);
    const computeMs = performance.now() - computeStarted;
    stage.cache.commit(placements);
    const replies = [];
    let offset = 0;
    for (const step of batch) {
      const encodeStarted = performance.now();
      const stepFrames = step.frames.map((frame, index) => outputFrame(stage, frame, outputs[offset + index]));
      offset += step.frames.length;
      const body = syn1.encodeFrames(stepFrames, { dtype: wireDtypeOf(stage, stepFrames, wireDtype) });
      const serializeMs = step.decodeMs + (performance.now() - encodeStarted);
      const stats = syn1.encode({
        msgType: syn1.MessageType.STATS, requestId: 0, position: 0, rows: 1, cols: 3,
        data: new Float32Array([computeMs, started - step.arrived, serializeMs]),
      });
      const bytes = new Uint8Array(stats.length + body.length);
      bytes.set(stats);
      bytes.set(body, stats.length);
      replies.push({ bytes });
    }
    this.hooks.onServed({ steps: batch.length, requests: frames.length, computeMs });
    return replies;
  }

  /** A frame's request as the stage takes it; StepError for the wrong type, shape or token ids. */
  input(stage, frame) {
    const predicted = Boolean(frame.flags & syn1.Flag.PREDICTED);
    const request = { requestId: frame.requestId, position: frame.position, rows: frame.rows, predicted };
    if (stage.isFirst) {
      if (frame.msgType !== syn1.MessageType.TOKENS) {
        throw new StepError(`the first stage takes TOKENS frames, got message type ${frame.msgType}`);
      }
      for (const id of frame.data) {
        if (id < 0 || id >= stage.vocab) {
          throw new StepError(`request ${frame.requestId}: token id ${id} outside [0, ${stage.vocab})`);
        }
      }
      return { ...request, ids: frame.data };
    }
    if (frame.msgType !== syn1.MessageType.ACTIVATION) {
      const got = `message type ${frame.msgType}`;
      throw new StepError(`stage [${stage.start}, ${stage.end}) takes ACTIVATION frames, got ${got}`);
    }
    if (frame.cols !== stage.nEmbd) {
      const width = `${frame.cols} columns, this model has ${stage.nEmbd}`;
      throw new StepError(`request ${frame.requestId}: activation has ${width}`);
    }
    return { ...request, hidden: syn1.toFloat32(frame) };
  }
}

/**
 * The dtype on the wire: activations as assigned; top-K values as f16 (the kernel already ranked them
 * by exact f32 value, ties to the lower id, so rounding cannot change the greedy token); full logits
 * as they are (f32, exact).
 */
function wireDtypeOf(stage, frames, wireDtype) {
  if (!stage.isLast) return WIRE_DTYPES[wireDtype];
  return frames[0]?.msgType === syn1.MessageType.OUTPUT ? syn1.DType.F16 : undefined;
}

/**
 * The output frame of one request: activations, or the top-K (or logits) of its last row; of every row
 * when its rows after the first are a speculative draft (PREDICTED), row i answering position + i.
 */
function outputFrame(stage, frame, output) {
  const { requestId, position, rows } = frame;
  const predicted = Boolean(frame.flags & syn1.Flag.PREDICTED);
  if (!stage.isLast) {
    return syn1.activation({ requestId, position, rows, cols: stage.nEmbd, data: output.hidden, predicted });
  }
  const [first, answered] = predicted ? [position, rows] : [position + rows - 1, 1]; // a row's own position
  if (output.logits) {
    return syn1.logits({ requestId, position: first, rows: answered, cols: stage.vocab, data: output.logits });
  }
  const cols = output.values.length / answered;
  return syn1.output({ requestId, position: first, rows: answered, cols, values: output.values, tokenIds: output.ids });
}
