"""The JavaScript tests of tests/webnode/ (node --test) in the same suite: the SYN1 codec against the shared
vectors (syn1.test.mjs) and the page's pure modules (page_modules.test.mjs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_javascript_tests_pass() -> None:
    node = shutil.which("node")
    assert node, "Node.js is not installed: run `bash ops/setup.sh`"
    result = subprocess.run([node, "--test", "tests/webnode/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
