"""A node's compute: one loaded stage, a KV cache per request, and steps of many requests run as one batch."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.gpt2.model import GPT2Stage, KVCache, top_k
from services.wire import syn1

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    cache: KVCache
    last_used: float


class StageWorker:
    """Runs steps for a stage. Thread-safe: steps run in an executor thread, releases come from the loop."""

    def __init__(self, stage: GPT2Stage, *, top_k: int, activation_dtype: str, max_batch: int) -> None:
        self.stage = stage
        self.top_k = top_k
        self.wire_dtype = syn1.ACTIVATION_DTYPES[activation_dtype]
        self.max_batch = max_batch
        self.device = next(stage.parameters()).device
        self.dtype = next(stage.parameters()).dtype
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self.requests_served = 0

    @property
    def cached_requests(self) -> int:
        return len(self._entries)

    def release(self, request_ids: list[int]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._entries.pop(request_id, None)

    def release_all(self) -> None:
        with self._lock:
            self._entries.clear()

    def release_idle(self, idle_timeout_s: float) -> int:
        cutoff = time.monotonic() - idle_timeout_s
        with self._lock:
            stale = [request_id for request_id, entry in self._entries.items() if entry.last_used < cutoff]
            for request_id in stale:
                del self._entries[request_id]
        return len(stale)

    def run(self, frames: list[syn1.Frame]) -> list[syn1.Frame]:
        """One forward over every request in `frames` (one frame per request); outputs in the same order."""
        inputs = [self._input(frame) for frame in frames]
        caches = [self._cache_for(frame) for frame in frames]
        outputs = self.stage(inputs, caches, last_only=True)
        self.requests_served += len(frames)
        if self.stage.is_last:
            return [self._top_k_frame(frame, logits) for frame, logits in zip(frames, outputs, strict=True)]
        return [
            syn1.Frame.activation(frame.request_id, frame.position, hidden.float().cpu().numpy())
            for frame, hidden in zip(frames, outputs, strict=True)
        ]

    def encode(self, frames: list[syn1.Frame]) -> bytes:
        """Activations in the assigned wire dtype; top-K values as f16 (ranked by exact f32 value first, so
        rounding cannot change the greedy token: 408 bytes for K=64); full logits as they are (f32)."""
        if not self.stage.is_last:
            return syn1.encode_frames(frames, self.wire_dtype)
        top_k = frames and frames[0].msg_type is syn1.MessageType.OUTPUT
        return syn1.encode_frames(frames, syn1.DType.F16 if top_k else None)

    def _input(self, frame: syn1.Frame) -> torch.Tensor:
        if self.stage.is_first:
            if frame.msg_type is not syn1.MessageType.TOKENS:
                raise InvalidArgument(f"the first stage takes TOKENS frames, got {frame.msg_type.name}")
            ids = torch.from_numpy(frame.array[:, 0].astype(np.int64))
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.stage.config.vocab_size):
                raise InvalidArgument(f"request {frame.request_id}: token id outside [0, vocab_size)")
            return ids.to(self.device)
        if frame.msg_type is not syn1.MessageType.ACTIVATION:
            raise InvalidArgument(
                f"stage [{self.stage.start}, {self.stage.end}) takes ACTIVATION frames, got {frame.msg_type.name}"
            )
        return torch.from_numpy(np.ascontiguousarray(frame.to_float32())).to(self.device, self.dtype)

    def _cache_for(self, frame: syn1.Frame) -> KVCache:
        """The request's cache, made to hold exactly `frame.position` tokens (a replay rewinds it)."""
        with self._lock:
            entry = self._entries.get(frame.request_id)
            if entry is None or frame.position == 0:
                entry = _Entry(self.stage.new_cache(), time.monotonic())
                self._entries[frame.request_id] = entry
            entry.last_used = time.monotonic()
        if frame.position > entry.cache.length:
            raise InvalidArgument(
                f"request {frame.request_id} continues at position {frame.position} but this node holds "
                f"{entry.cache.length} tokens of it; replay from position 0"
            )
        if frame.position < entry.cache.length:
            entry.cache.truncate(frame.position)
        return entry.cache

    def _top_k_frame(self, frame: syn1.Frame, logits: torch.Tensor) -> syn1.Frame:
        position = frame.position + frame.rows - 1  # the row's own position: the last input token
        if self.top_k == 0:
            return syn1.Frame.logits(frame.request_id, position, logits.float().cpu().numpy())
        values, ids = top_k(logits.float(), min(self.top_k, logits.shape[-1]))
        values, ids = values.cpu().numpy(), ids.to(torch.int32).cpu().numpy()  # (1, K) each
        order = np.lexsort((ids, -values), axis=-1)  # exact value descending, then lower id (as argmax)
        values, ids = np.take_along_axis(values, order, -1), np.take_along_axis(ids, order, -1)
        return syn1.Frame.output(frame.request_id, position, values, ids)
