"""The safetensors file format with numpy only (no torch): parse a file's bytes into arrays, build a header.

Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (plus an optional
"__metadata__"), then every tensor's little-endian bytes; the data spans tile the rest of the file exactly.
numpy has no bfloat16, so BF16 tensors are widened to float32 (exact: a bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import DataLoss, NotFound

# safetensors dtype code -> numpy dtype as stored (BF16 is read as raw 16-bit words, then widened).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES = {"float32": "F32", "float16": "F16"}  # the dtypes Synapse writes
MAX_HEADER_BYTES = 100 << 20  # the limit the safetensors library itself enforces
CHUNK_BYTES = 1 << 20


def read_file(path: Path, expected_size: int | None = None, digest: Any = None) -> bytearray:
    """The whole file in one writable buffer (arrays view it without a copy), fed to `digest` as it is read.

    DataLoss when the size differs from `expected_size` or the file shrinks while it is read.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    if expected_size is not None and size != expected_size:
        raise DataLoss(f"{path} is {size} bytes but its manifest says {expected_size}: truncated or replaced")
    buffer = bytearray(size)
    view, filled = memoryview(buffer), 0
    with path.open("rb") as handle:
        while filled < size:
            count = handle.readinto(view[filled : filled + CHUNK_BYTES])
            if not count:
                raise DataLoss(f"{path} shrank while it was read")
            if digest is not None:
                digest.update(view[filled : filled + count])
            filled += count
    return buffer


def parse(buffer: bytearray, source: str | Path, codes: Iterable[str] = DTYPES) -> dict[str, np.ndarray]:
    """Arrays viewing `buffer` (BF16 widened to float32, copies), in header order, after checking the header
    and that the data spans tile the file. DataLoss names `source` and what is wrong."""
    allowed = set(codes)
    length = int.from_bytes(buffer[:8], "little") if len(buffer) >= 8 else -1
    if not 0 < length <= min(len(buffer) - 8, MAX_HEADER_BYTES):
        raise DataLoss(f"{source} is not a safetensors file (bad header length)")
    try:
        header = json.loads(bytes(buffer[8 : 8 + length]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataLoss(f"{source} header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise DataLoss(f"{source} header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, arrays, spans = 8 + length, {}, []
    for name, entry in header.items():
        code, shape, (begin, end) = _entry(entry, source, name)
        if code not in allowed or code not in DTYPES:
            readable = ", ".join(sorted(allowed & DTYPES.keys()))
            raise DataLoss(f"{source}: tensor {name!r} has dtype {code}; Synapse reads {readable} here")
        dtype, count = DTYPES[code], math.prod(shape)
        if end - begin != count * dtype.itemsize or data_start + end > len(buffer):
            raise DataLoss(f"{source}: header entry for {name!r} is malformed or out of bounds")
        spans.append((begin, end))
        arrays[name] = _array(buffer, data_start + begin, dtype, shape, widen=code == "BF16")
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            break
        position = end
    if position != len(buffer) - data_start:
        raise DataLoss(f"{source}: tensor data has gaps, overlaps or trailing bytes")
    return arrays


def _entry(entry: Any, source: str | Path, name: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    try:
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        valid = isinstance(code, str) and all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise DataLoss(f"{source}: header entry for {name!r} is malformed or out of bounds")
    return code, shape, (begin, end)


def _array(buffer: bytearray, offset: int, dtype: np.dtype, shape: tuple[int, ...], *, widen: bool) -> np.ndarray:
    count = math.prod(shape)
    if not count:
        return np.empty(shape, dtype=np.float32 if widen else dtype)
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
    if widen:
        return (array.astype(np.uint32) << 16).view(np.float32)  # bfloat16 bits are a float32's top half
    if offset % dtype.itemsize:
        array = array.copy()  # misaligned (not written by Synapse): copy into aligned memory
    return array


def header_bytes(shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: str, metadata: dict[str, str]) -> bytes:
    """8-byte little-endian length + JSON header for tensors of one dtype in this order, padded with spaces so
    the data starts 8-aligned."""
    code, itemsize = CODES[dtype], DTYPES[CODES[dtype]].itemsize
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape) * itemsize
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
