"""One connected node as the gateway sees it: its WebSocket, its record, and the FIFO of steps in flight."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.common.errors import Unavailable
from services.gateway.registry import NodeRecord
from services.wire import syn1

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


class NodeGone(Unavailable):
    """The node disconnected or stopped answering while a step was in flight."""

    def __init__(self, node_id: str, why: str) -> None:
        super().__init__(f"node {node_id} is gone: {why}")
        self.node_id = node_id


class StepFailedOnNode(Unavailable):
    """The node could not run a step (e.g. it lost the request's cache); the node itself stays."""

    def __init__(self, node_id: str, why: str) -> None:
        super().__init__(f"node {node_id} failed a step: {why}")
        self.node_id = node_id


def split_reply(data: bytes, max_payload_bytes: int) -> tuple[dict[str, float], bytes]:
    """Strip the leading STATS frame; the rest are output frames. Malformed -> syn1.FrameError."""
    header = syn1.read_header(data, 0, max_payload_bytes=max_payload_bytes)
    if header.msg_type is not syn1.MessageType.STATS:
        raise syn1.FrameError(f"a step reply must start with a STATS frame, got {header.msg_type.name}")
    stats = syn1.decode(memoryview(data)[: header.frame_size]).array.reshape(-1)
    if stats.size < len(STATS_FIELDS):
        raise syn1.FrameError(f"STATS frame has {stats.size} values, expected {len(STATS_FIELDS)}")
    frames = data[header.frame_size :]
    _check_framing(frames, max_payload_bytes)
    return dict(zip(STATS_FIELDS, map(float, stats), strict=False)), frames


def _check_framing(message: bytes, max_payload_bytes: int) -> None:
    """Every frame header is valid and the message ends on a frame boundary; payloads stay unread."""
    if not message:
        raise syn1.FrameError("a step reply must hold output frames after its STATS frame, got none")
    offset = 0
    while offset < len(message):
        header = syn1.read_header(message, offset, max_payload_bytes=max_payload_bytes)
        if offset + header.frame_size > len(message):
            raise syn1.FrameError(
                f"truncated frame at byte {offset}: header declares {header.frame_size} bytes, "
                f"got {len(message) - offset}"
            )
        offset += header.frame_size


class NodeConnection:
    """Steps go out in order and come back in order (a node answers its steps FIFO)."""

    def __init__(self, websocket: ServerConnection, record: NodeRecord, max_payload_bytes: int) -> None:
        self.websocket = websocket
        self.record = record
        self.max_payload_bytes = max_payload_bytes
        self._pending: collections.deque[asyncio.Future[StepReply]] = collections.deque()
        self._send_lock = asyncio.Lock()
        self.closed_because: str | None = None

    @property
    def node_id(self) -> str:
        return self.record.node_id

    async def step(self, message: bytes, timeout_s: float) -> StepReply:
        if self.closed_because is not None:
            raise NodeGone(self.node_id, self.closed_because)
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
            raise NodeGone(self.node_id, reason) from None
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
            future.set_exception(StepFailedOnNode(self.node_id, message))

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
                future.set_exception(NodeGone(self.node_id, why))

    async def close(self, code: int, reason: str) -> None:
        self.fail_all(reason)
        await self.websocket.close(code, reason[:120])
