"""Run a service module so that it gets SIGTERM when the process that started it dies, even by SIGKILL.

`python -m services.common.orphan_guard PARENT_PID services.router` sets Linux's PR_SET_PDEATHSIG, then runs
the module as __main__ in this same process (no second interpreter). `synapse up` starts its services this
way: its own handlers stop them on SIGINT, SIGTERM and SIGHUP, and this covers what no handler sees (a
SIGKILL, the OOM killer). Elsewhere than Linux it only runs the module.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when its parent (the thread that started it) ends; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent_pid:  # the parent died before the line above: nobody would stop this process
        sys.exit(0)


def main() -> None:
    parent_pid, module = int(sys.argv[1]), sys.argv[2]
    die_with_parent(parent_pid)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
