"""Shard manifests and the model index (model.json): what a shard file holds, as validated JSON.

docs/shards.md describes the format; services/sharder/shards.py writes and reads the files.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.common.gpt2.checkpoint import expected_shapes, stage_tensor_names
from services.common.gpt2.config import GPT2Config

FORMAT_VERSION = 1
INDEX_FILE = "model.json"
SHARD_DTYPE_NAMES = ("float16", "float32")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FLAT_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")  # a JSON list of numbers, spread over lines


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard: canonical name (global layer numbers), shape, dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ShardManifest:
    """What a shard file holds and how to check it: layers [layer_start, layer_end) of one model."""

    shard_id: str
    model_id: str
    config: GPT2Config
    layer_start: int
    layer_end: int
    dtype: str  # "float16" or "float32"
    file: str  # the safetensors file's name, in the manifest's folder
    byte_size: int
    sha256: str  # hex digest of the whole safetensors file
    tensors: tuple[TensorInfo, ...]
    format_version: int = FORMAT_VERSION
    source_sha256: str = ""  # the checkpoint's fingerprint (Checkpoint.fingerprint) it was cut from; "" = unknown

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.config.n_layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "shard_id": self.shard_id,
            "model_id": self.model_id,
            "config": self.config.to_dict(),
            "layer_start": self.layer_start,
            "layer_end": self.layer_end,
            "n_layer": self.n_layer,
            "is_first": self.is_first,
            "is_last": self.is_last,
            "dtype": self.dtype,
            "file": self.file,
            "byte_size": self.byte_size,
            "sha256": self.sha256,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors],
            "source_sha256": self.source_sha256,
        }

    def to_json(self) -> str:
        return _dump_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "shard manifest") -> ShardManifest:
        """Parse and cross-check a manifest; DataLoss says which field of `source` is wrong."""
        fields = _Fields(data, source)
        version = fields.get("format_version", int)
        if version != FORMAT_VERSION:
            raise FailedPrecondition(
                f"{source} has format_version {version}; this Synapse reads version {FORMAT_VERSION}: "
                "upgrade Synapse or re-shard the model"
            )
        config = _config(fields, source)
        manifest = cls(
            shard_id=fields.get("shard_id", str),
            model_id=fields.get("model_id", str),
            config=config,
            layer_start=fields.get("layer_start", int),
            layer_end=fields.get("layer_end", int),
            dtype=fields.get("dtype", str),
            file=fields.get("file", str),
            byte_size=fields.get("byte_size", int),
            sha256=fields.get("sha256", str),
            tensors=tuple(_tensor_info(entry, source) for entry in fields.get("tensors", list)),
            source_sha256=fields.optional("source_sha256", str, ""),  # absent in manifests written before it
        )
        derived = {"n_layer": manifest.n_layer, "is_first": manifest.is_first, "is_last": manifest.is_last}
        for name, value in derived.items():
            if fields.get(name, type(value)) != value:
                raise DataLoss(f"{source}: {name} disagrees with the layer range and config")
        manifest._check(source)
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "shard manifest") -> ShardManifest:
        return cls.from_dict(parse_json(text, source), source=source)

    def _check(self, source: str) -> None:
        """Every field agrees with the others: range, id, file name, size, hash, tensor list."""
        if not 0 <= self.layer_start < self.layer_end <= self.n_layer:
            raise DataLoss(f"{source}: layer range [{self.layer_start}, {self.layer_end}) is not in the model")
        if self.dtype not in SHARD_DTYPE_NAMES:
            raise DataLoss(f"{source}: dtype {self.dtype!r} is not one of {list(SHARD_DTYPE_NAMES)}")
        expected_id = shard_id(self.model_id, self.layer_start, self.layer_end, self.dtype)
        if self.shard_id != expected_id or self.file != f"{expected_id}.safetensors":
            raise DataLoss(f"{source}: shard_id/file must be {expected_id!r}/{expected_id}.safetensors")
        if self.byte_size <= 0 or not _SHA256.match(self.sha256):
            raise DataLoss(f"{source}: byte_size must be > 0 and sha256 64 lowercase hex digits")
        shapes = expected_shapes(self.config)
        expected = [
            TensorInfo(name, shapes[name], self.dtype)
            for name in stage_tensor_names(self.config, self.layer_start, self.layer_end)
        ]
        for position, (want, got) in enumerate(itertools.zip_longest(expected, self.tensors)):
            if want != got:
                raise DataLoss(
                    f"{source}: 'tensors' entry {position} is {got} but layers "
                    f"[{self.layer_start}, {self.layer_end}) need {want}; re-shard the model"
                )


@dataclass(frozen=True)
class ModelIndex:
    """The model.json of a shard folder: the model and every shard written there."""

    model_id: str
    config: GPT2Config
    shards: tuple[ShardManifest, ...]

    def find(self, start: int, end: int, dtype: str = "float16") -> ShardManifest:
        for manifest in self.shards:
            if (manifest.layer_start, manifest.layer_end, manifest.dtype) == (start, end, dtype):
                return manifest
        raise NotFound(f"no {dtype} shard of {self.model_id} for layers [{start}, {end}); write it first")

    def to_json(self) -> str:
        data = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "config": self.config.to_dict(),
            "shards": [manifest.to_dict() for manifest in self.shards],
        }
        return _dump_json(data)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = INDEX_FILE) -> ModelIndex:
        fields = _Fields(parse_json(text, source), source)
        shards = tuple(ShardManifest.from_dict(entry, source=source) for entry in fields.get("shards", list))
        index = cls(fields.get("model_id", str), _config(fields, source), shards)
        if any((shard.model_id, shard.config) != (index.model_id, index.config) for shard in shards):
            raise DataLoss(f"{source}: a shard belongs to another model than {index.model_id!r}")
        return index


def model_slug(model_id: str) -> str:
    """model_id as a file name part: "openai-community/gpt2" -> "openai-community-gpt2"."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_id.lower()).strip(".-")
    if not slug:
        raise InvalidArgument(f"model id {model_id!r} has no letters or digits to name its shards by")
    return slug


