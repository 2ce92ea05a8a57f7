"""Coverage-guided fuzzing of the Python SYN1 decoder with atheris, for runs longer than the suite's. Not collected
by pytest (tests/unit/test_syn1_fuzz.py checks the same properties with hypothesis in the suite).

    pip install atheris
    PYTHONPATH=. python tests/fuzz/fuzz_syn1.py -max_total_time=300 -rss_limit_mb=2048

With no corpus folder given it starts from var/fuzz/syn1/, seeded with the shared vectors (tests/vectors/syn1/).
A crash is any exception but FrameError, frames that do not re-encode to the bytes they came from, or an
allocation past 16 KiB + 32 bytes per byte received (what a header claims must never be allocated);
libFuzzer writes the input as var/fuzz/crash-<sha1> and stops, or with --keep-going the first input of each
distinct crash and goes on.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tracemalloc
from pathlib import Path

import atheris

from tests.fuzz.crashes import keep_going

with atheris.instrument_imports(include=["services"]):  # our code; numpy, pydantic and grpc as they are
    from services.wire import syn1

ROOT = Path(__file__).resolve().parents[2]
VECTORS = sorted((ROOT / "tests" / "vectors" / "syn1").glob("*.bin"))
FIXED_BYTES, OBJECT_BYTES_PER_BYTE = 16 * 1024, 32


def test_one_input(data: bytes) -> None:
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        frames = syn1.decode_frames(data)
    except syn1.FrameError:
        frames = None
    _, peak = tracemalloc.get_traced_memory()
    peak -= before
    if peak > FIXED_BYTES + OBJECT_BYTES_PER_BYTE * len(data):
        raise AssertionError(f"decoding {len(data)} bytes allocated {peak} bytes")
    if frames is not None and syn1.encode_frames(frames) != data:
        raise AssertionError("decoded frames do not re-encode to the same bytes")


def seeded_corpus(name: str, seeds: list[Path]) -> str:
    """var/fuzz/<name>/ (ignored by git), holding the seeds; libFuzzer adds what it finds."""
    folder = ROOT / "var" / "fuzz" / name
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        shutil.copy(seed, folder / seed.name)
    return str(folder)


def main() -> None:
    argv = list(sys.argv)
    if not any(not argument.startswith("-") for argument in argv[1:]):
        argv.append(seeded_corpus("syn1", [vector for vector in VECTORS if vector.stat().st_size <= 4096]))
    if not any(argument.startswith("-max_len=") for argument in argv):
        argv.insert(1, "-max_len=4096")  # room for several frames; larger inputs only run slower
    if not any(argument.startswith("-artifact_prefix=") for argument in argv):
        argv.insert(1, f"-artifact_prefix={ROOT / 'var' / 'fuzz'}/")  # crash files there, not in the checkout
    for vector in VECTORS:  # first calls fill caches (enum lookups, tracebacks); those are not the decoder's
        with contextlib.suppress(syn1.FrameError):
            syn1.decode_frames(vector.read_bytes())
    tracemalloc.start()
    atheris.Setup(argv, keep_going(argv, test_one_input, "syn1"))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
