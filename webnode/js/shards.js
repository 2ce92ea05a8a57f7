// Shards: download with progress (fetch streaming), sha256 check (crypto.subtle), an IndexedDB cache keyed by
// sha256 so a reload downloads nothing, a narrower shard cut from a held one instead of downloaded (verified by
// its sha256 all the same), and the safetensors parser and writer (docs/shards.md).

const DB_NAME = "synapse-shards";
const STORE = "shards";
const KEEP_SHARDS = 3; // newest shards kept in IndexedDB; older ones are deleted when a new one is stored
const DTYPE_BYTES = { F16: 2, F32: 4 };
const SAFETENSORS_DTYPES = { float16: "F16", float32: "F32" };
const SHARD_ID = /^(?<model>.+)-L(?<start>\d+)-(?<end>\d+)-(?<dtype>float16|float32)$/; // docs/shards.md

/** A shard that cannot be used (bad download, bad file); the node reports it and stays. */
export class ShardError extends Error {
  constructor(message) {
    super(message);
    this.name = "ShardError";
  }
}

/**
 * @typedef {{shard_id: string, sha256: string, size_bytes: number, shard_url: string, manifest_url: string,
 *   layers: number[]}} Assignment  what an assign message names
 * @typedef {{sha256: string, manifest: object}} HeldShard  a verified shard in IndexedDB
 * @typedef {{manifest: object, bytes: Uint8Array, source: "cache" | "held" | "download", warning: string | null}} Shard
 */

/**
 * The assigned shard's manifest and bytes: from IndexedDB when its sha256 is there; else cut from `held`
 * when that holds every tensor of it and the cut file has the assigned sha256; else downloaded, verified
 * and stored. A shard that is not downloaded is stored too, so a reload finds it.
 * @param {Assignment} assign
 * @param {(done: number, total: number) => void} onProgress called for every chunk received
 * @param {AbortSignal} signal a newer assignment aborts this one
 * @param {HeldShard | null} held a shard this node verified before (the loaded one, or the one a
 *   superseded load fetched)
 * @returns {Promise<Shard>}
 */
export async function fetchShard(assign, onProgress, signal, held = null) {
  const stored = await readCache(assign.sha256).catch(() => null);
  if (stored) {
    const bytes = new Uint8Array(await stored.data.arrayBuffer());
    onProgress(bytes.length, bytes.length);
    return { manifest: stored.manifest, bytes, source: "cache", warning: null };
  }
  const manifest = await fetchManifest(assign, signal);
  const cut = held && holdsAll(held.manifest, manifest) ? await cutShard(held, manifest) : null;
  if (cut && (await sha256Hex(cut)) === assign.sha256) {
    onProgress(cut.length, cut.length);
    return { manifest, bytes: cut, source: "held", warning: await store(assign.sha256, manifest, cut) };
  }
  const bytes = await download(assign.shard_url, manifest.byte_size, onProgress, signal);
  const digest = await sha256Hex(bytes);
  if (digest !== assign.sha256) {
    throw new ShardError(
      `shard ${assign.shard_id}: sha256 mismatch: expected ${assign.sha256}, got ${digest} ` +
        `(${bytes.length} bytes from ${assign.shard_url}); the download is corrupt and was not cached`,
    );
  }
  return { manifest, bytes, source: "download", warning: await store(digest, manifest, bytes) };
}

/** Store a verified shard in IndexedDB; a warning when that failed (quota), else null. */
async function store(sha256, manifest, bytes) {
  try {
    await writeCache({ sha256, manifest, data: new Blob([bytes]), storedAt: Date.now() });
    return null;
  } catch (error) {
    return `shard not cached in IndexedDB (${error.name}: ${error.message}); a reload downloads it again`;
  }
}

/**
 * Whether the shard `heldId` (layers `held`) may hold every tensor of `wantedId` (layers `wanted`): the same
 * model and dtype by their shard ids, and the wanted range inside the held one. A guess from names only, for
 * deciding to let a load finish; cutting the shard checks the manifests and the sha256.
 */
