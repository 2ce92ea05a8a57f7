"""A real redis-server for tests: on a free port, nothing persisted; fails loudly when it does not start.

RedisProcess can be killed and started again on the same port (the fault tests restart Redis under traffic).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services.launcher import free_port

START_TIMEOUT_S = 10.0


class RedisProcess:
    """One redis-server on a fixed port: start() waits until it accepts connections."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is not installed: run `bash ops/setup.sh`"
        self.folder, self.port = folder, port or free_port()
        self.log_path = folder / f"redis-{self.port}.log"
        self.command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(folder)]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _wait_listening(self.process, self.port, self.log_path)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGKILL loses everything at once, as a crash would (nothing is persisted either way)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


@contextlib.contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """Yields the server's URL once it accepts connections; AssertionError with its log if it never does."""
    server = RedisProcess(folder, port)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


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
