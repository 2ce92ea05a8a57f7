"""--keep-going for the atheris scripts: report each distinct crash (its exception type and message, numbers
blanked) once, with the first input that caused it under var/fuzz/, and carry on instead of stopping at the first.
libFuzzer's own `Done N runs` line counts the inputs."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "var" / "fuzz"


def keep_going(argv: list[str], target: Callable[[bytes], None], name: str) -> Callable[[bytes], None]:
    """`target` itself, or with --keep-going in argv (removed from it) a target that records crashes and returns."""
    if "--keep-going" not in argv:
        return target
    argv.remove("--keep-going")
    seen: dict[str, int] = {}
    runs = [0]

    def guarded(data: bytes) -> None:
        runs[0] += 1
        try:
            target(data)
        except Exception as error:
            signature = re.sub(r"\d+", "#", f"{type(error).__name__}: {str(error).splitlines()[0][:100]}")
            if signature not in seen:
                path = FOLDER / f"{name}-crash-{hashlib.sha1(data).hexdigest()[:12]}"
                path.write_bytes(data)
                print(
                    f"\nNEW CRASH {len(seen) + 1} after {runs[0]} inputs: {signature} (input: {path})",
                    file=sys.stderr,
                    flush=True,
                )
            seen[signature] = seen.get(signature, 0) + 1

    FOLDER.mkdir(parents=True, exist_ok=True)
    return guarded
