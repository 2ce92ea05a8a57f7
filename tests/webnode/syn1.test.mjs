// webnode/syn1.js against the shared SYN1 vectors (tests/vectors/syn1/), the same files pytest reads.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as syn1 from "../../webnode/syn1.js";

const DIR = new URL("../vectors/syn1/", import.meta.url);
const INDEX = JSON.parse(readFileSync(new URL("index.json", DIR), "utf8"));
const { DType, MessageType, FrameError } = syn1;

function load(file) {
  return new Uint8Array(readFileSync(new URL(file, DIR))); // a fresh, aligned copy
}

// JSON has no inf/nan: the index writes them as strings.
function number(value) {
  return { inf: Infinity, "-inf": -Infinity, nan: NaN }[value] ?? value;
}

function flat(rows) {
  return rows.flat().map(number);
}

function assertSameFloats(actual, expected, what) {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let index = 0; index < expected.length; index++) {
    if (!Object.is(actual[index], expected[index])) {
      assert.fail(`${what}[${index}]: got ${actual[index]}, expected ${expected[index]}`);
    }
  }
}

// The frame an index entry describes, with data in its wire dtype.
function frameFromIndex(entry) {
  const { msg_type: msgType, flags, dtype, position, request_id: requestId, rows, cols } = entry;
  const values = flat(entry.values);
  const data = {
    [DType.F32]: () => Float32Array.from(values),
    [DType.F16]: () => syn1.f32ToF16Bits(Float32Array.from(values)),
    [DType.I8]: () => Int8Array.from(values),
    [DType.I32]: () => Int32Array.from(values),
  }[dtype]();
  const tokenIds = entry.token_ids === null ? null : Int32Array.from(entry.token_ids.flat());
  const scales = entry.scales === null ? null : Float32Array.from(entry.scales.map(number));
  return { msgType, flags, position, requestId, rows, cols, data, tokenIds, scales };
}

function assertFrameMatches(frame, entry, what) {
  for (const [key, field] of Object.entries({
    msgType: "msg_type",
    flags: "flags",
    dtype: "dtype",
    position: "position",
    requestId: "request_id",
    rows: "rows",
    cols: "cols",
  })) {
    assert.equal(frame[key], entry[field], `${what}: ${key}`);
  }
  const values = flat(entry.values);
  if (frame.dtype === DType.I8 || frame.dtype === DType.I32) assert.deepEqual(Array.from(frame.data), values);
  else assertSameFloats(syn1.toFloat32(frame), values, `${what} values`);
  if (entry.scales === null) assert.equal(frame.scales, null);
  else assertSameFloats(frame.scales, entry.scales.map(number), `${what} scales`);
  if (entry.token_ids === null) assert.equal(frame.tokenIds, null);
  else assert.deepEqual(Array.from(frame.tokenIds), entry.token_ids.flat());
}

for (const vector of INDEX.valid) {
  test(`valid vector ${vector.name} decodes to the index`, () => {
    const frames = syn1.decodeFrames(load(vector.file));
    assert.equal(frames.length, vector.frames.length);
    frames.forEach((frame, index) => assertFrameMatches(frame, vector.frames[index], `frame ${index}`));
    if (vector.frames.length === 1) assertFrameMatches(syn1.decode(load(vector.file)), vector.frames[0], "decode");
  });

  test(`valid vector ${vector.name}: encode reproduces the exact bytes`, () => {
    const expected = load(vector.file);
    assert.deepEqual(syn1.encodeFrames(vector.frames.map(frameFromIndex)), expected);
    // From the f32 source where there is one: f16 rounding and int8 quantization must match numpy.
    const fromSource = vector.frames.map((entry) => {
      const frame = frameFromIndex(entry);
      if (entry.source_f32 === null) return syn1.encode(frame);
      const source = { ...frame, data: Float32Array.from(flat(entry.source_f32)), scales: null };
      return syn1.encode(source, { dtype: entry.dtype });
    });
    assert.deepEqual(concat(fromSource), expected);
  });
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((total, part) => total + part.length, 0));
  parts.reduce((offset, part) => (out.set(part, offset), offset + part.length), 0);
  return out;
}

for (const vector of INDEX.invalid) {
  test(`invalid vector ${vector.name} fails with the pinned message`, () => {
    const decoder = vector.decoder === "decode" ? syn1.decode : syn1.decodeFrames;
    assert.throws(() => decoder(load(vector.file)), (error) => {
      assert.ok(error instanceof FrameError, `${error}`);
      assert.equal(error.message, vector.error);
      return true;
    });
  });
}

test("f32 -> f16 bits agree with numpy on the conversion table", () => {
  const { f32_bits: f32Bits, f16_bits: f16Bits } = INDEX.f16_conversion;
  const floats = new Float32Array(Uint32Array.from(f32Bits).buffer);
  assert.deepEqual(Array.from(syn1.f32ToF16Bits(floats)), f16Bits);
});

