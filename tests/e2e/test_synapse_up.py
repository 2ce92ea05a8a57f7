"""`synapse up` as a user runs it: two stacks side by side on their own port bases; a hang-up stops every child."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from services import stack_ports
from services.launcher import free_port_base
from tests.polling import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
STARTED = re.compile(r"^started (service|node) (\S+) pid=(\d+)")


class Up:
    """A `synapse up` process; its stdout lines are collected as they come."""

    def __init__(self, checkpoint_dir: Path, workdir: Path, port_base: int) -> None:
        self.port_base = port_base
        command = [sys.executable, "-m", "services.cli", "up", "--model", str(checkpoint_dir), "--nodes", "2"]
        command += ["--workdir", str(workdir), "--max-tokens", "6", "--port-base", str(port_base)]
        self.popen = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_serving(self) -> None:
        def serving() -> bool:
            assert self.popen.poll() is None, "synapse up exited:\n" + "\n".join(self.lines[-40:])
            return any(line.startswith("serving: ") for line in self.lines)

        eventually_sync(serving, 240, f"synapse up on port base {self.port_base} serving")

    @property
    def children(self) -> dict[str, int]:
        """name -> pid of every process it said it started."""
        return {match[2]: int(match[3]) for line in self.lines if (match := STARTED.match(line))}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(60)


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan is re-parented, then reaped, so a dead child cannot linger)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def bound(port: int) -> bool:
    """Held by a socket, as a server binding it would find (SO_REUSEADDR: closed connections in TIME_WAIT are
    not holders)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def generates(port_base: int) -> str:
    router = f"127.0.0.1:{stack_ports.service_ports(port_base)['router']}"
    command = [sys.executable, "-m", "services.cli", "generate", "Hello", "--router", router, "--max-tokens", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_two_stacks_side_by_side_and_a_hang_up_leaves_no_child(checkpoint_dir: Path, tmp_path: Path) -> None:
    first_base = second_base = free_port_base(2)
    while abs(second_base - first_base) < stack_ports.span(2):
        second_base = free_port_base(2)
    first = Up(checkpoint_dir, tmp_path / "first", first_base)
    second = Up(checkpoint_dir, tmp_path / "second", second_base)
    try:
        first.wait_serving()
        second.wait_serving()
        for up in (first, second):
            assert any(" tokens in " in line for line in up.lines), up.lines  # its own demo generated
            assert {"router", "tokenizer", "sampler", "sharder", "gateway-0", "node-0", "node-1"} <= set(up.children)
            assert any(f"grpc=127.0.0.1:{up.port_base} " in line for line in up.lines if " router " in line)
        assert len(generates(first_base)) > len("Hello") and len(generates(second_base)) > len("Hello")
        ports = [port for port in range(first_base, first_base + stack_ports.span(2)) if bound(port)]
        assert stack_ports.service_ports(first_base)["router"] in ports

        first.popen.send_signal(signal.SIGHUP)  # what closing its terminal sends
        assert first.popen.wait(60) == 128 + signal.SIGHUP
        eventually_sync(lambda: not any(alive(pid) for pid in first.children.values()), 30, "every child gone")
        assert [port for port in ports if bound(port)] == []
        assert len(generates(second_base)) > len("Hello")  # the other stack never noticed
        assert all(alive(pid) for pid in second.children.values())
    finally:
        for up in (first, second):
            up.stop()
            for pid in up.children.values():  # nothing of a failed run may outlive the test
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)


def test_a_synapse_up_killed_outright_takes_its_stack_with_it(checkpoint_dir: Path, tmp_path: Path) -> None:
    """No handler runs on SIGKILL: the kernel's parent-death signal stops every service instead."""
    up = Up(checkpoint_dir, tmp_path / "up", free_port_base(2))
    try:
        up.wait_serving()
        ports = [port for port in range(up.port_base, up.port_base + stack_ports.span(2)) if bound(port)]
        assert len(up.children) == 7 and all(alive(pid) for pid in up.children.values())
        up.popen.kill()
        assert up.popen.wait(30) == -signal.SIGKILL
        eventually_sync(lambda: not any(alive(pid) for pid in up.children.values()), 30, "every child gone")
        assert [port for port in ports if bound(port)] == []
    finally:
        up.stop()
        for pid in up.children.values():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
