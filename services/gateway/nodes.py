"""One connected node as the gateway sees it: its WebSocket, its record, and the FIFO of steps in flight."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.common.nodes import NodeRecord
from services.gateway.answers import StageShape
from services.wire import syn1
from services.wire.steps import StepFailed

log = logging.getLogger(__name__)

# Node-reported timings, in this order, in the STATS frame that opens every step reply.
STATS_FIELDS = ("compute_ms", "queue_ms", "serialize_ms")


@dataclass(frozen=True)
class StepReply:
    """A node's answer to one step: its output frames (raw, forwarded unread) and what it reported."""

    frames: bytes
    compute_ms: float
    queue_ms: float
    serialize_ms: float
    received_at: float  # perf_counter() when the reply arrived
    size: int  # bytes received, stats frame included


def split_reply(data: bytes, max_payload_bytes: int) -> tuple[dict[str, float], bytes]:
    """Strip the leading STATS frame; the rest are output frames. Malformed -> syn1.FrameError."""
    header = syn1.read_header(data, 0, max_payload_bytes=max_payload_bytes)
    if header.msg_type is not syn1.MessageType.STATS:
        raise syn1.FrameError(f"a step reply must start with a STATS frame, got {header.msg_type.name}")
    stats = syn1.decode(memoryview(data)[: header.frame_size]).array.reshape(-1)
    if stats.size < len(STATS_FIELDS):
        raise syn1.FrameError(f"STATS frame has {stats.size} values, expected {len(STATS_FIELDS)}")
    frames = data[header.frame_size :]
    if not frames:
        raise syn1.FrameError("a step reply must hold output frames after its STATS frame, got none")
    for _ in syn1.headers(frames, max_payload_bytes=max_payload_bytes):
        pass  # every frame whole and well-formed; the payloads are forwarded unread
    return dict(zip(STATS_FIELDS, map(float, stats), strict=False)), frames


class NodeConnection:
    """Steps go out in order and come back in order (a node answers its steps FIFO)."""

    def __init__(self, websocket: ServerConnection, record: NodeRecord, max_payload_bytes: int) -> None:
        self.websocket = websocket
        self.record = record
        self.max_payload_bytes = max_payload_bytes
        self._pending: collections.deque[asyncio.Future[StepReply]] = collections.deque()
        self._send_lock = asyncio.Lock()
        self.closed_because: str | None = None
        self.shape: StageShape | None = None  # what its answers must look like, from its assignment

    @property
    def node_id(self) -> str:
        return self.record.node_id

    async def step(self, message: bytes, timeout_s: float) -> StepReply:
        if self.closed_because is not None:
            raise StepFailed.gone(self.node_id, self.closed_because)
        future: asyncio.Future[StepReply] = asyncio.get_running_loop().create_future()
        async with self._send_lock:  # queue order == send order
            self._pending.append(future)
            try:
                await self.websocket.send(message)
            except ConnectionClosed as error:
                self.fail_all(f"connection closed while sending: {error}")
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()  # abandoned: nobody awaits it now; a late reply would still be popped in order
            reason = f"no answer to a step within {timeout_s:.0f} s"
            await self.close(1011, reason)
            raise StepFailed.gone(self.node_id, reason) from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    def on_binary(self, data: bytes) -> None:
        """A step reply arrived; a malformed one raises FrameError (the caller closes the connection)."""
        received_at = time.perf_counter()
        if not self._pending:
            raise syn1.FrameError("binary message with no step in flight")
        stats, frames = split_reply(data, self.max_payload_bytes)
        future = self._pending.popleft()
        if not future.done():
            future.set_result(StepReply(frames, received_at=received_at, size=len(data), **stats))

    def on_step_failed(self, message: str) -> None:
        """The node answered the oldest step with an error instead of frames."""
        if not self._pending:
            raise syn1.FrameError("step_failed with no step in flight")
        future = self._pending.popleft()
        if not future.done():
            future.set_exception(StepFailed.on_node(self.node_id, message))

    async def send_text(self, text: str) -> None:
        try:
            await self.websocket.send(text)
        except ConnectionClosed as error:
            self.fail_all(f"connection closed: {error}")

    def fail_all(self, why: str) -> None:
        self.closed_because = why
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(StepFailed.gone(self.node_id, why))

    async def close(self, code: int, reason: str) -> None:
        self.fail_all(reason)
        await self.websocket.close(code, reason[:120])
