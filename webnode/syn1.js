// SYN1 binary tensor frames: the bytes of every tensor between gateway and nodes (docs/wire-protocol.md).
//
// Twin of services/wire/syn1.py: same layout, same checks, same error messages, proved by the
// shared vectors in tests/vectors/syn1/. Decoding is zero-copy where the bytes are aligned (typed
// arrays over the received buffer); frames are padded to 4 bytes so that is the usual case.
// Plain ES module, no dependencies: browsers and Node 20. Float16Array is not everywhere yet, so
// F16 data travels as Uint16Array bit patterns with f32ToF16Bits / f16BitsToF32 to convert.
// Longer than most modules on purpose: the whole format in one file, mirroring syn1.py check by check.

export const MAGIC = 0x53594e31; // read as a big-endian u32: the ASCII bytes S Y N 1 in order
export const HEADER_SIZE = 24;
export const ALIGNMENT = 4;
export const DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024;
export const DEFAULT_MAX_FRAMES = 1024; // frames in one message: one per request of a step's batch

export const MessageType = Object.freeze({ ACTIVATION: 1, TOKENS: 2, OUTPUT: 3, LOGITS: 4, STATS: 5 });
export const DType = Object.freeze({ F32: 1, F16: 2, I8: 3, I32: 4 });
export const Flag = Object.freeze({ NONE: 0, QUANTIZED: 1, COMPRESSED: 2, DELTA: 4, PREDICTED: 8 });

/** A SYN1 frame is malformed (decoding) or cannot be represented (encoding); the message says why. */
export class FrameError extends Error {
  constructor(message) {
    super(message);
    this.name = "FrameError";
  }
}

const U32_MAX = 0xffffffff;
const KNOWN_FLAGS = 0x0f;
const RESERVED_FLAGS = [Flag.COMPRESSED, Flag.DELTA];
const TYPE_NAME = { 1: "ACTIVATION", 2: "TOKENS", 3: "OUTPUT", 4: "LOGITS", 5: "STATS" };
const DTYPE_NAME = { 1: "F32", 2: "F16", 3: "I8", 4: "I32" };
const FLAG_NAME = { 1: "QUANTIZED", 2: "COMPRESSED", 4: "DELTA", 8: "PREDICTED" };
const ALLOWED_DTYPES = {
  [MessageType.ACTIVATION]: [DType.F32, DType.F16, DType.I8],
  [MessageType.TOKENS]: [DType.I32],
  [MessageType.OUTPUT]: [DType.F32, DType.F16], // dtype of the values; ids are always i32
  [MessageType.LOGITS]: [DType.F32, DType.F16],
  [MessageType.STATS]: [DType.F32],
};
const ARRAY_TYPE = { 1: Float32Array, 2: Uint16Array, 3: Int8Array, 4: Int32Array };
const ITEM_SIZE = { 1: 4, 2: 2, 3: 1, 4: 4 };

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  // Typed arrays use the platform's byte order; every browser platform in use is little-endian.
  throw new Error("syn1.js needs a little-endian platform");
}

/** Payload bytes before padding: rows * (cols * bytes per value + bytes per row). */
export function payloadSize(msgType, dtype, rows, cols) {
  const perValue = ITEM_SIZE[dtype] + (msgType === MessageType.OUTPUT ? 4 : 0); // + i32 id
  const perRow = dtype === DType.I8 ? 4 : 0; // f32 scale
  return rows * (cols * perValue + perRow);
}

function exactPayloadSize(msgType, dtype, rows, cols) {
  // The same formula in BigInt, for messages about sizes past 2**53.
  const perValue = BigInt(ITEM_SIZE[dtype] + (msgType === MessageType.OUTPUT ? 4 : 0));
  const perRow = BigInt(dtype === DType.I8 ? 4 : 0);
  return BigInt(rows) * (BigInt(cols) * perValue + perRow);
}

function paddedFrameSize(size) {
  return HEADER_SIZE + Math.ceil(size / ALIGNMENT) * ALIGNMENT;
}

function asBytes(buf) {
  if (buf instanceof ArrayBuffer) return new Uint8Array(buf);
  if (ArrayBuffer.isView(buf)) return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  throw new FrameError(`expected an ArrayBuffer or a typed array, got ${Object.prototype.toString.call(buf)}`);
}

