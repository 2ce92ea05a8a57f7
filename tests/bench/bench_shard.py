"""Wall time and peak memory of sharding a full-size GPT-2 124M (random weights) from a saved checkpoint.

    python tests/bench/bench_shard.py [--parts 2 4] [--dtypes float16] [--repeats 3] [--keep DIR]

The checkpoint is written once, as the hub stores GPT-2 (config.json + float32 model.safetensors,
498 MB), into a temporary folder. Each run is a fresh Python process doing what `synapse shard`
does, `load_checkpoint(folder)` then `write_shards(even_ranges(12, parts))`, into an empty
folder on the same disk, fsync included. The child times both steps and reports its RSS after
imports, after loading, and its peak so far after loading; the parent reads the child's own
lifetime peak RSS from os.wait4 (RUSAGE_CHILDREN would give the largest of all children).
Times are "median (min)" over the repeats (the machine may be shared: min is the least disturbed
run); write MiB/s uses the min; memory is the largest of the repeats.
Not a test: pytest collects test_*.py only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "gpt2"
MIB = 1 << 20


def child(folder: Path, out: Path, parts: int, dtype: str) -> None:
    """One sharding run; prints a JSON line with its timings and RSS after imports."""
    import resource

    from services.common.gpt2.checkpoint import load_checkpoint
    from services.sharder.shards import even_ranges, write_shards

    rss_after_imports = _current_rss_bytes()
    started = time.perf_counter()
    checkpoint = load_checkpoint(folder, progress=False)
    loaded = time.perf_counter()
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rss_after_load = _current_rss_bytes()
    manifests = write_shards(
        checkpoint, even_ranges(checkpoint.config.n_layer, parts), out, dtype=dtype, progress=False
    )
    written = time.perf_counter()
    result = {
        "load_s": loaded - started,
        "write_s": written - loaded,
        "bytes": sum(m.byte_size for m in manifests),
        "rss_after_imports": rss_after_imports,
        "rss_after_load": rss_after_load,
        "peak_after_load": peak_after_load,
    }
    print(json.dumps(result))


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def save_full_size_checkpoint(folder: Path) -> int:
    """config.json + model.safetensors of GPT-2 124M with random weights, float32 like the hub's."""
    from safetensors.numpy import save_file

    from services.sharder.random_weights import known_shape, random_checkpoint

    config = known_shape(MODEL)
    checkpoint = random_checkpoint(config, MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    tensors = {f"transformer.{name}": array for name, array in checkpoint.tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    return (folder / "model.safetensors").stat().st_size


def run_child(folder: Path, out: Path, parts: int, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), str(out), str(parts), dtype]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    output = process.stdout.read().decode()
    process.stdout.close()
    if process.returncode != 0:
        raise SystemExit(f"sharding run failed with exit code {process.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["process_s"] = elapsed
    result["maxrss"] = usage.ru_maxrss * 1024  # KiB on Linux; this child alone
    return result


def summary_row(parts: int, dtype: str, runs: list[dict]) -> list[str]:
    """Times as "median (min)" over the runs, memory as the largest run's, in MiB."""

    def seconds(key: str) -> str:
        values = [run[key] for run in runs]
        return f"{statistics.median(values):.2f} ({min(values):.2f})"

    def mebibytes(key: str) -> str:
        return f"{max(run[key] for run in runs) / MIB:.0f}"

    best_write_s = min(run["write_s"] for run in runs)
    return [
        str(parts),
        dtype,
        seconds("load_s"),
        seconds("write_s"),
        f"{runs[0]['bytes'] / MIB / best_write_s:.0f}",
        seconds("process_s"),
        f"{runs[0]['bytes'] / MIB:.1f}",
        mebibytes("rss_after_imports"),
        mebibytes("rss_after_load"),
        mebibytes("peak_after_load"),
        mebibytes("maxrss"),
    ]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the checkpoint and shards here and keep them")
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "OUT", "PARTS", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, out, parts, dtype = args.child
        child(Path(folder), Path(out), int(parts), dtype)
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        started = time.perf_counter()
        checkpoint_bytes = save_full_size_checkpoint(root / MODEL)
        print(
            f"checkpoint: {root / MODEL}, {checkpoint_bytes / MIB:.1f} MiB float32, "
            f"saved in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs",
            flush=True,
        )
        rows = [
            [
                "parts",
                "dtype",
                "load s",
                "write s",
                "write MiB/s",
                "process s",
                "shards MiB",
                "RSS imports MiB",
                "RSS loaded MiB",
                "peak load MiB",
                "peak MiB",
            ]
        ]
        for dtype in args.dtypes:
            for parts in args.parts:
                runs = []
                for repeat in range(args.repeats):
                    out = root / f"shards-{parts}-{dtype}-{repeat}"
                    runs.append(run_child(root / MODEL, out, parts, dtype))
                    if not args.keep:
                        shutil.rmtree(out)
                rows.append(summary_row(parts, dtype, runs))
        print(table(rows))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