test("every f16 bit pattern survives f16 -> f32 -> f16, and widens to the exact value", () => {
  const all = Uint16Array.from({ length: 65536 }, (_, index) => index);
  const widened = syn1.f16BitsToF32(all);
  assert.deepEqual(syn1.f32ToF16Bits(widened), all);
  for (const bits of all) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exponent = (bits >>> 10) & 0x1f;
    const mantissa = bits & 0x3ff;
    if (exponent === 0x1f) continue; // inf and nan: covered by the round trip
    const value = exponent === 0 ? sign * mantissa * 2 ** -24 : sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
    if (!Object.is(widened[bits], value)) assert.fail(`f16 0x${bits.toString(16)}: ${widened[bits]} != ${value}`);
  }
});

test("decode is zero-copy on an aligned buffer and still right on a misaligned one", () => {
  const bytes = load("multi_frame_mixed.bin");
  const frames = syn1.decodeFrames(bytes);
  for (const frame of frames) assert.equal(frame.data.buffer, bytes.buffer);
  const shifted = new Uint8Array(bytes.length + 1);
  shifted.set(bytes, 1);
  const copied = syn1.decodeFrames(shifted.subarray(1));
  copied.forEach((frame, index) => assert.deepEqual(frame.data, frames[index].data));
});

test("readHeader routes a frame without its payload", () => {
  const header = syn1.readHeader(load("activation_f16_1x768.bin"));
  assert.equal(header.msgType, MessageType.ACTIVATION);
  assert.equal(header.payloadSize, 1536);
  assert.equal(header.frameSize, 1560);
});

test("every truncation of every valid message fails with FrameError, except at frame boundaries", () => {
  for (const vector of INDEX.valid) {
    const bytes = load(vector.file);
    const boundaries = new Set(); // cut exactly between frames, a message is a valid shorter batch
    for (let offset = 0; offset < bytes.length; boundaries.add(offset)) {
      offset += syn1.readHeader(bytes, offset).frameSize;
    }
    for (let length = 0; length < bytes.length; length++) {
      if (boundaries.has(length)) continue;
      assert.throws(() => syn1.decodeFrames(bytes.subarray(0, length)), FrameError, `${vector.name}[:${length}]`);
    }
  }
});

test("random bytes and mutated headers fail with FrameError or decode, never anything else", () => {
  let state = 12345;
  const random = () => ((state = (state * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
  const base = load("activation_i8_1x97.bin");
  for (let trial = 0; trial < 3000; trial++) {
    const bytes = trial % 2 ? Uint8Array.from({ length: random() }, random) : base.slice();
    if (trial % 2 === 0) bytes[4 + (random() % 20)] = random(); // one header byte after the magic
    try {
      syn1.decodeFrames(bytes);
    } catch (error) {
      if (!(error instanceof FrameError)) assert.fail(`trial ${trial}: ${error.stack}`);
    }
  }
});

test("encode checks its input", () => {
  const data = new Float32Array(4);
  const frame = syn1.activation({ requestId: 1, position: 0, rows: 1, cols: 4, data });
  assert.equal(syn1.encode(frame).length, 40);
  const bad = [
    [{ ...frame, cols: 3 }, /data has 4 values, shape \(1, 3\) needs 3/],
    [{ ...frame, requestId: 2 ** 32 }, /requestId 4294967296 does not fit in a u32/],
    [{ ...frame, flags: syn1.Flag.DELTA }, /flag DELTA is reserved/],
    [{ ...frame, data: [1, 2, 3, 4] }, /data must be a Float32Array/],
    [{ ...frame, msgType: 9 }, /unknown message type 9/],
  ];
  for (const [input, message] of bad) assert.throws(() => syn1.encode(input), message);
  assert.throws(() => syn1.encode(frame, { dtype: DType.I32 }), /cannot be written as I32|not allowed/);
  assert.throws(() => syn1.encodeFrames([]), /empty message/);
  assert.throws(() => syn1.quantizeInt8(Float32Array.of(1, Infinity), 1, 2), /non-finite/);
});

test("int8 round trip stays within half a step per row", () => {
  const data = Float32Array.from({ length: 2 * 97 }, (_, index) => Math.sin(index) * (index < 97 ? 3 : 0.01));
  const frame = syn1.activation({ requestId: 1, position: 0, rows: 2, cols: 97, data });
  const decoded = syn1.decode(syn1.encode(frame, { dtype: DType.I8 }));
  const restored = syn1.toFloat32(decoded);
  for (let index = 0; index < data.length; index++) {
    const scale = decoded.scales[Math.floor(index / 97)];
    assert.ok(Math.abs(restored[index] - data[index]) <= scale / 2 + 1e-7, `index ${index}`);
  }
});

test("tokens and output helpers build the frames the gateway expects", () => {
  const tokens = syn1.decode(syn1.encode(syn1.tokens({ requestId: 5, position: 9, tokenIds: [464, 318] })));
  assert.deepEqual([tokens.rows, tokens.cols, Array.from(tokens.data)], [2, 1, [464, 318]]);
  const values = syn1.f32ToF16Bits(Float32Array.from({ length: 64 }, (_, index) => -index));
  const tokenIds = Int32Array.from({ length: 64 }, (_, index) => 50256 - index);
  const output = syn1.output({ requestId: 5, position: 10, rows: 1, cols: 64, values, tokenIds });
  assert.equal(syn1.encode(output).length, 408); // DESIGN.md: last hop <= 0.5 KB
});