/** Parse and check the 24-byte header at `offset`; the payload is not looked at. */
export function readHeader(buf, offset = 0, { maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES } = {}) {
  const bytes = asBytes(buf);
  const have = bytes.length - offset;
  if (have < HEADER_SIZE) throw new FrameError(`truncated header: need ${HEADER_SIZE} bytes, got ${have}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset + offset, HEADER_SIZE);
  const magic = view.getUint32(0, false);
  if (magic !== MAGIC) {
    const hex = magic.toString(16).padStart(8, "0");
    const hint = view.getUint32(0, true) === MAGIC ? " (byte-swapped: write the ASCII bytes S Y N 1 in order)" : "";
    throw new FrameError(`bad magic ${hex}: expected 53594e31 ("SYN1")${hint}`);
  }
  const reserved = view.getUint8(7);
  if (reserved !== 0) throw new FrameError(`reserved header byte at offset 7 is ${reserved}, must be 0`);
  const header = {
    msgType: checkMessageType(view.getUint8(4)),
    flags: checkFlags(view.getUint8(5)),
    dtype: checkDType(view.getUint8(6)),
    position: view.getUint32(8, true),
    requestId: view.getUint32(12, true),
    rows: view.getUint32(16, true),
    cols: view.getUint32(20, true),
  };
  checkHeader(header, maxPayloadBytes);
  header.payloadSize = payloadSize(header.msgType, header.dtype, header.rows, header.cols);
  header.frameSize = paddedFrameSize(header.payloadSize);
  return header;
}

function checkMessageType(value) {
  if (!(value in TYPE_NAME)) {
    throw new FrameError(
      `unknown message type ${value}: expected 1 (ACTIVATION), 2 (TOKENS), 3 (OUTPUT), 4 (LOGITS) or 5 (STATS)`,
    );
  }
  return value;
}

function checkDType(value) {
  if (!(value in DTYPE_NAME)) {
    throw new FrameError(`unknown dtype ${value}: expected 1 (F32), 2 (F16), 3 (I8) or 4 (I32)`);
  }
  return value;
}

function checkFlags(value) {
  const unknown = value & ~KNOWN_FLAGS;
  if (unknown) {
    const hex = unknown.toString(16).padStart(2, "0");
    throw new FrameError(`unknown flag bits 0x${hex}: only bits 0-3 are defined`);
  }
  for (const flag of RESERVED_FLAGS) {
    if (value & flag) {
      throw new FrameError(`flag ${FLAG_NAME[flag]} is reserved and not supported yet: send frames without it`);
    }
  }
  return value;
}

function checkHeader({ msgType, flags, dtype, rows, cols }, maxPayloadBytes) {
  const allowed = ALLOWED_DTYPES[msgType];
  if (!allowed.includes(dtype)) {
    const names = allowed.map((d) => DTYPE_NAME[d]).join(" or ");
    throw new FrameError(
      `dtype ${DTYPE_NAME[dtype]} is not allowed for ${TYPE_NAME[msgType]} frames: expected ${names}`,
    );
  }
  if (Boolean(flags & Flag.QUANTIZED) !== (dtype === DType.I8)) {
    const hex = flags.toString(16).padStart(2, "0");
    throw new FrameError(
      `flag QUANTIZED must be set exactly when dtype is I8 (flags 0x${hex}, dtype ${DTYPE_NAME[dtype]})`,
    );
  }
  if (flags & Flag.PREDICTED && msgType !== MessageType.TOKENS && msgType !== MessageType.ACTIVATION) {
    throw new FrameError(`flag PREDICTED is for TOKENS and ACTIVATION frames, not ${TYPE_NAME[msgType]}`);
  }
  if (rows < 1 || cols < 1) {
    throw new FrameError(`empty shape (${rows}, ${cols}): rows and cols must both be at least 1`);
  }
  if (msgType === MessageType.TOKENS && cols !== 1) {
    throw new FrameError(`TOKENS frame has cols=${cols}, must be 1 (one token id per position)`);
  }
  if (payloadSize(msgType, dtype, rows, cols) > maxPayloadBytes) {
    const size = exactPayloadSize(msgType, dtype, rows, cols);
    throw new FrameError(
      `payload of ${size} bytes for shape (${rows}, ${cols}) exceeds the limit of ${maxPayloadBytes} bytes`,
    );
  }
}

// A typed array of `count` items at `offset`: a view when aligned, else a copy.
function readArray(bytes, offset, ArrayType, count) {
  const start = bytes.byteOffset + offset;
  if (start % ArrayType.BYTES_PER_ELEMENT === 0) return new ArrayType(bytes.buffer, start, count);
  return new ArrayType(bytes.slice(offset, offset + count * ArrayType.BYTES_PER_ELEMENT).buffer);
}

function decodeAt(bytes, offset, maxPayloadBytes) {
  const header = readHeader(bytes, offset, { maxPayloadBytes });
  const end = offset + header.frameSize;
  if (bytes.length < end) {
    const have = bytes.length - offset;
    throw new FrameError(`truncated frame: header declares ${header.frameSize} bytes, got ${have}`);
  }
  for (let index = offset + HEADER_SIZE + header.payloadSize; index < end; index++) {
    if (bytes[index] !== 0) throw new FrameError(`nonzero padding byte at offset ${index - offset}`);
  }
  const { msgType, flags, dtype, position, requestId, rows, cols } = header;
  const count = rows * cols;
  let at = offset + HEADER_SIZE;
  let tokenIds = null;
  let scales = null;
  if (msgType === MessageType.OUTPUT) {
    tokenIds = readArray(bytes, at, Int32Array, count);
    at += 4 * count;
  }
  if (dtype === DType.I8) {
    scales = readArray(bytes, at, Float32Array, rows);
    at += 4 * rows;
  }
  const data = readArray(bytes, at, ARRAY_TYPE[dtype], count);
  return [{ msgType, flags, dtype, position, requestId, rows, cols, data, tokenIds, scales }, end];
}

/**
 * Bytes holding exactly one frame -> { msgType, flags, dtype, position, requestId, rows, cols,
 * data, tokenIds, scales }. `data` is row-major (rows * cols): Float32Array (F32), Uint16Array of
 * f16 bits (F16), Int8Array (I8, with `scales` Float32Array(rows)) or Int32Array (I32);
 * `tokenIds` is an Int32Array(rows * cols) for OUTPUT frames, else null.
 */
export function decode(buf, { maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES } = {}) {
  const bytes = asBytes(buf);
  const [frame, end] = decodeAt(bytes, 0, maxPayloadBytes);
  if (end !== bytes.length) throw new FrameError(`${bytes.length - end} trailing bytes after a ${end}-byte frame`);
  return frame;
}

/** A message of one or more frames back to back -> frames in order; any defect fails the message. */
export function decodeFrames(
  buf,
  { maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES, maxFrames = DEFAULT_MAX_FRAMES } = {},
) {
  const bytes = asBytes(buf);
  if (bytes.length === 0) throw new FrameError("empty message: it holds no frames");
  const frames = [];
  let offset = 0;
  while (offset < bytes.length) {
    if (frames.length === maxFrames) {
      throw new FrameError(`frame ${frames.length} at byte ${offset}: a message holds at most ${maxFrames} frames`);
    }
    let frame;
    try {
      [frame, offset] = decodeAt(bytes, offset, maxPayloadBytes);
    } catch (error) {
      if (!(error instanceof FrameError)) throw error;
      throw new FrameError(`frame ${frames.length} at byte ${offset}: ${error.message}`);
    }
    frames.push(frame);
  }
  return frames;
}


const DTYPE_OF_ARRAY = new Map([
  [Float32Array, DType.F32],
  [Uint16Array, DType.F16],
  [Int8Array, DType.I8],
  [Int32Array, DType.I32],
]);

function dtypeOf(data) {
  const dtype = DTYPE_OF_ARRAY.get(data?.constructor);
  if (dtype === undefined) {
    const got = Object.prototype.toString.call(data);
    throw new FrameError(`data must be a Float32Array, Uint16Array (f16 bits), Int8Array or Int32Array, got ${got}`);
  }
  return dtype;
}

function checkFrame({ msgType, requestId, position, rows, cols, data, tokenIds, scales }, source) {
  for (const [name, value] of Object.entries({ requestId, position, rows, cols })) {
    if (!Number.isInteger(value) || value < 0 || value > U32_MAX) {
      throw new FrameError(`${name} ${value} does not fit in a u32`);
    }
  }
  if (data.length !== rows * cols) {
    throw new FrameError(`data has ${data.length} values, shape (${rows}, ${cols}) needs ${rows * cols}`);
  }
  if ((tokenIds !== null) !== (msgType === MessageType.OUTPUT)) {
    throw new FrameError("tokenIds go with OUTPUT frames and only with them");
  }
  if (tokenIds !== null && !(tokenIds instanceof Int32Array && tokenIds.length === data.length)) {
    throw new FrameError(`tokenIds must be an Int32Array of ${data.length} ids`);
  }
  if ((scales !== null) !== (source === DType.I8)) {
    throw new FrameError("scales go with Int8Array data and only with it");
  }
  if (scales !== null && !(scales instanceof Float32Array && scales.length === rows)) {
    throw new FrameError(`scales must be a Float32Array of ${rows} values (one per row)`);
  }
}

/**
 * Frame -> Uint8Array. A frame is { msgType, requestId, position, rows, cols, data, tokenIds?,
 * scales?, flags? } as decode returns it; `dtype` converts on the way (F32 data -> F16 or I8),
 * omitted it keeps the dtype of `data`. QUANTIZED is set from the dtype written.
 */
export function encode(frame, { dtype } = {}) {
  const { msgType, requestId, position, rows, cols, data } = frame;
  const { tokenIds = null, scales = null, flags = 0 } = frame;
  checkMessageType(msgType);
  const source = dtypeOf(data);
  const target = checkDType(dtype ?? source);
  const outFlags = checkFlags((flags & ~Flag.QUANTIZED) | (target === DType.I8 ? Flag.QUANTIZED : 0));
  checkFrame({ msgType, requestId, position, rows, cols, data, tokenIds, scales }, source);
  checkHeader({ msgType, flags: outFlags, dtype: target, rows, cols }, Infinity);
  if ((source === DType.I32) !== (target === DType.I32)) {
    throw new FrameError(`${DTYPE_NAME[source]} data cannot be written as ${DTYPE_NAME[target]}`);
  }
  const count = rows * cols;
  const out = new Uint8Array(paddedFrameSize(payloadSize(msgType, target, rows, cols)));
  const view = new DataView(out.buffer);
  view.setUint32(0, MAGIC, false);
  [msgType, outFlags, target, 0].forEach((value, index) => view.setUint8(4 + index, value));
  [position, requestId, rows, cols].forEach((value, index) => view.setUint32(8 + 4 * index, value, true));
  let at = HEADER_SIZE;
  if (tokenIds !== null) {
    new Int32Array(out.buffer, at, count).set(tokenIds);
    at += 4 * count;
  }
  if (target === DType.I8) {
    const quantized = source === DType.I8 ? { values: data, scales } : quantizeInt8(toFloat32(frame), rows, cols);
    new Float32Array(out.buffer, at, rows).set(quantized.scales);
    new Int8Array(out.buffer, at + 4 * rows, count).set(quantized.values);
  } else if (target === source) {
    new ARRAY_TYPE[target](out.buffer, at, count).set(data);
  } else {
    const values = toFloat32(frame);
    new ARRAY_TYPE[target](out.buffer, at, count).set(target === DType.F16 ? f32ToF16Bits(values) : values);
  }
  return out;
}

/** Several frames back to back in one message (a batch for one step); `dtype` applies to each. */
export function encodeFrames(frames, options = {}) {
  const encoded = frames.map((frame) => encode(frame, options));
  if (encoded.length === 0) throw new FrameError("empty message: it holds no frames");
  const out = new Uint8Array(encoded.reduce((total, bytes) => total + bytes.length, 0));
  let offset = 0;
  for (const bytes of encoded) {
    out.set(bytes, offset);
    offset += bytes.length;
  }
  return out;
}

/**
 * Hidden states, row-major (positions * n_embd); Int8Array data needs its per-row `scales`. `predicted`:
 * the rows after the first are a speculative draft, which the last stage answers row by row (PREDICTED).
 */
export function activation({ requestId, position, rows, cols, data, scales = null, predicted = false }) {
  const flags = predicted ? Flag.PREDICTED : Flag.NONE;
  return { msgType: MessageType.ACTIVATION, flags, requestId, position, rows, cols, data, scales };
}

/** Token ids (positions) into the first stage; rows = ids, cols = 1. */
export function tokens({ requestId, position, tokenIds }) {
  const data = Int32Array.from(tokenIds);
  return { msgType: MessageType.TOKENS, requestId, position, rows: data.length, cols: 1, data };
}

/** Top-K of the last stage: values (Float32Array or f16 bits) and Int32Array ids, both rows * K. */
export function output({ requestId, position, rows, cols, values, tokenIds }) {
  return { msgType: MessageType.OUTPUT, requestId, position, rows, cols, data: values, tokenIds };
}

/** Full logits, row-major (positions * vocab). */
export function logits({ requestId, position, rows, cols, data }) {
  return { msgType: MessageType.LOGITS, requestId, position, rows, cols, data };
}

/** A frame's values as a Float32Array: int8 dequantized, f16 widened, f32 returned as is. */
export function toFloat32({ data, scales = null, rows, cols }) {
  const source = dtypeOf(data);
  if (source === DType.F32) return data;
  if (source === DType.F16) return f16BitsToF32(data);
  if (source === DType.I8) return dequantizeInt8(data, scales, rows, cols);
  throw new FrameError("I32 data holds token ids, not values");
}

// Round half to even, like numpy's rint.
function roundHalfEven(x) {
  const rounded = Math.round(x); // halves go up
  return rounded - x === 0.5 && rounded % 2 !== 0 ? rounded - 1 : rounded;
}

/**
 * Symmetric per-row int8, bit-identical to services.wire.syn1.quantize_int8: scale = max|x| / 127
 * in f32, q = roundHalfEven(x / scale) clamped to [-127, 127]; an all-zero row gets scale 0.
 */
export function quantizeInt8(data, rows, cols) {
  const values = new Int8Array(rows * cols);
  const scales = new Float32Array(rows);
  for (let row = 0; row < rows; row++) {
    let max = 0;
    for (let index = row * cols; index < (row + 1) * cols; index++) {
      if (!Number.isFinite(data[index])) throw new FrameError("cannot quantize non-finite values (inf or nan) to int8");
      max = Math.max(max, Math.abs(data[index]));
    }
    scales[row] = Math.fround(max / 127);
    const divisor = scales[row] > 0 ? scales[row] : 1;
    for (let index = row * cols; index < (row + 1) * cols; index++) {
      // f32 / f32 rounded once to f32 equals IEEE f32 division, as numpy does it.
      const quantized = roundHalfEven(Math.fround(data[index] / divisor));
      values[index] = Math.max(-127, Math.min(127, quantized));
    }
  }
  return { values, scales };
}

/** Int8Array(rows * cols) and Float32Array(rows) scales -> Float32Array of q * scale. */
export function dequantizeInt8(values, scales, rows, cols) {
  const out = new Float32Array(rows * cols);
  for (let row = 0; row < rows; row++) {
    for (let index = row * cols; index < (row + 1) * cols; index++) out[index] = values[index] * scales[row];
  }
  return out;
}

// One f32 bit pattern -> f16 bits, round to nearest even; NaN keeps its top payload bits (numpy's rule).
function f32BitsToF16Bits(bits) {
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) {
    if (mantissa === 0) return sign | 0x7c00; // inf
    return sign | 0x7c00 | (mantissa >>> 13 || 1); // NaN keeps its top payload bits and stays NaN
  }
  const halfExponent = exponent - 112; // rebias 127 -> 15
  if (halfExponent >= 0x1f) return sign | 0x7c00; // overflow to inf
  if (halfExponent <= 0) {
    if (halfExponent < -10) return sign; // below half the smallest subnormal: signed zero
    const shift = 14 - halfExponent; // 14..24: subnormal half = full significand >> shift
    const significand = mantissa | 0x800000;
    return sign | roundShift(significand, shift); // a carry into the exponent is still right
  }
  return sign | roundShift((halfExponent << 23) | mantissa, 13); // a carry can reach inf: right too
}

function roundShift(value, shift) {
  const kept = value >>> shift;
  const rest = value - kept * 2 ** shift;
  const half = 2 ** (shift - 1);
  return rest > half || (rest === half && kept & 1) ? kept + 1 : kept;
}

// One f16 bit pattern -> f32 bits (exact).
function f16BitsToF32Bits(half) {
  const sign = (half & 0x8000) << 16;
  const exponent = (half >>> 10) & 0x1f;
  let mantissa = half & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent !== 0) return (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0;
  if (mantissa === 0) return sign >>> 0;
  let floatExponent = 113; // subnormal: normalize so the leading 1 becomes implicit
  while (!(mantissa & 0x400)) {
    mantissa <<= 1;
    floatExponent--;
  }
  return (sign | (floatExponent << 23) | ((mantissa & 0x3ff) << 13)) >>> 0;
}

/** Float32Array -> Uint16Array of f16 bits, rounding like numpy's astype(float16). */
export function f32ToF16Bits(values) {
  // Read the bits through a view: a round trip through JS numbers may change NaN payloads.
  const floats = values instanceof Float32Array ? values : Float32Array.from(values);
  const bits = new Uint32Array(floats.buffer, floats.byteOffset, floats.length);
  return Uint16Array.from(bits, f32BitsToF16Bits);
}

/** Uint16Array of f16 bits -> Float32Array (exact). */
export function f16BitsToF32(halves) {
  const bits = Uint32Array.from(halves, f16BitsToF32Bits);
  return new Float32Array(bits.buffer);
}
