"""Helpers for the gateway and node integration tests: in-process gateways on port 0, a real Redis, nodes
that are real WebSocket clients speaking the protocol by hand, real NodeAgents, and WatchNodes collectors.

They are context managers, not pytest fixtures, so each test module builds the fixtures it needs from them
(tests/integration/conftest.py belongs to the tokenizer and sampler tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from websockets.asyncio.client import ClientConnection, connect

from services.common.pb import gateway_pb2, gateway_pb2_grpc, router_pb2
from services.common.server import GrpcServer, channel
from services.gateway.__main__ import start_gateway, stop_gateway
from services.gateway.hub import Hub
from services.gateway.settings import GatewaySettings
from services.gateway.websocket_server import WS_PATH, NodeEndpoint
from services.node.agent import NodeAgent
from services.node.settings import NodeSettings
from services.wire import syn1
from services.wire.gateway_client import GatewayClient
from services.wire.steps import Stage, Step, TokenInput

# What a node reports in the STATS frame of every fake reply, milliseconds.
FAKE_STATS_MS = (1.5, 0.25, 0.125)  # compute, queue, serialize
FAKE_HIDDEN = 4  # columns of the fake activations
STATE_NAMES = {value: name for name, value in router_pb2.NodeState.items()}


# --- gateways -----------------------------------------------------------------------------------


def gateway_settings(**overrides: object) -> GatewaySettings:
    """Small, fast settings; the registry in memory unless redis_url is given."""
    values: dict[str, object] = dict(
        host="127.0.0.1", port=0, ws_host="127.0.0.1", ws_port=0, metrics_port=None,
        shutdown_grace_s=0.2, heartbeat_s=0.5, heartbeat_timeout_s=2.0, step_timeout_s=10.0,
        redis_url=None,
    )  # fmt: skip
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class RunningGateway:
    settings: GatewaySettings
    server: GrpcServer
    endpoint: NodeEndpoint
    hub: Hub
    channel: grpc.aio.Channel = field(init=False)
    stub: gateway_pb2_grpc.GatewayServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = channel(self.address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    @property
    def address(self) -> str:
        return self.hub.address

    @property
    def ws_port(self) -> int:
        return self.endpoint.port

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://127.0.0.1:{self.endpoint.port}{WS_PATH}"

    async def stop(self) -> None:
        await self.channel.close()
        await stop_gateway(self.server, self.endpoint, self.hub)


async def start_running_gateway(**overrides: object) -> RunningGateway:
    """A started gateway; the caller stops it (running_gateway does that for a with block)."""
    settings = gateway_settings(**overrides)
    return RunningGateway(settings, *await start_gateway(settings))


@contextlib.asynccontextmanager
async def running_gateway(**overrides: object) -> AsyncIterator[RunningGateway]:
    gateway = await start_running_gateway(**overrides)
    try:
        yield gateway
    finally:
        await gateway.stop()


# --- fake stages: what a node computes, reduced to something a test can check ------------------


def embed(frame: syn1.Frame) -> syn1.Frame:
    """First stage: TOKENS (rows, 1) -> ACTIVATION (rows, FAKE_HIDDEN), each row filled with its token id."""
    hidden = np.repeat(frame.array.astype(np.float32), FAKE_HIDDEN, axis=1)
    return syn1.Frame.activation(frame.request_id, frame.position, hidden)


def head(frame: syn1.Frame) -> syn1.Frame:
    """Last stage: TOKENS or ACTIVATION -> OUTPUT top-2 of the last row: ids (value of the last row + 1, 0)."""
    tokens = frame.msg_type is syn1.MessageType.TOKENS
    last = int(frame.array[-1, 0]) if tokens else int(frame.to_float32()[-1, 0])
    ids = np.array([[last + 1, 0]], dtype=np.int32)
    values = np.array([[2.0, 1.0]], dtype=np.float32)
    return syn1.Frame.output(frame.request_id, frame.position + frame.rows - 1, values, ids)


def reply_bytes(frames: list[syn1.Frame], stats_ms: tuple[float, ...] = FAKE_STATS_MS) -> bytes:
    """A node's answer to one step: the STATS frame, then its output frames."""
    stats = syn1.encode(syn1.Frame.stats(np.array([stats_ms], dtype=np.float32)))
    return stats + syn1.encode_frames(frames)


# --- fake nodes: real WebSocket clients ----------------------------------------------------------


def hello(node_id: str, **fields: object) -> dict[str, object]:
    return {"kind": "hello", "node_id": node_id, "node_kind": "native", "device": "cpu",
            "memory_bytes": 1 << 30, "speed": 100.0, **fields}  # fmt: skip


