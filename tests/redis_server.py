"""A real redis-server for tests: on a free port, nothing persisted; fails loudly when it does not start."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services.launcher import free_port

START_TIMEOUT_S = 10.0


@contextlib.contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """Yields the server's URL once it accepts connections; AssertionError with its log if it never does."""
    executable = shutil.which("redis-server")
    assert executable, "redis-server is not installed: run `bash ops/setup.sh`"
    port = port or free_port()
    log_path = folder / f"redis-{port}.log"
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder)]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(process, port, log_path)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _wait_listening(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"redis-server exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"redis-server did not listen on {port} within {START_TIMEOUT_S:g} s:\n"
                    f"{log_path.read_text()[-2000:]}"
                ) from None
            time.sleep(0.05)