export function mayHold(heldId, held, wantedId, wanted) {
  const [a, b] = [SHARD_ID.exec(heldId)?.groups, SHARD_ID.exec(wantedId)?.groups];
  if (!a || !b || a.model !== b.model || a.dtype !== b.dtype) return false;
  return held[0] <= wanted[0] && wanted[1] <= held[1];
}

/** Whether the shard of manifest `held` has every tensor of `wanted` (same model, config, dtype and shapes). */
function holdsAll(held, wanted) {
  const same = (key) => JSON.stringify(held[key]) === JSON.stringify(wanted[key]);
  if (!same("model_id") || !same("config") || !same("dtype")) return false;
  const shapes = new Map(held.tensors.map(({ name, shape }) => [name, JSON.stringify(shape)]));
  return wanted.tensors.every(({ name, shape }) => shapes.get(name) === JSON.stringify(shape));
}

/**
 * The file of `manifest` as the sharder writes it, with the tensors taken from the held shard (read from
 * IndexedDB); null when that shard is no longer stored or no longer parses.
 * @returns {Promise<Uint8Array | null>}
 */
async function cutShard(held, manifest) {
  const stored = await readCache(held.sha256).catch(() => null);
  if (!stored) return null;
  let tensors;
  try {
    tensors = parseSafetensors(new Uint8Array(await stored.data.arrayBuffer()), held.manifest);
  } catch {
    return null; // a bad stored copy: download instead
  }
  const header = safetensorsHeader(manifest);
  const parts = manifest.tensors.map(({ name }) => tensors.get(name).bytes);
  const size = parts.reduce((total, part) => total + part.length, header.length);
  if (size !== manifest.byte_size) return null;
  const bytes = new Uint8Array(size);
  bytes.set(header);
  let offset = header.length;
  for (const part of parts) {
    bytes.set(part, offset);
    offset += part.length;
  }
  return bytes;
}

/**
 * The safetensors header the sharder writes (services/sharder/shards.py, _safetensors_header): 8-byte
 * little-endian length, then compact JSON of __metadata__ and each tensor in file order, padded with spaces
 * to a multiple of 8 bytes.
 * @param {{shard_id: string, dtype: string, tensors: {name: string, shape: number[]}[]}} manifest
 */
export function safetensorsHeader(manifest) {
  const code = SAFETENSORS_DTYPES[manifest.dtype];
  const entries = { __metadata__: { format: "pt", synapse_shard: manifest.shard_id } };
  let offset = 0;
  for (const { name, shape } of manifest.tensors) {
    const size = shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[code];
    entries[name] = { dtype: code, shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  const text = new TextEncoder().encode(JSON.stringify(entries));
  const padded = new Uint8Array(8 + Math.ceil(text.length / 8) * 8).fill(0x20); // spaces
  new DataView(padded.buffer).setBigUint64(0, BigInt(padded.length - 8), true);
  padded.set(text, 8);
  return padded;
}

async function fetchManifest(assign, signal) {
  const response = await fetch(assign.manifest_url, { signal, cache: "no-store" });
  if (!response.ok) throw new ShardError(`manifest ${assign.manifest_url}: HTTP ${response.status}`);
  let manifest;
  try {
    manifest = await response.json();
  } catch (error) {
    throw new ShardError(`manifest ${assign.manifest_url} is not JSON: ${error.message}`);
  }
  const [start, end] = assign.layers;
  if (manifest.sha256 !== assign.sha256 || manifest.layer_start !== start || manifest.layer_end !== end) {
    throw new ShardError(
      `manifest ${assign.manifest_url} describes layers [${manifest.layer_start}, ${manifest.layer_end}) with sha256 ` +
        `${manifest.sha256}; the assignment wants [${start}, ${end}) with ${assign.sha256}`,
    );
  }
  if (manifest.byte_size !== assign.size_bytes) {
    throw new ShardError(
      `manifest ${assign.manifest_url} says ${manifest.byte_size} bytes; the assignment says ${assign.size_bytes}`,
    );
  }
  if (!["float16", "float32"].includes(manifest.dtype)) {
    throw new ShardError(`shard dtype ${manifest.dtype} is not supported`);
  }
  return manifest;
}

async function download(url, size, onProgress, signal) {
  const response = await fetch(url, { signal, cache: "no-store" });
  if (!response.ok) throw new ShardError(`shard ${url}: HTTP ${response.status} ${response.statusText}`);
  const bytes = new Uint8Array(size);
  const reader = response.body.getReader();
  let done = 0;
  onProgress(0, size);
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    if (done + value.length > size) throw new ShardError(`shard ${url} is larger than its manifest's ${size} bytes`);
    bytes.set(value, done);
    done += value.length;
    if (done < size) onProgress(done, size);
  }
  if (done !== size) throw new ShardError(`shard ${url} ended after ${done} of ${size} bytes`);
  onProgress(done, size);
  return bytes;
}

/** Lowercase hex SHA-256 of `bytes` (crypto.subtle: secure contexts only, i.e. https or localhost). */
export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// ---- IndexedDB ----

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "sha256" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function transact(db, mode, body) {
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const result = body(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(result.result);
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error ?? new Error("IndexedDB transaction aborted"));
  });
}

