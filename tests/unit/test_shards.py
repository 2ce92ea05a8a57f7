"""Shard files: round trips, manifest contents, numerics of chained stages, corruption and atomicity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.common.gpt2.checkpoint import Checkpoint, load_checkpoint, stage_tensor_names
from services.common.gpt2.model import GPT2Stage
from services.sharder import shards
from services.sharder.footprint import footprint
from services.sharder.shards import (
    ShardManifest,
    even_ranges,
    read_index,
    read_manifest,
    read_shard,
    shard_id,
    write_shard,
    write_shards,
)
from tests.checkpoints import load_reference, make_random_checkpoint

N_LAYER = 3
RANGES = [(0, 1), (1, 3)]  # the last shard is not the first: it carries its own copy of wte


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gpt2", n_layer=N_LAYER)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_dir, progress=False)


@pytest.fixture(scope="module")
def written(checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list]]:
    """Shards of RANGES in both dtypes, each dtype in its own folder (read-only use)."""
    result = {}
    for dtype in ("float16", "float32"):
        out = tmp_path_factory.mktemp(dtype)
        result[dtype] = (out, write_shards(checkpoint, RANGES, out, dtype=dtype, progress=False))
    return result


@pytest.fixture
def shard_copy(checkpoint: Checkpoint, tmp_path: Path) -> tuple[Path, ShardManifest]:
    """A fresh float32 shard of layers [1, 3) to damage."""
    return tmp_path, write_shard(checkpoint, 1, 3, tmp_path, dtype="float32")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_every_tensor(checkpoint: Checkpoint, written, dtype: str) -> None:
    out, manifests = written[dtype]
    for manifest, (start, end) in zip(manifests, RANGES, strict=True):
        tensors = read_shard(out / f"{manifest.shard_id}.json")
        assert list(tensors) == stage_tensor_names(checkpoint.config, start, end)
        for name, tensor in tensors.items():
            assert isinstance(tensor, np.ndarray) and tensor.dtype == np.dtype(dtype)
            assert np.array_equal(tensor, checkpoint.tensors[name].astype(tensor.dtype)), name


def test_manifest_describes_the_file(checkpoint: Checkpoint, written) -> None:
    out, (first, last) = written["float16"]
    data = (out / last.file).read_bytes()
    assert last.sha256 == hashlib.sha256(data).hexdigest()
    assert last.byte_size == len(data)
    assert last.shard_id == shard_id("tiny-gpt2", 1, 3, "float16") == "tiny-gpt2-L1-3-float16"
    assert (first.is_first, first.is_last, last.is_first, last.is_last) == (True, False, False, True)
    on_disk = json.loads((out / f"{last.shard_id}.json").read_text())
    assert on_disk["layer_start"] == 1 and on_disk["layer_end"] == 3 and on_disk["n_layer"] == N_LAYER
    assert on_disk["config"] == checkpoint.config.to_dict()
    assert on_disk["tensors"][0] == {"name": "h.1.ln_1.weight", "shape": [32], "dtype": "float16"}
    assert [t["name"] for t in on_disk["tensors"]][-3:] == ["ln_f.weight", "ln_f.bias", "wte.weight"]
    assert read_manifest(out / f"{last.shard_id}.json") == last
    assert ShardManifest.from_json(last.to_json()) == last
    # The safetensors library (and so any other reader) accepts the file.
    with safe_open(out / last.file, framework="pt") as handle:
        assert set(handle.keys()) == {t.name for t in last.tensors}
        assert handle.metadata()["synapse_shard"] == last.shard_id
    # Data bytes are what the placement footprint counts for the same stage.
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - header == footprint(checkpoint.config, "float16").stage_bytes(1, 3)


def test_index_lists_the_folder_shards(checkpoint: Checkpoint, tmp_path: Path) -> None:
    write_shards(checkpoint, [(0, 3)], tmp_path, dtype="float32", progress=False)
    write_shard(checkpoint, 0, 2, tmp_path)
    index = read_index(tmp_path)
    assert (index.model_id, index.config) == ("tiny-gpt2", checkpoint.config)
    assert [(m.dtype, m.layer_start, m.layer_end) for m in index.shards] == [
        ("float16", 0, 2),
        ("float32", 0, 3),
    ]
    assert index.find(0, 3, "float32") == read_manifest(tmp_path / "tiny-gpt2-L0-3-float32.json")
    with pytest.raises(NotFound, match="layers \\[1, 3\\)"):
        index.find(1, 3)
    other = dataclasses.replace(checkpoint, model_id="someone/else")
    with pytest.raises(FailedPrecondition, match="its own folder"):
        write_shard(other, 0, 1, tmp_path)
    assert not list(tmp_path.glob("someone*"))


def as_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What the native node does with read_shard's arrays: wrap them, no copy."""
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def run_pipeline(stages: list[GPT2Stage], tokens: torch.Tensor) -> torch.Tensor:
    activations = tokens
    for stage in stages:
        (activations,) = stage([activations], [stage.new_cache()])
    return activations  # (T, vocab) logits from the last stage


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("float16", 3e-2)])
def test_stages_built_from_shards_match_the_reference(checkpoint_dir, written, dtype, tolerance) -> None:
    out, manifests = written[dtype]
    stages = [
        GPT2Stage.from_tensors(m.config, m.layer_start, m.layer_end, as_torch(read_shard(m, out)), dtype=torch.float32)
        for m in manifests
    ]
    tokens = torch.tensor([5, 17, 42, 3, 96, 0, 11])
    with torch.no_grad():
        expected = load_reference(checkpoint_dir)(tokens[None]).logits[0]
    logits = run_pipeline(stages, tokens)
    assert logits.shape == expected.shape
    # Logits here reach about 7.4; float16 weights alone move them by about 0.008.
    assert (logits - expected).abs().max().item() < tolerance
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_flipped_byte_is_data_loss_naming_file_and_hashes(shard_copy) -> None:
    out, manifest = shard_copy
    path = out / manifest.file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(data)
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(DataLoss) as error:
        read_shard(manifest, out)
    assert manifest.file in str(error.value) and actual in str(error.value) and manifest.sha256 in str(error.value)
    assert read_shard(manifest, out, verify=False)["wte.weight"].shape == (97, 32)  # verify=False skips it


