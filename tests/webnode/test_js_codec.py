"""The JavaScript tests of tests/webnode/ (node --test) in the same suite: the SYN1 codec against the shared
vectors (syn1.test.mjs) and the page's pure modules (page_modules.test.mjs); and the page's safetensors header
against the sharder's own files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from services.common.gpt2.checkpoint import load_checkpoint
from services.sharder.shards import write_shards
from tests.checkpoints import make_random_checkpoint
from tests.webnode.wgsl_runner import run_page_code

ROOT = Path(__file__).resolve().parents[2]


def test_the_javascript_tests_pass() -> None:
    node = shutil.which("node")
    assert node, "Node.js is not installed: run `bash ops/setup.sh`"
    result = subprocess.run([node, "--test", "tests/webnode/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


def test_the_page_writes_the_header_the_sharder_writes(tmp_path: Path) -> None:
    """A shard the page cuts from a held one must hash like the sharder's file: the headers must be equal."""
    folder = make_random_checkpoint(tmp_path / "model", n_layer=3, n_head=2, n_embd=8, vocab_size=11, n_positions=16)
    for dtype in ("float16", "float32"):
        manifests = write_shards(
            load_checkpoint(str(folder)), [(0, 1), (1, 3), (0, 3)], tmp_path / dtype, dtype=dtype, progress=False
        )
        for manifest in manifests:
            manifest_path = tmp_path / dtype / f"{manifest.shard_id}.json"
            header = bytes.fromhex(run_page_code("header", str(manifest_path))["hex"])
            written = (tmp_path / dtype / manifest.file).read_bytes()
            assert written[: len(header)] == header, manifest.shard_id
            assert int.from_bytes(header[:8], "little") == len(header) - 8
