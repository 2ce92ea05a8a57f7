"""The native node's life: join a gateway, load the shards it is assigned, serve steps, follow releases.

The parts: connection.py (connect, hello, reconnect), steps.py (the step loop), worker.py (the
compute). This module holds them together and answers the gateway's control messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from services.common.errors import InvalidArgument, SynapseError
from services.common.gpt2.model import GPT2Stage
from services.node import metrics
from services.node.connection import ssl_context, stay_connected
from services.node.settings import NodeSettings
from services.node.shard_store import ShardStore
from services.node.steps import StepLoop
from services.node.worker import StageWorker
from services.sharder.manifest import ShardManifest
from services.sharder.shards import read_shard
from services.wire import control

log = logging.getLogger(__name__)


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
        self.store = ShardStore(settings.cache_dir, ssl_context(settings), retry_s=settings.shard_retry_s)
        # One compute thread: steps run in order; torch uses its own intra-op threads inside.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.steps = StepLoop(
            self.executor, settings.max_batch, wrong_numbers=settings.fault_injection == "wrong_numbers"
        )
        self.loaded_sha256 = ""
        self.connected = asyncio.Event()
        self._loads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        metrics.follow(lambda: self.steps.worker)

    @property
    def worker(self) -> StageWorker | None:
        return self.steps.worker

    def hello(self) -> control.Hello:
        return control.Hello(
            kind="hello",
            node_id=self.node_id,
            node_kind="native",
            device=str(self.device),
            memory_bytes=self.memory_bytes,
            speed=self.speed,
            join_token=self.settings.join_token,
        )

    async def run_forever(self) -> None:
        await stay_connected(self.settings, self.hello(), self._session)

    async def _session(self, websocket: ClientConnection, welcome: control.Welcome) -> None:
        self.connected.set()
        self.steps.new_session()
        tasks = [asyncio.create_task(self.steps.serve(websocket)), asyncio.create_task(self._sweep_idle())]
        try:
            async for message in websocket:
                if isinstance(message, bytes):
                    self.steps.submit(message)
                else:
                    await self._control(websocket, message)
        finally:
            self.connected.clear()
            for task in [*tasks, *self._loads]:  # a load waits on this session's step loop: end both
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _control(self, websocket: ClientConnection, text: str) -> None:
        try:
            message = control.parse_gateway_message(text)
        except InvalidArgument as error:
            log.warning("gateway_message_rejected", extra={"error": str(error)[:200]})
            await websocket.send(control.dump(control.Error(kind="error", message=f"bad control message: {error}")))
            return
        if isinstance(message, control.Assign):
            task = asyncio.create_task(self._load(websocket, message))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        elif isinstance(message, control.Release) and self.worker is not None:
            self.worker.release(message.request_ids)
            log.debug(
                "requests_released",
                extra={"request_ids": message.request_ids, "cached": self.worker.cached_requests},
            )
        elif isinstance(message, control.GatewayError):
            log.warning("gateway_error", extra={"error": message.message})

    async def _load(self, websocket: ClientConnection, assign: control.Assign) -> None:
        if self.settings.fault_injection == "never_ready":
            log.warning("fault_injection_never_ready", extra={"shard": assign.shard_id})
            return
        try:
            if assign.sha256 != self.loaded_sha256:
                await self.steps.swap(await self._load_worker(websocket, assign))
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

    async def _load_worker(self, websocket: ClientConnection, assign: control.Assign) -> StageWorker:
        """Download (or find in the cache) the assigned shard and build its stage on the compute thread."""

        async def progress(done: int, total: int) -> None:
            message = control.Progress(kind="progress", shard_id=assign.shard_id, done_bytes=done, total_bytes=total)
            await websocket.send(control.dump(message))

        manifest, folder = await self.store.fetch(assign.manifest_url, assign.shard_url, assign.sha256, progress)
        # On the compute thread: the worker allocates its KV pool and captures its CUDA graphs.
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._build, assign, manifest, folder)

    def _build(self, assign: control.Assign, manifest: ShardManifest, folder: Path) -> StageWorker:
        # read_shard gives numpy arrays over one buffer (the sharder has no torch); wrap them, no copy.
        tensors = {name: torch.from_numpy(array) for name, array in read_shard(manifest, folder).items()}
        stage = GPT2Stage.from_tensors(
            manifest.config, manifest.layer_start, manifest.layer_end, tensors, dtype=self.dtype, device=self.device
        )
        slots = kv_slots(stage, self.memory_bytes, self.settings.kv_slots or 2 * self.settings.max_batch)
        log.info("kv_pool", extra={"slots": slots, "shard": assign.shard_id})
        return StageWorker(
            stage,
            top_k=assign.top_k,
            activation_dtype=assign.activation_dtype,
            max_batch=self.settings.max_batch,
            kv_slots=slots,
        )

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.settings.idle_timeout_s))
            if self.worker is not None:
                freed = self.worker.release_idle(self.settings.idle_timeout_s)
                if freed:
                    log.info("caches_expired", extra={"requests": freed})


def kv_slots(stage: GPT2Stage, memory_bytes: int, wanted: int) -> int:
    """KV cache slots (one per concurrent request) that fit the node's memory budget beside the weights,
    at most `wanted` and at least one. A slot holds every position of every layer of the stage."""
    config = stage.config
    weights = sum(parameter.nbytes for parameter in stage.parameters())
    per_slot = len(stage.h) * config.n_positions * 2 * config.n_embd * next(stage.parameters()).element_size()
    return max(1, min(wanted, (memory_bytes - weights) // max(per_slot, 1)))