def test_truncated_file_is_data_loss(shard_copy) -> None:
    out, manifest = shard_copy
    path = out / manifest.file
    path.write_bytes(path.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(DataLoss, match="truncated"):
            read_shard(out / f"{manifest.shard_id}.json", verify=verify)


def test_missing_files_are_not_found(shard_copy) -> None:
    out, manifest = shard_copy
    with pytest.raises(InvalidArgument, match="folder"):
        read_shard(manifest)
    (out / manifest.file).unlink()
    with pytest.raises(NotFound, match=manifest.file):
        read_shard(manifest, out)
    with pytest.raises(NotFound):
        read_manifest(out / "nope.json")


def test_bad_safetensors_header_is_data_loss_even_when_the_hash_matches(shard_copy) -> None:
    out, manifest = shard_copy
    path = out / manifest.file
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data)).to_bytes(8, "little")  # header longer than the file
    path.write_bytes(data)
    forged = dataclasses.replace(manifest, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(DataLoss, match="header length"):
        read_shard(forged, out)


def test_file_that_disagrees_with_its_manifest_is_data_loss(checkpoint: Checkpoint, shard_copy) -> None:
    out, manifest = shard_copy
    path = out / manifest.file
    tensors = read_shard(manifest, out)
    del tensors["ln_f.bias"]
    save_file(tensors, str(path))  # a valid safetensors file, one tensor short
    data = path.read_bytes()
    forged = dataclasses.replace(manifest, byte_size=len(data), sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(DataLoss, match=r"ln_f\.bias"):
        read_shard(forged, out)
    # Files from the safetensors library itself (other tensor order, header) read fine.
    names = stage_tensor_names(checkpoint.config, 1, 3)
    tensors = {name: checkpoint.tensors[name].astype(np.float32) for name in names}
    save_file(tensors, str(path))
    data = path.read_bytes()
    forged = dataclasses.replace(manifest, byte_size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert all(np.array_equal(read_shard(forged, out)[n], t) for n, t in tensors.items())


TAMPERINGS = {
    "missing field": (lambda m: m.pop("sha256"), DataLoss, "sha256"),
    "wrong type": (lambda m: m.update(byte_size="12"), DataLoss, "byte_size"),
    "bad sha256": (lambda m: m.update(sha256="xyz"), DataLoss, "sha256"),
    "shape": (lambda m: m["tensors"][0].update(shape=[33]), DataLoss, "tensors"),
    "dropped tensor": (lambda m: m["tensors"].pop(), DataLoss, "tensors"),
    "layer range": (lambda m: m.update(layer_end=4), DataLoss, "layer"),
    "is_last": (lambda m: m.update(is_last=False), DataLoss, "is_last"),
    "path in file": (lambda m: m.update(file="../x.safetensors"), DataLoss, "file"),
    "dtype": (lambda m: m.update(dtype="int8"), DataLoss, "dtype"),
    "config": (lambda m: m["config"].update(n_head=5), DataLoss, "config"),
    "newer format": (lambda m: m.update(format_version=2), FailedPrecondition, "upgrade"),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_tampered_manifest_is_rejected(shard_copy, tampering: str) -> None:
    out, manifest = shard_copy
    change, error, words = TAMPERINGS[tampering]
    data = manifest.to_dict()
    change(data)
    path = out / f"{manifest.shard_id}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(error, match=words):
        read_shard(path)


def test_manifest_that_is_not_json_is_data_loss(shard_copy) -> None:
    out, manifest = shard_copy
    path = out / f"{manifest.shard_id}.json"
    path.write_text(manifest.to_json()[:-40])
    with pytest.raises(DataLoss, match="not valid JSON"):
        read_manifest(path)
    with pytest.raises(DataLoss, match="JSON object"):
        ShardManifest.from_json("[1, 2]")


def folder_files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_failed_commit_leaves_no_file(checkpoint: Checkpoint, tmp_path: Path, monkeypatch) -> None:
    write_shard(checkpoint, 0, 1, tmp_path)
    before = folder_files(tmp_path)
    real_replace = os.replace

    def fail_on_manifest(source, target) -> None:
        if str(target).endswith("L1-3-float16.json"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(shards.os, "replace", fail_on_manifest)
    with pytest.raises(OSError, match="No space"):
        write_shard(checkpoint, 1, 3, tmp_path)
    assert folder_files(tmp_path) == before  # the data file renamed first was removed again


def test_failure_while_writing_data_leaves_no_file(checkpoint: Checkpoint, tmp_path: Path) -> None:
    tensors = dict(checkpoint.tensors)
    tensors["h.1.mlp.c_fc.bias"] = np.full_like(tensors["h.1.mlp.c_fc.bias"], 1e6)
    huge = dataclasses.replace(checkpoint, tensors=tensors)
    with pytest.raises(InvalidArgument, match="overflows float16; shard as float32"):
        write_shards(huge, RANGES, tmp_path, progress=False)
    assert folder_files(tmp_path) == set()  # all or nothing: the first range's shard is not published either
    write_shard(huge, 1, 3, tmp_path, dtype="float32")  # float32 holds it


def test_bad_write_arguments(checkpoint: Checkpoint, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="layer range"):
        write_shard(checkpoint, 2, 4, tmp_path)
    with pytest.raises(InvalidArgument, match="dtype"):
        write_shard(checkpoint, 0, 1, tmp_path, dtype="int8")
    with pytest.raises(InvalidArgument, match="no layer ranges"):
        write_shards(checkpoint, [], tmp_path, progress=False)
    tensors = {k: v for k, v in checkpoint.tensors.items() if k != "h.0.attn.c_proj.weight"}
    with pytest.raises(InvalidArgument, match=r"h\.0\.attn\.c_proj\.weight"):
        write_shard(dataclasses.replace(checkpoint, tensors=tensors), 0, 1, tmp_path)
    tensors["h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(InvalidArgument, match=r"expected shape \[32, 32\]"):
        write_shard(dataclasses.replace(checkpoint, tensors=tensors), 0, 1, tmp_path)
    assert not any(tmp_path.iterdir())


def test_even_ranges() -> None:
    assert even_ranges(12, 1) == [(0, 12)]
    assert even_ranges(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert even_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for parts in (0, -1, 13):
        with pytest.raises(InvalidArgument, match="parts"):
            even_ranges(12, parts)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_multi_shard_write_that_fails_halfway_leaves_the_folder_as_it_was(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    ranges = [(0, 1), (1, checkpoint.config.n_layer)]
    write_shards(checkpoint, ranges, tmp_path, dtype="float16", progress=False)
    before = _snapshot(tmp_path)
    # Other weights under the same name: the first shard converts fine, the second overflows float16.
    tensors = {name: np.array(value, copy=True) for name, value in checkpoint.tensors.items()}
    tensors["h.0.attn.c_attn.weight"] += 1.0
    tensors["h.1.mlp.c_fc.weight"][0, 0] = 1e6
    changed = dataclasses.replace(checkpoint, tensors=tensors, fingerprint="f" * 64)
    with pytest.raises(InvalidArgument, match=r"h\.1\.mlp\.c_fc\.weight.*overflows float16"):
        write_shards(changed, ranges, tmp_path, dtype="float16", progress=False)
    assert _snapshot(tmp_path) == before  # no shard of the changed weights, no temp file, model.json unchanged


async def test_shards_follow_their_checkpoint_not_only_its_name_and_range(
    checkpoint: Checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from services.sharder.catalog import Catalog
    from services.sharder.placement import NodeCapacity

    nodes = [NodeCapacity("n0", memory_bytes=1 << 30, speed=1.0)]
    (first,), _ = await Catalog(checkpoint, tmp_path, "float32").plan(nodes)
    assert first.manifest.source_sha256 == checkpoint.fingerprint != ""
    (again,), _ = await Catalog(checkpoint, tmp_path, "float32").plan(nodes)
    assert again.manifest == first.manifest  # the same weights: the shard is reused
    tensors = {name: np.array(value, copy=True) for name, value in checkpoint.tensors.items()}
    tensors["wpe.weight"] += 0.5  # same name, same shapes, other weights (a fine-tune copied over the folder)
    changed = dataclasses.replace(checkpoint, tensors=tensors, fingerprint="e" * 64)
    catalog = Catalog(changed, tmp_path, "float32")
    (fresh,), _ = await catalog.plan(nodes)
    assert fresh.manifest.shard_id == first.manifest.shard_id and fresh.manifest.sha256 != first.manifest.sha256
    assert fresh.manifest.source_sha256 == "e" * 64
    assert any(record.message == "shard_stale" for record in caplog.records)
    assert catalog.manifest(fresh.manifest.shard_id) == fresh.manifest


def test_a_checkpoint_fingerprint_is_the_sha256_of_its_files(checkpoint_dir: Path) -> None:
    expected = hashlib.sha256((checkpoint_dir / "model.safetensors").read_bytes())
    expected.update((checkpoint_dir / "config.json").read_bytes())
    assert load_checkpoint(checkpoint_dir, progress=False).fingerprint == expected.hexdigest()
