"""Generates the gRPC stubs from proto/synapse/v1/*.proto into services/common/pb/ (never committed).

Run by `pip install` (setup.py's build step) and `make proto`. protoc writes absolute imports
(`from synapse.v1 import common_pb2`); they are rewritten to the package they live in.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "services" / "common" / "pb"
IMPORT_RE = re.compile(r"^from synapse\.v1 import (\w+_pb2)", re.MULTILINE)


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("synapse/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}/synapse/v1")
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}"]
        args += [f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for generated in sorted((Path(tmp) / "synapse" / "v1").iterdir()):
            text = IMPORT_RE.sub(r"from services.common.pb import \1", generated.read_text())
            target = out / generated.name
            target.write_text(text)
            written.append(target)
    (out / "__init__.py").write_text('"""Generated gRPC stubs (tools/gen_protos.py); do not edit."""\n')
    return written


def main() -> None:
    try:
        import grpc_tools  # noqa: F401 - checked before --clean removes the stubs there are
    except ImportError:
        raise SystemExit(
            "grpcio-tools is not installed (it is a build-time dependency): `pip install grpcio-tools==1.85.1`, "
            "or regenerate through the install: `pip install --no-deps -e .`"
        ) from None
    if "--clean" in sys.argv and OUT.exists():
        shutil.rmtree(OUT)
    for path in generate():
        print(f"generated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
