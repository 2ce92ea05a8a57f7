"""Shard bytes are pinned: the sha256 of every file the sharder writes for fixed checkpoints.

The checkpoints are built with numpy and safetensors only (float32, float16 and bfloat16 sources, values from
integer hashing plus float16 edge cases: ties, subnormals, the largest finite value), sharded into 1, 2 and 3
float16 and float32 shards. tests/vectors/shard_bytes.json was recorded from the torch sharder (commit 925d3a6)
before it moved to numpy; the sharder must keep writing exactly these bytes. The random-weights cases were
recorded again after that move: the fallback now draws from numpy's PCG64, not torch's generator (whose
normal_ picks a vectorised or a scalar kernel by CPU, so its bytes were never portable). Re-record
(`python -m tests.unit.test_shard_bytes`) only for a deliberate format change, and say so in the commit: the
manifests and model.json were re-recorded once, when they gained `source_sha256` (every .safetensors
file kept its bytes).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.common.gpt2.checkpoint import expected_shapes, load_checkpoint
from services.common.gpt2.config import GPT2Config
from services.sharder.random_weights import random_checkpoint
from services.sharder.shards import even_ranges, write_shards

GOLDEN = Path(__file__).resolve().parents[1] / "vectors" / "shard_bytes.json"
CONFIG = GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=53, n_positions=24)
SOURCES = ("float32", "float16", "bfloat16")
SHARD_DTYPES = ("float16", "float32")
PARTS = (1, 2, 3)
# Placed at the start of every tensor: float16 round-to-nearest-even ties (1 + 2^-11 rounds down, 1 + 3 * 2^-11
# up), the largest finite float16 and a value that rounds to it, subnormals, half the smallest subnormal (a tie
# to zero) and an underflow to -0.
EDGES = np.array(
    [0.0, -0.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, -65519.0, 2**-24, 2**-25, 3e-5, -1e-10, 0.1, 1 / 3],
    dtype=np.float32,
)


def pattern(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """float32 values in [-0.5, 0.5) from a multiplicative hash of the index: the same on every machine."""
    count = int(np.prod(shape))
    index = np.arange(count, dtype=np.uint64)
    mixed = (index * np.uint64(2654435761) + np.uint64(salt * 40503)) % np.uint64(1 << 32)
    values = (mixed.astype(np.float64) / 2**32 - 0.5).astype(np.float32)
    edges = min(count, len(EDGES))
    values[:edges] = EDGES[:edges]
    return values.reshape(shape)


def write_bfloat16_file(tensors: dict[str, np.ndarray], path: Path) -> None:
    """A safetensors file of bfloat16 tensors (numpy has no bfloat16: the top 16 bits of each float32)."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, values in tensors.items():
        data = (np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def make_checkpoint(folder: Path, source: str) -> Path:
    """config.json + model.safetensors (names with the transformer. prefix) of CONFIG in the `source` dtype."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    shapes = expected_shapes(CONFIG)
    tensors = {f"transformer.{name}": pattern(shape, salt) for salt, (name, shape) in enumerate(shapes.items())}
    if source == "bfloat16":
        write_bfloat16_file(tensors, folder / "model.safetensors")
    else:
        cast = {name: values.astype(source) for name, values in tensors.items()}
        save_file(cast, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def case_hashes(work: Path, case: str) -> dict[str, str]:
    """Write the shards of one case ("<source>-<shard dtype>-<parts>" or "random-<shard dtype>-<parts>")."""
    source, dtype, parts = case.split("-")
    if source == "random":
        checkpoint = random_checkpoint(CONFIG, "golden", seed=0)
    else:
        checkpoint = load_checkpoint(make_checkpoint(work / f"checkpoint-{source}" / "golden", source))
    out = work / f"shards-{case}"
    write_shards(checkpoint, even_ranges(CONFIG.n_layer, int(parts)), out, dtype=dtype, progress=False)
    return file_hashes(out)


CASES = [f"{source}-{dtype}-{parts}" for source in (*SOURCES, "random") for dtype in SHARD_DTYPES for parts in PARTS]


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES)
def test_written_files_are_byte_for_byte_the_recorded_ones(case: str, golden, tmp_path: Path) -> None:
    assert case_hashes(tmp_path, case) == golden[case]


def test_the_checkpoints_are_what_the_library_reads(tmp_path: Path) -> None:
    """The hand-written bfloat16 file is valid safetensors, and the pattern holds what the cases need."""
    from safetensors import safe_open

    folder = make_checkpoint(tmp_path / "golden", "bfloat16")
    with safe_open(folder / "model.safetensors", framework="numpy") as handle:
        assert len(handle.keys()) == len(expected_shapes(CONFIG))
    values = pattern((100,), salt=3)
    assert values.dtype == np.float32 and np.isfinite(values.astype(np.float16)).all()
    assert len(np.unique(values[len(EDGES) :])) == 100 - len(EDGES)


def record() -> None:
    with tempfile.TemporaryDirectory() as work:
        hashes = {case: case_hashes(Path(work), case) for case in CASES}
    GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(hashes)} cases in {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    record()