async function readCache(sha256) {
  const db = await openDb();
  try {
    return (await transact(db, "readonly", (store) => store.get(sha256))) ?? null;
  } finally {
    db.close();
  }
}

async function writeCache(record) {
  const db = await openDb();
  try {
    const keys = await transact(db, "readonly", (store) => store.getAllKeys());
    const old = await Promise.all(keys.map((key) => transact(db, "readonly", (store) => store.get(key))));
    const stale = old
      .filter((entry) => entry && entry.sha256 !== record.sha256)
      .sort((a, b) => b.storedAt - a.storedAt)
      .slice(KEEP_SHARDS - 1);
    for (const entry of stale) await transact(db, "readwrite", (store) => store.delete(entry.sha256));
    await transact(db, "readwrite", (store) => store.put(record));
  } finally {
    db.close();
  }
}

/** sha256 keys of the shards in the IndexedDB cache (for the status view and tests). */
export async function cachedShards() {
  const db = await openDb();
  try {
    return await transact(db, "readonly", (store) => store.getAllKeys());
  } finally {
    db.close();
  }
}

// ---- safetensors ----

/**
 * Parse a safetensors file and check it against the manifest's tensor list (names, shapes, dtype).
 * @param {Uint8Array} bytes the whole file
 * @param {{dtype: string, tensors: {name: string, shape: number[]}[]}} manifest
 * @returns {Map<string, import("./weights.js").Tensor>} views into `bytes`, no copies
 */
export function parseSafetensors(bytes, manifest) {
  if (bytes.length < 8) throw new ShardError(`safetensors file of ${bytes.length} bytes has no header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength > bytes.length - 8 || headerLength > 100 << 20) {
    throw new ShardError(`safetensors header length ${headerLength} does not fit the ${bytes.length}-byte file`);
  }
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  } catch (error) {
    throw new ShardError(`safetensors header is not JSON: ${error.message}`);
  }
  const dataStart = 8 + headerLength;
  const want = manifest.dtype === "float16" ? "F16" : "F32";
  const tensors = new Map();
  for (const { name, shape } of manifest.tensors) {
    const entry = header[name];
    if (!entry) throw new ShardError(`safetensors file lacks tensor ${name}`);
    const [begin, end] = entry.data_offsets ?? [];
    const count = shape.reduce((a, b) => a * b, 1);
    if (entry.dtype !== want || JSON.stringify(entry.shape) !== JSON.stringify(shape)) {
      const [got, wanted] = [entry.shape, shape].map((dims) => JSON.stringify(dims));
      throw new ShardError(`tensor ${name} is ${entry.dtype} ${got}; the manifest says ${want} ${wanted}`);
    }
    if (!(begin >= 0 && end - begin === count * DTYPE_BYTES[want] && dataStart + end <= bytes.length)) {
      throw new ShardError(`tensor ${name} has data offsets [${begin}, ${end}) outside the file or of the wrong size`);
    }
    tensors.set(name, { dtype: want, shape, bytes: bytes.subarray(dataStart + begin, dataStart + end) });
  }
  return tensors;
}
