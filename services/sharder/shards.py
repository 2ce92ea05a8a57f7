"""Shard files: one safetensors file per layer range plus a JSON manifest, written atomically, read verified.

docs/shards.md describes the format. The model index (model.json) lists a folder's shards. numpy only, no torch:
the bytes are the ones the torch sharder wrote (tests/unit/test_shard_bytes.py pins them).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, SynapseError
from services.common.gpt2 import safetensors_file
from services.common.gpt2.checkpoint import Checkpoint, all_finite, expected_shapes, stage_tensor_names
from services.common.gpt2.config import GPT2Config
from services.sharder.manifest import (  # noqa: F401 - re-exported: the shard API in one import
    FORMAT_VERSION,
    INDEX_FILE,
    ModelIndex,
    ShardManifest,
    TensorInfo,
    model_slug,
    parse_json,
    shard_id,
)

# Shard dtype -> numpy dtype of its little-endian data.
SHARD_DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def even_ranges(n_layer: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, n_layer) into `parts` contiguous ranges whose sizes differ by at most one (larger first)."""
    if not 1 <= parts <= n_layer:
        raise InvalidArgument(f"cannot split {n_layer} layers into {parts} parts; use 1 to {n_layer} parts")
    base, extra = divmod(n_layer, parts)
    ranges, start = [], 0
    for part in range(parts):
        end = start + base + (1 if part < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def write_shard(
    checkpoint: Checkpoint, start: int, end: int, out_dir: str | Path, *, dtype: str = "float16"
) -> ShardManifest:
    """Write layers [start, end) of `checkpoint` as `dtype` to out_dir, then its manifest and the index."""
    return write_shards(checkpoint, [(start, end)], out_dir, dtype=dtype, progress=False)[0]


def write_shards(
    checkpoint: Checkpoint,
    ranges: Iterable[tuple[int, int]],
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    progress: bool = True,
) -> list[ShardManifest]:
    """Write one shard per range (a tqdm bar counts bytes), then the folder's model.json. All or nothing: every
    shard is written to temp files first and only then are they renamed into place, so a failure halfway
    leaves the folder, model.json included, as it was."""
    ranges = list(ranges)
    if not ranges:
        raise InvalidArgument("no layer ranges given; pass e.g. even_ranges(n_layer, parts)")
    _numpy_dtype(dtype)
    for start, end in ranges:
        checkpoint.config.check_layer_range(start, end)
    _check_folder(Path(out_dir), checkpoint.model_id, checkpoint.config)
    total = sum(_data_bytes(checkpoint.config, start, end, dtype) for start, end in ranges)
    directory = Path(out_dir)
    staged: list[tuple[ShardManifest, list[tuple[Path, Path]]]] = []
    try:
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"sharding {checkpoint.model_id}", disable=not progress
        ) as bar:
            for start, end in ranges:
                staged.append(_stage_shard(checkpoint, start, end, directory, dtype, progress=bar.update))
    except BaseException:
        for _, moves in staged:
            for temp, _final in moves:
                temp.unlink(missing_ok=True)
        raise
    try:  # every data file, then every manifest: a manifest never names a file that is not there yet
        _commit(directory, [moves[0] for _, moves in staged] + [moves[1] for _, moves in staged])
    finally:  # model.json is derived from the manifests on disk: rebuilt even when a rename failed
        _update_index(directory, checkpoint.model_id, checkpoint.config)
    return [manifest for manifest, _ in staged]


def read_manifest(path: str | Path) -> ShardManifest:
    """Read and validate a shard manifest file."""
    return ShardManifest.from_json(_read_text(Path(path)), source=str(path))


def read_index(directory: str | Path) -> ModelIndex:
    """Read the model.json of a shard folder."""
    path = Path(directory) / INDEX_FILE
    return ModelIndex.from_json(_read_text(path), source=str(path))


