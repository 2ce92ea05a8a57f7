"""Print pyproject.toml's runtime dependencies one a line, optionally leaving some out (the image builds use it).

    python3 ops/docker/requirements.py [--without NAME ...] [PYPROJECT]

The control-plane image installs every dependency but torch; the node image installs torch first (CPU build by
default), then the same list. One source of truth: pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(pyproject: Path, without: set[str]) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    skip = {name.lower() for name in without}
    return [line for line in dependencies if NAME.match(line).group(1).lower() not in skip]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "pyproject.toml")
    parser.add_argument("--without", action="append", default=[], metavar="NAME", help="Leave this package out.")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, set(args.without))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