class FakeNode:
    """A node as the gateway sees it, driven by the test: text messages land in `control`, step messages in
    `steps`; with `compute` set, every step is answered at once with compute applied to each frame."""

    def __init__(self, websocket: ClientConnection, node_id: str, welcome: dict[str, object]) -> None:
        self.websocket = websocket
        self.node_id = node_id
        self.welcome = welcome
        self.compute: Callable[[syn1.Frame], syn1.Frame] | None = None
        self.control: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.steps: asyncio.Queue[bytes] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def join(
        cls, url: str, node_id: str, compute: Callable[[syn1.Frame], syn1.Frame] | None = None, **fields: object
    ) -> FakeNode:
        websocket = await connect(url, compression=None, open_timeout=5, close_timeout=1, max_size=None)
        await websocket.send(json.dumps(hello(node_id, **fields)))
        welcome = json.loads(await asyncio.wait_for(websocket.recv(), 5))
        assert welcome["kind"] == "welcome", welcome
        node = cls(websocket, node_id, welcome)
        node.compute = compute
        return node

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.websocket:
                if isinstance(message, str):
                    self.control.put_nowait(json.loads(message))
                elif self.compute is not None:
                    frames = syn1.decode_frames(message)
                    await self.websocket.send(reply_bytes([self.compute(frame) for frame in frames]))
                else:
                    self.steps.put_nowait(message)

    async def next_control(self, timeout_s: float = 5.0) -> dict[str, object]:
        return await asyncio.wait_for(self.control.get(), timeout_s)

    async def next_step(self, timeout_s: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.steps.get(), timeout_s)

    async def send_json(self, **message: object) -> None:
        await self.websocket.send(json.dumps(message))

    async def close(self) -> None:
        await self.websocket.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def closed_with(websocket: ClientConnection, timeout_s: float = 5.0) -> tuple[list[object], int | None]:
    """Everything the server sent until it closed the connection, and its close code."""
    received: list[object] = []
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            async for message in websocket:
                received.append(json.loads(message) if isinstance(message, str) else message)
    await asyncio.wait_for(websocket.wait_closed(), timeout_s)
    return received, websocket.close_code


# --- real native nodes --------------------------------------------------------------------------


def make_agent(gateway_url: str, node_id: str, cache_dir: Path, **settings: object) -> NodeAgent:
    """A NodeAgent on the CPU in float32, without the start-up benchmark."""
    values: dict[str, object] = dict(reconnect_min_s=0.05, reconnect_max_s=0.5, metrics_port=None)
    values.update(settings)
    node_settings = NodeSettings(gateway_url=gateway_url, node_id=node_id, cache_dir=cache_dir, **values)
    return NodeAgent(
        node_settings, node_id=node_id, device=torch.device("cpu"), dtype=torch.float32,
        memory_bytes=1 << 30, speed=100.0,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running_agent(agent: NodeAgent, timeout_s: float = 10.0) -> AsyncIterator[NodeAgent]:
    """Run the agent's connect-and-serve loop; yields once it has been welcomed."""
    task = asyncio.create_task(agent.run_forever())
    try:
        await asyncio.wait_for(agent.connected.wait(), timeout_s)
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        agent.executor.shutdown(wait=True)


# --- gRPC side ----------------------------------------------------------------------------------


class NodeWatch:
    """A WatchNodes stream collected in the background; `until` waits for a matching event."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
        self.events: list[gateway_pb2.NodeEvent] = []
        self._changed = asyncio.Event()
        self._call = stub.WatchNodes(gateway_pb2.WatchNodesRequest())
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for event in self._call:
                self.events.append(event)
                self._changed.set()

    def states(self, node_id: str) -> list[str]:
        return [state_name(e) for e in self.events if e.node.node_id == node_id]

    async def until(self, node_id: str, state: str, timeout_s: float = 5.0) -> gateway_pb2.NodeEvent:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for event in self.events:
                if event.node.node_id == node_id and state_name(event) == state:
                    return event
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no {state!r} event for {node_id} in {timeout_s} s: {self.states(node_id)}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def state_name(event: gateway_pb2.NodeEvent) -> str:
    return STATE_NAMES[event.node.state].removeprefix("NODE_STATE_").lower()


@contextlib.asynccontextmanager
async def watching(gateway: RunningGateway) -> AsyncIterator[NodeWatch]:
    watch = NodeWatch(gateway.stub)
    try:
        yield watch
    finally:
        await watch.close()


@contextlib.asynccontextmanager
async def run_client(gateway: RunningGateway) -> AsyncIterator[GatewayClient]:
    """The router's own client for the Run stream."""
    client = GatewayClient(gateway.address)
    try:
        yield client
    finally:
        await client.close()


def stage(node_id: str, start: int, end: int, gateway_address: str = "") -> Stage:
    return Stage(node_id, (start, end), gateway_address)


def token_step(route: list[Stage], request_id: int, position: int, token_ids: list[int]) -> Step:
    """A step feeding token ids into the first stage of `route`."""
    return Step(tuple(route), tokens=(TokenInput(request_id, position, token_ids),))


def frames_step(route: list[Stage], frames: bytes) -> Step:
    """A step feeding SYN1 frames (activations) into the first stage of `route`."""
    return Step(tuple(route), frames=frames)
