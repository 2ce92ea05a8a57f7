"""What a benchmark ran on: CPU model and cores, memory, GPU, library versions, the command line."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def describe(argv: list[str] | None = None) -> dict[str, object]:
    """The machine and the command, as results.json records them."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "redis_server": shutil.which("redis-server") is not None,  # stacks use Redis only where it is installed
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min: others' work skews figures
        "command": shlex.join(["synapse", *(sys.argv[1:] if argv is None else argv)]),
    }
