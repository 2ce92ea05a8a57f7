// Fuzzing webnode/syn1.js with a seeded generator: the shared vectors mutated, cut, spliced and lied about,
// random headers and random bytes. Every input decodes (and re-encodes to the same bytes) or throws
// FrameError; nothing else, and no array is ever larger than the bytes received.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as syn1 from "../../webnode/syn1.js";

const DIR = new URL("../vectors/syn1/", import.meta.url);
const INDEX = JSON.parse(readFileSync(new URL("index.json", DIR), "utf8"));
const load = (file) => new Uint8Array(readFileSync(new URL(file, DIR)));
const VALID = INDEX.valid.map((vector) => load(vector.file));
const INVALID = INDEX.invalid.map((vector) => load(vector.file));
const TRIALS = 4000;

// mulberry32: a small seeded PRNG, so a failure names a seed and trial that reproduce it.
function generator(seed) {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const below = (n) => Math.floor(next() * n);
  return { below, pick: (items) => items[below(items.length)], byte: () => below(256) };
}

const SHAPES = [0, 1, 2, 3, 4, 97, 768, 4096, 4097, 70000, 2 ** 31, 2 ** 32 - 1];

function randomBytes(random, length) {
  return Uint8Array.from({ length }, random.byte);
}

function header(random) {
  const bytes = new Uint8Array(24);
  const view = new DataView(bytes.buffer);
  const magics = [0x53594e31, 0x314e5953, random.below(2 ** 32)];
  view.setUint32(0, random.pick(magics), false);
  [random.below(8), random.pick([0, 1, 2, 4, 8, 16, 255]), random.below(7), random.pick([0, 0, 0, 1])].forEach(
    (value, index) => view.setUint8(4 + index, value),
  );
  for (const offset of [8, 12]) view.setUint32(offset, random.below(2 ** 32), true);
  for (const offset of [16, 20]) view.setUint32(offset, random.pick(SHAPES), true);
  return bytes;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((total, part) => total + part.length, 0));
  parts.reduce((offset, part) => (out.set(part, offset), offset + part.length), 0);
  return out;
}

const STRATEGIES = {
  random: (random) => randomBytes(random, random.below(512)),
  header: (random) => concat([header(random), randomBytes(random, random.below(64))]),
  mutated: (random) => {
    const bytes = random.pick(VALID).slice();
    for (let count = 1 + random.below(4); count > 0; count--) bytes[random.below(bytes.length)] = random.byte();
    return bytes.subarray(0, random.below(bytes.length + 1));
  },
  lyingSize: (random) => {
    const bytes = random.pick(VALID).slice();
    new DataView(bytes.buffer).setUint32(random.pick([16, 20]), random.pick(SHAPES), true);
    return bytes;
  },
  spliced: (random) => {
    const pieces = [VALID, INVALID, null];
    const parts = Array.from({ length: random.below(5) }, () => {
      const source = random.pick(pieces);
      return source ? random.pick(source) : header(random);
    });
    return concat([...parts, randomBytes(random, random.below(16))]);
  },
};

function decodeChecked(bytes, where) {
  let frames;
  try {
    frames = syn1.decodeFrames(bytes);
  } catch (error) {
    if (!(error instanceof syn1.FrameError)) assert.fail(`${where}: ${error.stack}`);
    return null;
  }
  for (const frame of frames) {
    for (const array of [frame.data, frame.tokenIds, frame.scales]) {
      if (array) assert.ok(array.byteLength <= bytes.length, `${where}: a ${array.byteLength}-byte array`);
    }
  }
  assert.deepEqual(syn1.encodeFrames(frames), bytes, `${where}: re-encoding changed the bytes`);
  return frames;
}

for (const [name, strategy] of Object.entries(STRATEGIES)) {
  test(`fuzz ${name}: decode or FrameError, never anything else`, () => {
    const seed = 0x5eed + name.length;
    const random = generator(seed);
    let decoded = 0;
    for (let trial = 0; trial < TRIALS; trial++) {
      if (decodeChecked(strategy(random), `seed ${seed} trial ${trial}`)) decoded++;
    }
    assert.ok(decoded < TRIALS, "every input decoded: the strategy is not producing bad input");
  });
}

test("a message of many tiny frames is refused after maxFrames", () => {
  const token = syn1.encode(syn1.tokens({ requestId: 1, position: 0, tokenIds: [464] }));
  const frames = (count) => concat(Array.from({ length: count }, () => token));
  assert.equal(syn1.decodeFrames(frames(syn1.DEFAULT_MAX_FRAMES)).length, syn1.DEFAULT_MAX_FRAMES);
  assert.throws(() => syn1.decodeFrames(frames(100_000)), /frame 1024 at byte 28672: a message holds at most 1024/);
  assert.throws(() => syn1.decodeFrames(frames(3), { maxFrames: 2 }), /at most 2 frames/);
});

test("headers claiming the limit or more are refused before anything is sized by them", () => {
  for (const [rows, cols] of [
    [1024, 4096],
    [2 ** 32 - 1, 2 ** 32 - 1],
  ]) {
    const bytes = new Uint8Array(1024);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, syn1.MAGIC, false);
    [syn1.MessageType.ACTIVATION, 0, syn1.DType.F32].forEach((value, index) => view.setUint8(4 + index, value));
    view.setUint32(16, rows, true);
    view.setUint32(20, cols, true);
    assert.throws(() => syn1.decodeFrames(bytes), /truncated frame|exceeds the limit/);
  }
});
