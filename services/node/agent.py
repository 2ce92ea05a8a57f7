"""The native node's life: connect to a gateway, say hello, load assigned shards, serve steps, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from services.common.errors import SynapseError
from services.common.gpt2.model import GPT2Stage
from services.node.settings import NodeSettings
from services.node.shard_store import ShardStore
from services.node.worker import StageWorker
from services.sharder.shards import read_shard
from services.wire import control, syn1

log = logging.getLogger(__name__)

# Steps of at most this many token rows run on the event loop thread (see _in_compute_thread).
INLINE_MAX_ROWS = 64


@dataclass(frozen=True)
class _Swap:
    """A loaded stage waiting to replace the current one at its place in the step queue."""

    worker: StageWorker
    done: asyncio.Future[None]


class NodeAgent:
    def __init__(
        self,
        settings: NodeSettings,
        *,
        node_id: str,
        device: torch.device,
        dtype: torch.dtype,
        memory_bytes: int,
        speed: float,
    ) -> None:
        self.settings = settings
        self.node_id, self.device, self.dtype = node_id, device, dtype
        self.memory_bytes, self.speed = memory_bytes, speed
        self.ssl_context = _ssl_context(settings) if settings.gateway_url.startswith("wss://") else None
        self.store = ShardStore(settings.cache_dir, self.ssl_context)
        self.worker: StageWorker | None = None
        self.loaded_sha256 = ""
        # One compute thread: steps run in order; torch uses its own intra-op threads inside.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.connected = asyncio.Event()
        self._loads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def run_forever(self) -> None:
        """Stay connected; after a drop, retry with exponential backoff and jitter."""
        delay = self.settings.reconnect_min_s
        while True:
            try:
                async with connect(
                    self.settings.gateway_url,
                    ssl=self.ssl_context,
                    max_size=None,
                    compression=None,
                    open_timeout=10,
                ) as websocket:
                    delay = self.settings.reconnect_min_s
                    await self._session(websocket)
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as error:
                log.warning(
                    "gateway_unreachable",
                    extra={"url": self.settings.gateway_url, "error": str(error), "retry_s": round(delay, 2)},
                )
            except InvalidURI as error:
                raise SynapseError(f"bad gateway URL: {error}") from None
            finally:
                self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _session(self, websocket: ClientConnection) -> None:
        hello = control.Hello(
            kind="hello",
            node_id=self.node_id,
            node_kind="native",
            device=str(self.device),
            memory_bytes=self.memory_bytes,
            speed=self.speed,
        )
        await websocket.send(control.dump(hello))
        welcome = json.loads(await asyncio.wait_for(websocket.recv(), 10))
        if welcome.get("kind") != "welcome":
            raise SynapseError(f"gateway refused this node: {welcome.get('message', welcome)}")
        log.info("gateway_joined", extra={"gateway": welcome.get("gateway_id"), "node": self.node_id})
        self.connected.set()
        if self.worker is not None:  # a new session: request ids of the old one mean nothing now
            self.worker.release_all()
        steps: asyncio.Queue[tuple[bytes | _Swap, float]] = asyncio.Queue()
        self._steps = steps
        tasks = [
            asyncio.create_task(self._compute(websocket, steps)),
            asyncio.create_task(self._sweep_idle()),
        ]
        try:
            async for message in websocket:
                if isinstance(message, bytes):
                    steps.put_nowait((message, time.perf_counter()))
                else:
                    await self._control(websocket, message)
        finally:
            for task in [*tasks, *self._loads]:  # a load waits on this session's compute loop: end both
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _control(self, websocket: ClientConnection, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message.get("kind") if isinstance(message, dict) else None
            assign = control.Assign.model_validate(message) if kind == "assign" else None
        except (json.JSONDecodeError, ValidationError) as error:
            log.warning("gateway_message_rejected", extra={"error": str(error)[:200]})
            await websocket.send(control.dump(control.Error(kind="error", message=f"bad control message: {error}")))
            return
        if assign is not None:
            task = asyncio.create_task(self._load(websocket, assign))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        elif kind == "release" and self.worker is not None:
            request_ids = [int(request_id) for request_id in message.get("request_ids", [])]
            self.worker.release(request_ids)
            log.debug("requests_released", extra={"request_ids": request_ids, "cached": self.worker.cached_requests})
        elif kind == "error":
            log.warning("gateway_error", extra={"error": message.get("message")})

    async def _load(self, websocket: ClientConnection, assign: control.Assign) -> None:
        try:
            if assign.sha256 != self.loaded_sha256:

                async def progress(done: int, total: int) -> None:
                    await websocket.send(
                        control.dump(
                            control.Progress(
                                kind="progress", shard_id=assign.shard_id, done_bytes=done, total_bytes=total
                            )
                        )
                    )

                manifest, folder = await self.store.fetch(
                    assign.manifest_url, assign.shard_url, assign.sha256, progress
                )
                stage = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._build_stage, manifest, folder
                )
                worker = StageWorker(
                    stage,
                    top_k=assign.top_k,
                    activation_dtype=assign.activation_dtype,
                    max_batch=self.settings.max_batch,
                )
                # Swap in the compute loop's order: steps received before this assignment still run
                # on the layers they were routed to (the gateway sends none for the new range until ready).
                swapped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._steps.put_nowait((_Swap(worker, swapped), time.perf_counter()))
                await swapped
                self.loaded_sha256 = assign.sha256
            await websocket.send(
                control.dump(control.Ready(kind="ready", shard_id=assign.shard_id, layers=assign.layers))
            )
            log.info("shard_loaded", extra={"shard": assign.shard_id, "layers": list(assign.layers)})
        except SynapseError as error:
            # A node that cannot load its shard blocks the plan: leave cleanly so the router re-plans
            # without it, and join again after the backoff (a transient fault then heals itself).
            log.error("shard_load_failed", extra={"shard": assign.shard_id, "error": str(error)})
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(control.dump(control.Error(kind="error", message=str(error), fatal=True)))
                await websocket.send(control.dump(control.Bye(kind="bye", reason="shard load failed")))
                await websocket.close(1000, "shard load failed")

    def _build_stage(self, manifest, folder) -> GPT2Stage:
        # read_shard gives numpy arrays over one buffer (the sharder has no torch); wrap them, no copy.
        tensors = {name: torch.from_numpy(array) for name, array in read_shard(manifest, folder).items()}
        return GPT2Stage.from_tensors(
            manifest.config,
            manifest.layer_start,
            manifest.layer_end,
            tensors,
            dtype=self.dtype,
            device=self.device,
        )

    async def _compute(self, websocket: ClientConnection, steps: asyncio.Queue[tuple[bytes | _Swap, float]]) -> None:
        """Take every step waiting, run them as one batch, answer each in arrival order; apply shard swaps
        exactly where they fall in that order."""
        while True:
            batch: list[tuple[bytes, float]] = []
            swap: _Swap | None = None
            item, arrived = await steps.get()
            while True:
                if isinstance(item, _Swap):
                    swap = item
                    break
                batch.append((item, arrived))
                if steps.empty() or len(batch) >= self.settings.max_batch:
                    break
                item, arrived = steps.get_nowait()
            if batch:
                await self._answer(websocket, batch)
            if swap is not None:
                self.worker = swap.worker
                swap.done.set_result(None)

    async def _answer(self, websocket: ClientConnection, batch: list[tuple[bytes, float]]) -> None:
        try:
            replies = await self._in_compute_thread(self._run_batch, batch)
        except SynapseError:
            # One bad step must not fail the others: run them one by one, answering each.
            replies = [await self._in_compute_thread(self._run_alone, [step]) for step in batch]
        for reply in replies:
            await websocket.send(reply)

    async def _in_compute_thread(self, function, batch: list[tuple[bytes, float]]):
        """Small steps (decode) run right here: two thread hand-offs cost more than they save. Big ones
        (prefill) go to the compute thread so WebSocket pings are still answered while they run."""
        try:
            rows = sum(syn1.message_rows(message) for message, _ in batch)
        except syn1.FrameError:
            rows = 0  # malformed: the function itself reports it
        if rows <= INLINE_MAX_ROWS:
            return function(batch)
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, batch)

    def _run_alone(self, batch: list[tuple[bytes, float]]) -> bytes | str:
        try:
            return self._run_batch(batch)[0]
        except SynapseError as error:
            log.warning("step_failed", extra={"error": str(error)})
            return control.dump(control.StepFailed(message=str(error)))

    def _run_batch(self, batch: list[tuple[bytes, float]]) -> list[bytes]:
        started = time.perf_counter()
        decoded = [syn1.decode_frames(message) for message, _ in batch]
        frames = [frame for message_frames in decoded for frame in message_frames]
        decoded_at = time.perf_counter()
        if self.worker is None:
            raise SynapseError("step received before any shard was loaded")
        outputs = self.worker.run(frames)
        computed_at = time.perf_counter()
        replies, offset = [], 0
        encode_s = 0.0
        for (_, arrived), message_frames in zip(batch, decoded, strict=True):
            encode_started = time.perf_counter()
            body = self.worker.encode(outputs[offset : offset + len(message_frames)])
            encode_s += time.perf_counter() - encode_started
            offset += len(message_frames)
            stats = np.array(
                [
                    [
                        (computed_at - decoded_at) * 1e3,
                        (started - arrived) * 1e3,
                        ((decoded_at - started) + encode_s) * 1e3,
                    ]
                ],
                dtype=np.float32,
            )
            replies.append(syn1.encode(syn1.Frame.stats(stats)) + body)
        return replies

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.settings.idle_timeout_s))
            if self.worker is not None:
                freed = self.worker.release_idle(self.settings.idle_timeout_s)
                if freed:
                    log.info("caches_expired", extra={"requests": freed})


def _ssl_context(settings: NodeSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.tls_ca:
        context.load_verify_locations(settings.tls_ca)
    return context