def shard_id(model_id: str, start: int, end: int, dtype: str) -> str:
    """The shard's name, e.g. "gpt2-L0-6-float16"; also its files' stem."""
    return f"{model_slug(model_id)}-L{start}-{end}-{dtype}"


def _dump_json(data: dict[str, Any]) -> str:
    """Indented JSON with flat lists (shapes) kept on one line."""
    text = json.dumps(data, indent=2)
    return _FLAT_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text) + "\n"


def parse_json(text: str | bytes, source: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataLoss(f"{source} is not valid JSON ({error}); delete it and re-shard") from error


class _Fields:
    """Typed access to a JSON object's fields; DataLoss names the missing or mistyped field."""

    def __init__(self, data: Any, source: str) -> None:
        if not isinstance(data, dict):
            raise DataLoss(f"{source} must be a JSON object, got {type(data).__name__}")
        self.data, self.source = data, source

    def optional(self, name: str, kind: type, default: Any) -> Any:
        return self.get(name, kind) if name in self.data else default

    def get(self, name: str, kind: type) -> Any:
        if name not in self.data:
            raise DataLoss(f"{self.source} has no {name!r} field; re-shard the model")
        value = self.data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataLoss(f"{self.source}: {name!r} must be a {kind.__name__}, got {value!r:.60}")
        return value


def _config(fields: _Fields, source: str) -> GPT2Config:
    try:
        return GPT2Config.from_dict(fields.get("config", dict))
    except InvalidArgument as error:
        raise DataLoss(f"{source}: bad config: {error}") from error


def _tensor_info(entry: Any, source: str) -> TensorInfo:
    fields = _Fields(entry, f"{source} tensor entry")
    shape = fields.get("shape", list)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise DataLoss(f"{source}: tensor shape {shape!r} is not a list of sizes")
    return TensorInfo(fields.get("name", str), tuple(shape), fields.get("dtype", str))
