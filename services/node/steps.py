"""The native node's step loop: steps batched in arrival order, run inline or on the compute thread, each
answered with a STATS frame then its output; shard swaps applied exactly where they fall in that order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection

from services.common.errors import SynapseError
from services.node.worker import StageWorker
from services.wire import control, syn1

log = logging.getLogger(__name__)

# Steps of at most this many token rows run on the event loop thread (see StepLoop._off_loop).
INLINE_MAX_ROWS = 64

Arrival = tuple[bytes, float]  # a step's SYN1 message and perf_counter() when it arrived
Result = TypeVar("Result")


@dataclass(frozen=True)
class Swap:
    """A loaded stage waiting to replace the current one at its place in the step queue."""

    worker: StageWorker
    done: asyncio.Future[None]


class StepLoop:
    """Steps of one gateway session in, replies out, FIFO. The worker (the loaded stage) outlives sessions."""

    def __init__(self, executor: ThreadPoolExecutor, max_batch: int, wrong_numbers: bool = False) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.wrong_numbers = wrong_numbers  # test-only fault injection (SYNAPSE_NODE_FAULT_INJECTION)
        self.worker: StageWorker | None = None
        self._queue: asyncio.Queue[Arrival | Swap] = asyncio.Queue()

    def new_session(self) -> None:
        """A new connection: request ids of the old one mean nothing now, and its queued steps are void."""
        self._queue = asyncio.Queue()
        if self.worker is not None:
            self.worker.release_all()

    def submit(self, message: bytes) -> None:
        self._queue.put_nowait((message, time.perf_counter()))

    async def swap(self, worker: StageWorker) -> None:
        """Serve with `worker` from here on in step order: steps received before still run on the old stage
        (the gateway routes none to the new range until the node says ready)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Swap(worker, done))
        await done

    async def serve(self, websocket: ClientConnection) -> None:
        """Take every step waiting (up to max_batch), run them as one batch, answer each in arrival order."""
        queue = self._queue
        while True:
            batch: list[Arrival] = []
            item = await queue.get()
            while not isinstance(item, Swap):
                batch.append(item)
                if queue.empty() or len(batch) >= self.max_batch:
                    break
                item = queue.get_nowait()
            if batch:
                for reply in await self._answer(batch):
                    await websocket.send(reply)
            if isinstance(item, Swap):
                self.worker = item.worker
                item.done.set_result(None)

    async def _answer(self, batch: list[Arrival]) -> list[bytes | str]:
        try:
            return list(await self._off_loop(self._run_batch, batch))
        except SynapseError:
            # One bad step must not fail the others: run them one by one, answering each.
            return [await self._off_loop(self._run_alone, [step]) for step in batch]

    async def _off_loop(self, function: Callable[[list[Arrival]], Result], batch: list[Arrival]) -> Result:
        """Small steps (decode) run right here: two thread hand-offs cost more than they save. Big ones
        (prefill) go to the compute thread so WebSocket pings are still answered while they run."""
        try:
            rows = sum(syn1.message_rows(message) for message, _ in batch)
        except syn1.FrameError:
            rows = 0  # malformed: the function itself reports it
        if rows <= INLINE_MAX_ROWS:
            return function(batch)
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, batch)

    def _run_alone(self, batch: list[Arrival]) -> bytes | str:
        """One step's reply, or the step_failed message that answers it in its place."""
        try:
            return self._run_batch(batch)[0]
        except SynapseError as error:
            log.warning("step_failed", extra={"error": str(error)})
            return control.dump(control.StepFailed(message=str(error)))

    def _run_batch(self, batch: list[Arrival]) -> list[bytes]:
        started = time.perf_counter()
        decoded = [syn1.decode_frames(message) for message, _ in batch]
        frames = [frame for message_frames in decoded for frame in message_frames]
        decoded_at = time.perf_counter()
        if self.worker is None:
            raise SynapseError("step received before any shard was loaded")
        outputs = self.worker.run(frames)
        if self.wrong_numbers:
            outputs = [subtly_wrong(frame) for frame in outputs]
        computed_at = time.perf_counter()
        replies, offset, encode_s = [], 0, 0.0
        for (_, arrived), message_frames in zip(batch, decoded, strict=True):
            encode_started = time.perf_counter()
            body = self.worker.encode(outputs[offset : offset + len(message_frames)])
            encode_s += time.perf_counter() - encode_started
            offset += len(message_frames)
            stats = (computed_at - decoded_at, started - arrived, (decoded_at - started) + encode_s)
            replies.append(stats_frame(*stats) + body)
        return replies


def subtly_wrong(frame: syn1.Frame) -> syn1.Frame:
    """TEST ONLY: the same answer, each value moved by 5% of its row's largest magnitude; shapes, ids and
    finiteness stay right, so only recomputing the step elsewhere can tell."""
    values = frame.to_float32()
    shifted = values + 0.05 * np.abs(values).max(axis=1, keepdims=True)
    if frame.msg_type is syn1.MessageType.ACTIVATION:
        return syn1.Frame.activation(frame.request_id, frame.position, shifted, predicted=frame.predicted)
    if frame.msg_type is syn1.MessageType.OUTPUT:
        return syn1.Frame.output(frame.request_id, frame.position, shifted * 1.05, frame.token_ids)
    return syn1.Frame.logits(frame.request_id, frame.position, shifted)


def stats_frame(compute_s: float, queue_s: float, serialize_s: float) -> bytes:
    """The STATS frame that opens every step reply: compute, queue and serialize ms, in the order the gateway
    reads them (gateway/nodes.py STATS_FIELDS)."""
    values = np.array([[compute_s * 1e3, queue_s * 1e3, serialize_s * 1e3]], dtype=np.float32)
    return syn1.encode(syn1.Frame.stats(values))