def read_shard(
    manifest: ShardManifest | str | Path, directory: str | Path | None = None, *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Load a shard's tensors as numpy arrays viewing one buffer, checking its size, its sha256 (unless
    verify=False) and every tensor. The native node wraps them with torch.from_numpy (no copy).

    `manifest` is a ShardManifest (then `directory` is the folder of its file) or a manifest's path
    (its folder is the default `directory`).
    """
    if not isinstance(manifest, ShardManifest):
        path = Path(manifest)
        manifest, directory = read_manifest(path), directory or path.parent
    elif directory is None:
        raise InvalidArgument(f"pass the folder that holds {manifest.file}")
    data_path = Path(directory) / manifest.file
    buffer = _read_file(data_path, manifest, verify=verify)
    tensors = _parse_safetensors(buffer, data_path)
    found = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    wanted = {t.name: (t.shape, SHARD_DTYPES[t.dtype]) for t in manifest.tensors}
    differing = sorted(name for name in wanted.keys() | found.keys() if wanted.get(name) != found.get(name))
    if differing:
        raise DataLoss(
            f"{data_path} does not hold the tensors its manifest lists: {differing[:3]} are missing, "
            "extra or of another shape or dtype; delete it and re-shard"
        )
    return tensors


def _stage_shard(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    out_dir: Path,
    dtype: str,
    progress: Callable[[int], object],
) -> tuple[ShardManifest, list[tuple[Path, Path]]]:
    """Write one shard's data and manifest to temp files; returns the manifest and the renames that publish it."""
    config, target = checkpoint.config, _numpy_dtype(dtype)
    config.check_layer_range(start, end)
    names = stage_tensor_names(config, start, end)
    shapes = expected_shapes(config)
    for name in names:
        tensor = checkpoint.tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shapes[name]:
            found = "missing" if tensor is None else f"shape {list(tensor.shape)}"
            raise InvalidArgument(f"checkpoint tensor {name!r} is {found}; expected shape {list(shapes[name])}")
    identity = shard_id(checkpoint.model_id, start, end, dtype)
    metadata = {"format": "pt", "synapse_shard": identity}  # "pt": what readers expect of a GPT-2 checkpoint
    header = safetensors_file.header_bytes(((name, shapes[name]) for name in names), dtype, metadata)
    digest = hashlib.sha256(header)

    def write_data(handle: BinaryIO) -> None:
        handle.write(header)
        for name in names:  # one converted tensor in memory at a time
            source = np.asarray(checkpoint.tensors[name])
            # Round to nearest even, as torch's .to() did; no copy when the dtype already matches.
            with np.errstate(over="ignore"):  # an overflow is caught just below, with the tensor's name
                tensor = np.ascontiguousarray(source, dtype=target)
            if tensor.dtype != source.dtype and not all_finite(tensor):  # narrowing can overflow to inf
                raise InvalidArgument(f"tensor {name!r} overflows {dtype}; shard as float32")
            data = memoryview(tensor).cast("B")
            digest.update(data)
            handle.write(data)
            progress(len(data))

    out_dir.mkdir(parents=True, exist_ok=True)
    data_temp = _write_temp(out_dir, write_data)
    manifest = ShardManifest(
        shard_id=identity,
        model_id=checkpoint.model_id,
        config=config,
        layer_start=start,
        layer_end=end,
        dtype=dtype,
        file=f"{identity}.safetensors",
        byte_size=data_temp.stat().st_size,
        sha256=digest.hexdigest(),
        tensors=tuple(TensorInfo(name, shapes[name], dtype) for name in names),
        source_sha256=checkpoint.fingerprint,
    )
    try:
        manifest_temp = _write_temp(out_dir, lambda handle: handle.write(manifest.to_json().encode()))
    except BaseException:
        data_temp.unlink(missing_ok=True)
        raise
    return manifest, [(data_temp, out_dir / manifest.file), (manifest_temp, out_dir / f"{identity}.json")]


def _data_bytes(config: GPT2Config, start: int, end: int, dtype: str) -> int:
    shapes = expected_shapes(config)
    itemsize = _numpy_dtype(dtype).itemsize
    return sum(math.prod(shapes[name]) * itemsize for name in stage_tensor_names(config, start, end))


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in SHARD_DTYPES:
        raise InvalidArgument(f"unsupported shard dtype {dtype!r}; use one of {sorted(SHARD_DTYPES)}")
    return SHARD_DTYPES[dtype]


def _write_temp(directory: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a hidden temp file in `directory` and fsync it; on any error remove it and re-raise."""
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    path = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; shards are served to other processes
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _commit(directory: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename temp files into place in order (manifest last); on failure undo, leaving no new file."""
    done: list[Path] = []
    try:
        for temp, final in moves:
            os.replace(temp, final)
            done.append(final)
    except BaseException:
        for temp, final in moves:
            temp.unlink(missing_ok=True)
            if final in done:
                final.unlink(missing_ok=True)
        raise
    try:  # make the renames durable; not every filesystem lets a directory be fsynced
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass


def _check_folder(directory: Path, model_id: str, config: GPT2Config) -> None:
    """Refuse, before writing anything, a folder whose model.json is another model's (or other shapes)."""
    index_path = directory / INDEX_FILE
    try:
        existing = ModelIndex.from_json(index_path.read_bytes(), source=str(index_path))
    except (FileNotFoundError, SynapseError):
        return  # no index yet, or a broken one: it is derived data, rebuilt after writing
    if (existing.model_id, existing.config) != (model_id, config):
        raise FailedPrecondition(
            f"{directory} already holds shards of {existing.model_id!r} ({existing.config}); "
            "give each model its own folder, or delete that one"
        )


def _update_index(directory: Path, model_id: str, config: GPT2Config) -> ModelIndex:
    """Rebuild model.json from the folder's manifests of this model (it is derived data)."""
    index_path = directory / INDEX_FILE
    manifests = [read_manifest(path) for path in sorted(directory.glob(f"{model_slug(model_id)}-L*.json"))]
    manifests = [m for m in manifests if (m.model_id, m.config) == (model_id, config)]
    manifests.sort(key=lambda m: (m.dtype, m.layer_start, m.layer_end))
    index = ModelIndex(model_id, config, tuple(manifests))
    temp = _write_temp(directory, lambda handle: handle.write(index.to_json().encode()))
    _commit(directory, [(temp, index_path)])
    return index


def _read_file(path: Path, manifest: ShardManifest, *, verify: bool) -> bytearray:
    """The whole file, hashed while it is read; DataLoss on a size or sha256 mismatch."""
    digest = hashlib.sha256() if verify else None
    try:
        buffer = safetensors_file.read_file(path, manifest.byte_size, digest)
    except NotFound:
        raise NotFound(f"shard file {path} does not exist; re-shard or download it again") from None
    except DataLoss as error:
        raise DataLoss(f"{error}; delete it and re-shard") from None
    if digest is not None and digest.hexdigest() != manifest.sha256:
        raise DataLoss(
            f"{path} is corrupt: its sha256 is {digest.hexdigest()} but the manifest says {manifest.sha256}; "
            "delete it and re-shard"
        )
    return buffer


def _parse_safetensors(buffer: bytearray, path: Path) -> dict[str, np.ndarray]:
    """Arrays viewing `buffer` (no copy), after checking the header and that data spans tile the file."""
    codes = [safetensors_file.CODES[dtype] for dtype in SHARD_DTYPES]
    try:
        return safetensors_file.parse(buffer, path, codes)
    except DataLoss as error:
        raise DataLoss(f"{error}; delete it and re-shard") from None


def _read_text(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist; write the shards first (`synapse shard`)") from None
