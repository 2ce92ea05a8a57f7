"""The JavaScript SYN1 codec's own tests (node --test) run in the same suite, against the shared vectors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_javascript_codec_passes_the_shared_vectors() -> None:
    node = shutil.which("node")
    assert node, "Node.js is not installed: run `bash ops/setup.sh`"
    result = subprocess.run([node, "--test", "tests/webnode/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
