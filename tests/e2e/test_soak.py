"""The soak script (tests/soak/soak.py) run briefly: a few streams, a node SIGKILLed and restarted under them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.soak
def test_a_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "tests.soak.soak", "--minutes", "0.2", "--streams", "6", "--nodes", "2"]
    command += ["--kill-every-s", "5", "--down-s", "2", "--warmup-s", "4", "--templates", "6", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and all(report["invariants"].values())
    assert report["kills"], "no node was killed"
    streams = report["streams"]
    assert streams["started"] == streams["finished"] > 6
    assert streams["status_codes"].get("OK", 0) > 0
    assert report["tokens"]["received"] > 0 and report["tokens"]["lost"] == 0
    assert set(report["rss"]) >= {"router", "gateway-0", "node-0", "node-1"}
