"""Start the whole stack as separate processes (tokenizer, sampler, sharder, gateways, router, nodes, Redis).

Used by `synapse up` and by the end-to-end tests; each service gets its settings through its
`SYNAPSE_<SERVICE>_*` variables and logs to <workdir>/logs/<name>.log.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import stack_ports
from services.common.errors import Unavailable
from services.common.join_tokens import issue, new_secret

REDIS_START_TIMEOUT_S = 10.0
JOIN_TOKEN_DAYS = 365  # the stack's own token: nodes show it at every reconnect while the stack runs
# Below Linux's ephemeral range (32768-60999): a port the kernel hands to outgoing connections can be
# taken between choosing it here and the service binding it, which failed stacks at random.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()  # never the same port twice from one process, even once its first user has gone


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the range the kernel picks client ports from, and not handed out
    before by this process (a stack restarting a process keeps its ports, another stack must not take them)."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise Unavailable(f"no free port in {_PORT_RANGE} after 200 tries")


def free_port_base(nodes: int = 2) -> int:
    """A port base (services/stack_ports.py) whose whole span is free on 127.0.0.1 now, in the same range, and
    none of it handed out before by this process (nor after: the span is reserved as free_port's ports are)."""
    size = stack_ports.span(nodes)
    for _ in range(200):
        base = random.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - size)
        span = range(base, base + size)
        if not _handed_out.intersection(span) and all(_free(port) for port in span):
            _handed_out.update(span)
            return base
    raise Unavailable(f"no {size} free ports in a row in {_PORT_RANGE} after 200 tries")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    grpc_address: str | None = None
    metrics_port: int | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)  # what it was started with (start_again reuses it)
    cleaned: bool = False  # its group was swept after it exited (never twice: the pid may be reused later)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Stack:
    model: str
    workdir: Path
    nodes: int = 2
    gateways: int = 1
    redis_url: str | None = None
    random_fallback: bool = True
    node_env: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    default_ports: bool = False  # the services' documented default ports instead of free ones
    port_base: int | None = None  # every port derived from this base (services/stack_ports.py) instead
    on_spawn: Callable[[Process], None] | None = None  # told of every process as it starts (synapse up prints)
    # Each process gets SIGTERM when this one dies, even by SIGKILL (services/common/orphan_guard.py). Only
    # where every process is started from a thread that lives as long as the stack: Linux sends the signal
    # when the starting thread ends.
    die_with_parent: bool = False
    # The gateways' join secret, made for this stack; its nodes get a token signed with it. None: open gateways.
    join_secret: str | None = field(default_factory=new_secret)

    def __post_init__(self) -> None:
        expires_at = int(time.time()) + JOIN_TOKEN_DAYS * 86400
        self.join_token = issue(self.join_secret, expires_at=expires_at) if self.join_secret else ""
        names = ("tokenizer", "sampler", "sharder", "sharder_http", "router")
        self._metrics_ports: dict[str, int] = {}  # by process name: a restarted process binds the same one
        self._node_names: list[str] = []  # in start order: the n-th gets the port base's n-th node port
        if self.port_base is not None:
            stack_ports.check_base(self.port_base, self.gateways, self.nodes)
            self.ports = stack_ports.service_ports(self.port_base)
            self.gateway_ports = [stack_ports.gateway_ports(self.port_base, index) for index in range(self.gateways)]
        elif self.default_ports:
            self.ports = dict(zip(names, (50051, 50052, 50053, 8081, 50050), strict=True))
            self.gateway_ports = [(50055 + 10 * index, 8765 + index) for index in range(self.gateways)]
        else:
            self.ports = {name: free_port() for name in names}
            self.gateway_ports = [(free_port(), free_port()) for _ in range(self.gateways)]  # (grpc, ws)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports['router']}"

    def gateway_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.gateway_ports[index][1]}/ws"

    def start(self, timeout_s: float = 120.0) -> None:
        common = {"LOG_FORMAT": "json"}
        self._spawn("tokenizer", {"PORT": self.ports["tokenizer"], **common}, grpc_port=self.ports["tokenizer"])
        self._spawn("sampler", {"PORT": self.ports["sampler"], **common}, grpc_port=self.ports["sampler"])
        self._spawn(
            "sharder",
            {
                "PORT": self.ports["sharder"],
                "HTTP_PORT": self.ports["sharder_http"],
                "MODEL": self.model,
                "SHARDS_DIR": self.workdir / "shards",
                "RANDOM_FALLBACK": str(self.random_fallback).lower(),
                **common,
            },
            grpc_port=self.ports["sharder"],
        )
        for index, (grpc_port, ws_port) in enumerate(self.gateway_ports):
            self._spawn(
                "gateway",
                {
                    "PORT": grpc_port,
                    "WS_PORT": ws_port,
                    "GATEWAY_ID": f"gateway-{index}",
                    **self._join_secrets(),
                    **common,
                },
                grpc_port=grpc_port,
                name=f"gateway-{index}",
            )
        self.wait_healthy(timeout_s)
        # With Redis the gateways register themselves and the router finds them; without, it is told.
        gateways = ",".join(f'"127.0.0.1:{grpc_port}"' for grpc_port, _ in self.gateway_ports)
        self._spawn(
            "router",
            {
                "PORT": self.ports["router"],
                "GATEWAYS": "[]" if self.redis_url else f"[{gateways}]",
                "TOKENIZER_ADDRESS": f"127.0.0.1:{self.ports['tokenizer']}",
                "SHARDER_ADDRESS": f"127.0.0.1:{self.ports['sharder']}",
                **common,
            },
            grpc_port=self.ports["router"],
        )
        for index in range(self.nodes):
            self.add_node(f"node-{index}", gateway=index % self.gateways)
        self.wait_healthy(timeout_s)

    def node_gateway_urls(self, gateway: int = 0) -> str:
        """A node's SYNAPSE_NODE_GATEWAY_URL: its own gateway first, then every other one, to fail over to."""
        order = [*range(gateway, self.gateways), *range(gateway)]
        return ",".join(self.gateway_url(index) for index in order)

    def add_node(self, node_id: str, gateway: int = 0, **settings: object) -> Process:
        values = {
            "GATEWAY_URL": self.node_gateway_urls(gateway),
            "NODE_ID": node_id,
            "LOG_FORMAT": "json",
            "CACHE_DIR": self.workdir / "node-cache" / node_id,
            **({"JOIN_TOKEN": self.join_token} if self.join_token else {}),
            **settings,
        }
        return self._spawn("node", values, name=node_id, extra=self.node_env)

    def _join_secrets(self) -> dict[str, str]:
        return {"JOIN_SECRETS": self.join_secret} if self.join_secret else {}

    def _spawn(
        self,
        service: str,
        settings: dict[str, object],
        *,
        grpc_port: int | None = None,
        name: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> Process:
        name = name or service
        settings = {"METRICS_PORT": self._metrics_port(name, service), **settings}
        env = {**os.environ, **self.env, **(extra or {})}
        if self.redis_url:
            env["SYNAPSE_REDIS_URL"] = self.redis_url
        prefix = f"SYNAPSE_{service.upper()}_"
        env.update({prefix + key: str(value) for key, value in settings.items()})
        log_path = self.workdir / "logs" / f"{name}.log"
        address = f"127.0.0.1:{grpc_port}" if grpc_port else None
        process = Process(
            name, _popen(self._command(service), env, log_path), log_path, address, int(str(settings["METRICS_PORT"]))
        )
        process.env = env
        self.processes.append(process)
        if self.on_spawn is not None:
            self.on_spawn(process)
        return process

    def start_again(self, process: Process, timeout_s: float = 120.0) -> None:
        """Start a stopped (or killed) process again with the same settings: same ports, same log."""
        assert process.popen.poll() is not None, f"{process.name} is still running"
        service = process.popen.args[-1].removeprefix("services.")  # the module is the last argument
        process.popen, process.cleaned = _popen(self._command(service), process.env, process.log_path), False
        if self.on_spawn is not None:
            self.on_spawn(process)
        self.wait_healthy(timeout_s)

    def _command(self, service: str) -> list[str]:
        module = f"services.{service}"
        if self.die_with_parent:
            return [sys.executable, "-m", "services.common.orphan_guard", str(os.getpid()), module]
        return [sys.executable, "-m", module]

    def _metrics_port(self, name: str, service: str) -> int:
        """A free port, or the port base's; the same for a process started again under its name."""
        if name not in self._metrics_ports:
            if self.port_base is None:
                port = free_port()
            elif service == "node":
                index = len(self._node_names)
                if stack_ports.NODE_METRICS_OFFSET + index >= stack_ports.span(self.nodes):
                    raise Unavailable(f"no metrics port left in the stack's span for a node number {index + 1}")
                self._node_names.append(name)
                port = stack_ports.metrics_port(self.port_base, name, node_index=index)
            else:
                port = stack_ports.metrics_port(self.port_base, name)
            self._metrics_ports[name] = port
        return self._metrics_ports[name]

    def process(self, name: str) -> Process:
        """The newest process started under `name` (a restarted node's current one)."""
        return next(p for p in reversed(self.processes) if p.name == name)

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until every gRPC service answers SERVING; a process that dies fails at once with its log."""
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            while process.grpc_address:
                if process.popen.poll() is not None:
                    raise Unavailable(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
                if _serving(process.grpc_address):
                    break
                if time.monotonic() > deadline:
                    raise Unavailable(f"{process.name} not healthy after {timeout_s:.0f} s:\n{process.tail()}")
                time.sleep(0.2)

    def stop_process(self, process: Process, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Signal the process's group (a service and anything it started), SIGKILL it after timeout_s."""
        self._signal_group(process, sig)
        self._reap(process, time.monotonic() + timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process: SIGTERM to every group at once (newest first), then SIGKILL what is left after
        timeout_s. Each group is killed after its leader exits too, so nothing a service started outlives it."""
        for process in reversed(self.processes):
            self._signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in reversed(self.processes):
            self._reap(process, deadline)

    @staticmethod
    def _signal_group(process: Process, sig: int) -> None:
        if process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, sig)

    @staticmethod
    def _reap(process: Process, deadline: float) -> None:
        if process.cleaned:
            return
        try:
            process.popen.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # members of the group left behind
            os.killpg(process.popen.pid, signal.SIGKILL)
        process.cleaned = True

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _popen(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


class RedisProcess:
    """One real redis-server on a fixed port, nothing persisted: start() waits until it accepts connections; it can
    be stopped (SIGKILL loses everything at once, as a crash would) and started again on the same port."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if not executable:
            raise Unavailable("redis-server is not installed: run `bash ops/setup.sh` (Debian package redis-server)")
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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


@contextlib.contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real redis-server on a free port, nothing persisted; yields its URL once it accepts connections."""
    server = RedisProcess(folder, port)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _wait_listening(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise Unavailable(f"redis-server exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"redis-server did not listen on {port} within {REDIS_START_TIMEOUT_S:g} s:\n"
                    f"{log_path.read_text()[-2000:]}"
                ) from None
            time.sleep(0.05)
