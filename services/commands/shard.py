"""`synapse shard`: cut a checkpoint into even layer ranges, write the shards, print what was written."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.sharder.shards import ShardManifest

HELP = "Write a GPT-2 checkpoint (local folder or hub name) as N shards of even layer ranges."
SHA256_SHOWN = 12  # hex digits of each shard's sha256 in the summary


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint folder (config.json + model.safetensors) or hub name"
    )
    parser.add_argument(
        "--parts", type=positive_int, required=True, metavar="N", help="number of shards (1 to n_layer)"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write shards to")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="shard dtype")


def run(args: argparse.Namespace) -> int:
    from services.common.gpt2.checkpoint import load_checkpoint
    from services.sharder.shards import even_ranges, shard_id, write_shards

    checkpoint = load_checkpoint(args.model, progress=True)
    ranges = even_ranges(checkpoint.config.n_layer, args.parts)
    planned = [shard_id(checkpoint.model_id, start, end, args.dtype) for start, end in ranges]
    with _undo_on_failure(args.out, planned):
        manifests = write_shards(checkpoint, ranges, args.out, dtype=args.dtype, progress=True)
    print(summary(manifests, args.out))
    return 0


def summary(manifests: list[ShardManifest], out: Path) -> str:
    """A plain-text table of the written shards, then their total size and folder."""
    rows = [["shard id", "layers", "bytes", "sha256"]]
    rows += [
        [m.shard_id, f"[{m.layer_start}, {m.layer_end})", f"{m.byte_size:,}", m.sha256[:SHA256_SHOWN]]
        for m in manifests
    ]
    total = sum(m.byte_size for m in manifests)
    return f"{format_table(rows, numeric={2})}\n{len(manifests)} shard(s), {total:,} bytes, in {out}"


def format_table(rows: list[list[str]], *, numeric: Collection[int] = ()) -> str:
    """Columns padded to their widest cell; columns in `numeric` are right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in rows)


@contextlib.contextmanager
def _undo_on_failure(out: Path, planned_ids: list[str]) -> Iterator[None]:
    """On any failure, remove the shards this run added (write_shards keeps the complete ones).

    Files that were there before are left alone, and so is `out` unless this run created it empty.
    """
    created_folder = not out.exists()
    before = {path.name for path in out.iterdir()} if out.is_dir() else set()
    try:
        yield
    except BaseException:
        for identity in planned_ids:
            for name in (f"{identity}.safetensors", f"{identity}.json"):
                if name not in before:
                    (out / name).unlink(missing_ok=True)
        if created_folder and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
