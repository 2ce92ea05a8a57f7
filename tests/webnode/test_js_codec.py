"""The JavaScript tests of tests/webnode/ (node --test) in the same suite: the SYN1 codec against the shared
vectors (syn1.test.mjs, syn1.fuzz.test.mjs) and the page's pure modules (page_modules.test.mjs); the page's
safetensors header against the sharder's own files; the JavaScript and Python SYN1 decoders on fuzzed messages."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

from services.common.gpt2.checkpoint import load_checkpoint
from services.sharder.shards import write_shards
from services.wire import syn1
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


def test_javascript_and_python_decoders_agree_on_fuzzed_messages(tmp_path: Path) -> None:
    """Differential fuzzing: the same 3000 mutated, cut, lied-about and random messages through both decoders
    give the same frame count or the same error message, word for word."""
    messages = _fuzzed_messages(random.Random(20260612), 3000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"m{message.hex()}\n" for message in messages))  # "m": empty ones too
    node = shutil.which("node")
    assert node, "Node.js is not installed: run `bash ops/setup.sh`"
    script = ROOT / "tests" / "webnode" / "syn1_decode_each.mjs"
    result = subprocess.run([node, str(script), str(corpus)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    javascript = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(javascript) == len(messages)
    disagreements = [
        (message.hex()[:120], python, js)
        for message, js in zip(messages, javascript, strict=True)
        if (python := _python_decode(message)) != js
    ]
    assert not disagreements, disagreements[:5]
    assert sum("frames" in js for js in javascript) > 100, "too few fuzzed messages decoded to compare contents"


def _python_decode(message: bytes) -> dict[str, object]:
    try:
        return {"frames": len(syn1.decode_frames(message))}
    except syn1.FrameError as error:
        return {"error": str(error)}


def _fuzzed_messages(rng: random.Random, count: int) -> list[bytes]:
    vectors = [path.read_bytes() for path in sorted((ROOT / "tests" / "vectors" / "syn1").glob("*.bin"))]
    valid = [data for data in vectors if _python_decode(data).get("frames")]
    messages = []
    for trial in range(count):
        data = bytearray(rng.choice(valid if trial % 2 else vectors))
        kind = trial % 5
        if kind == 0 and data:  # a few bytes set
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and len(data) >= 24:  # rows or cols lie
            struct.pack_into("<I", data, rng.choice([16, 20]), rng.choice([0, 1, 2, 97, 4097, 2**31, 2**32 - 1]))
        elif kind == 2:  # cut short
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == 3:  # spliced with another message
            data += rng.choice(vectors)[: rng.randrange(64)]
        else:
            data = bytearray(rng.randbytes(rng.randrange(80)))
        messages.append(bytes(data))
    return messages
