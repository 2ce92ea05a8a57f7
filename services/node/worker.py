"""A node's compute: one loaded stage, a KV cache slot per request, and steps of many requests run as one batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.gpt2.kv_pool import StepPlan
from services.common.gpt2.model import GPT2Stage
from services.node.engine import GraphMode, StageEngine
from services.wire import syn1

log = logging.getLogger(__name__)

# Prompt tokens one step computes; decode rows of other requests ride along in the same step. A step of
# this many tokens takes about 1 ms of a GPU (GPT-2 124M, H200) and about 100 ms of 2 CPU cores.
PREFILL_CHUNK = {"cuda": 512, "cpu": 128}


@dataclass
class _Entry:
    slot: int
    last_used: float


@dataclass(eq=False)  # compared by identity: run() picks its own jobs out of the pending ones
class Job:
    """One frame's work. A long prompt runs over several steps, `prefill_chunk` rows at a time."""

    frame: syn1.Frame
    slot: int
    inputs: np.ndarray  # (rows,) token ids or (rows, n_embd) activations
    done: int = 0  # rows computed so far
    pieces: list[np.ndarray] = field(default_factory=list)  # (rows, n_embd) outputs, middle stages
    output: syn1.Frame | None = None  # set when every row is computed


class StageWorker:
    """Runs steps for a stage. Thread-safe: steps run in one thread at a time, releases come from any thread.

    run(frames) computes every frame (one per request) and returns their outputs in order. submit() and
    step() are the same work split up, so a caller can add requests between the chunks of a long prompt.
    """

    def __init__(
        self,
        stage: GPT2Stage,
        *,
        top_k: int,
        activation_dtype: str,
        max_batch: int,
        kv_slots: int | None = None,
        prefill_chunk: int | None = None,
        graphs: GraphMode = "auto",
    ) -> None:
        self.stage, self.top_k, self.max_batch = stage, top_k, max_batch
        self.wire_dtype = syn1.ACTIVATION_DTYPES[activation_dtype]
        self.engine = StageEngine(
            stage, slots=kv_slots or 2 * max_batch, top_k=top_k, max_batch=max_batch, graphs=graphs
        )
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(self.device.type, PREFILL_CHUNK["cpu"])
        self._entries: dict[int, _Entry] = {}
        self._pending: list[Job] = []
        self._release_after: set[int] = set()  # released while a job of theirs was pending
        self._lock = threading.Lock()
        self.requests_served = 0

    @property
    def cached_requests(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def release(self, request_ids: Sequence[int]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._free(request_id)

    def release_all(self) -> None:
        with self._lock:
            for request_id in list(self._entries):
                self._free(request_id)

    def release_idle(self, idle_timeout_s: float) -> int:
        cutoff = time.monotonic() - idle_timeout_s
        with self._lock:
            stale = [request_id for request_id, entry in self._entries.items() if entry.last_used < cutoff]
            for request_id in stale:
                self._free(request_id)
        return len(stale)

    def run(self, frames: list[syn1.Frame]) -> list[syn1.Frame]:
        """Every request in `frames` (one frame each), batched; outputs in the same order."""
        jobs = self.submit(frames)
        try:
            while any(job.output is None for job in jobs):
                self.step()
        finally:
            with self._lock:
                self._pending = [job for job in self._pending if job not in jobs]
        return [job.output for job in jobs]

    def submit(self, frames: list[syn1.Frame]) -> list[Job]:
        """Check the frames and queue their work (nothing is queued when one is bad); step() computes it."""
        inputs = [self._input(frame) for frame in frames]
        if self.stage.is_first and frames:
            self._check_token_ids(frames, inputs)
        with self._lock:
            busy = {job.frame.request_id for job in self._pending}
            for frame in frames:
                if frame.request_id in busy:
                    raise InvalidArgument(f"request {frame.request_id} appears twice in one step")
                busy.add(frame.request_id)
            jobs = [Job(frame, self._slot_for(frame), rows) for frame, rows in zip(frames, inputs, strict=True)]
            self._pending.extend(jobs)
        return jobs

    def step(self) -> list[Job]:
        """One batched forward over every pending request (up to max_batch), with at most prefill_chunk rows
        of prompts; returns the jobs that finished."""
        jobs, counts = self._schedule()
        if not jobs:
            return []
        starts = [job.frame.position + job.done for job in jobs]
        plan = StepPlan.of([job.slot for job in jobs], starts, counts, self.engine.max_positions)
        rows = np.concatenate([job.inputs[job.done : job.done + n] for job, n in zip(jobs, counts, strict=True)])
        answer_rows = self._answer_rows(jobs, counts)
        if self.stage.is_first:
            output = self.engine.compute(plan, token_ids=rows, answer_rows=answer_rows)
        else:
            output = self.engine.compute(plan, activations=rows, answer_rows=answer_rows)
        finished = self._finish(jobs, counts, output)
        with self._lock:
            self._pending = [job for job in self._pending if job.output is None]
            for job in finished:
                if job.frame.request_id in self._release_after:
                    self._release_after.discard(job.frame.request_id)
                    self.engine.pool.release(job.slot)
        self.requests_served += len(finished)
        return finished

    def encode(self, frames: list[syn1.Frame]) -> bytes:
        """Activations in the assigned wire dtype; top-K values as f16 (ranked by exact f32 value first, so
        rounding cannot change the greedy token: 408 bytes for K=64); full logits as they are (f32)."""
        if not self.stage.is_last:
            return syn1.encode_frames(frames, self.wire_dtype)
        top_k = frames and frames[0].msg_type is syn1.MessageType.OUTPUT
        return syn1.encode_frames(frames, syn1.DType.F16 if top_k else None)

    def _schedule(self) -> tuple[list[Job], list[int]]:
        """Pending jobs in arrival order: one-row work always, prompt rows while the chunk budget lasts."""
        budget = self.prefill_chunk
        jobs, counts = [], []
        for job in self._pending:
            if len(jobs) == self.max_batch:
                break
            remaining = job.frame.rows - job.done
            count = 1 if remaining == 1 else min(remaining, budget)
            if count == 0:
                continue
            if remaining > 1:
                budget -= count
            jobs.append(job)
            counts.append(count)
        return jobs, counts

    def _answer_rows(self, jobs: list[Job], counts: list[int]) -> np.ndarray | None:
        """On the last stage, with a speculative draft in the step: the step's rows to answer, in order (every
        row of a PREDICTED frame, the last of any other). None = the last row of each request."""
        if not self.stage.is_last or not any(job.frame.predicted for job in jobs):
            return None
        rows, offset = [], 0
        for job, count in zip(jobs, counts, strict=True):
            rows.extend(range(offset, offset + count) if job.frame.predicted else [offset + count - 1])
            offset += count
        return np.asarray(rows, dtype=np.int64)

    def _finish(self, jobs: list[Job], counts: list[int], output: np.ndarray) -> list[Job]:
        """Hand each job its rows of the step's one host array; frames for the jobs now complete."""
        pool, finished, offset = self.engine.pool, [], 0
        for job, count in zip(jobs, counts, strict=True):
            pool.commit(job.slot, count)
            job.done += count
            answered = count if (not self.stage.is_last or job.frame.predicted) else 1
            if not self.stage.is_last or job.frame.predicted or job.done == job.frame.rows:
                job.pieces.append(output[offset : offset + answered])
            offset += answered
            if job.done < job.frame.rows:
                continue
            finished.append(job)
            job.output = self._output_frame(
                job.frame, job.pieces[0] if len(job.pieces) == 1 else np.concatenate(job.pieces)
            )
        return finished

    def _output_frame(self, frame: syn1.Frame, rows: np.ndarray) -> syn1.Frame:
        """A finished request's answer: its activations, or on the last stage its top-K (or logits) for the
        newest position, or for every position of a PREDICTED frame."""
        if not self.stage.is_last:
            return syn1.Frame.activation(frame.request_id, frame.position, rows, predicted=frame.predicted)
        # Row i answers input position frame.position + i; without a draft only the last input is answered.
        position = frame.position if frame.predicted else frame.position + frame.rows - 1
        if not self.engine.top_k:
            return syn1.Frame.logits(frame.request_id, position, rows)
        k = self.engine.top_k
        values = np.ascontiguousarray(rows[:, :k]).view(np.float32)
        return syn1.Frame.output(frame.request_id, position, values, rows[:, k:])

    def _input(self, frame: syn1.Frame) -> np.ndarray:
        """The frame's rows as computed: (rows,) token ids, or (rows, n_embd) f16/f32 activations."""
        config = self.stage.config
        if frame.position + frame.rows > config.n_positions:
            raise InvalidArgument(
                f"request {frame.request_id}: positions up to {frame.position + frame.rows} exceed "
                f"the model's {config.n_positions}"
            )
        if self.stage.is_first:
            if frame.msg_type is not syn1.MessageType.TOKENS:
                raise InvalidArgument(f"the first stage takes TOKENS frames, got {frame.msg_type.name}")
            return frame.array[:, 0]
        if frame.msg_type is not syn1.MessageType.ACTIVATION:
            raise InvalidArgument(
                f"stage [{self.stage.start}, {self.stage.end}) takes ACTIVATION frames, got {frame.msg_type.name}"
            )
        if frame.cols != config.n_embd:
            raise InvalidArgument(
                f"request {frame.request_id}: activations have {frame.cols} columns, not {config.n_embd}"
            )
        return frame.array if frame.scales is None else frame.to_float32()

    def _check_token_ids(self, frames: list[syn1.Frame], inputs: list[np.ndarray]) -> None:
        """One range check over the whole batch; the per-frame search only runs to name a bad frame."""
        ids, vocab_size = np.concatenate(inputs), self.stage.config.vocab_size
        if ids.min() >= 0 and ids.max() < vocab_size:
            return
        bad = next(
            frame for frame, rows in zip(frames, inputs, strict=True) if rows.min() < 0 or rows.max() >= vocab_size
        )
        raise InvalidArgument(f"request {bad.request_id}: token id outside [0, {vocab_size})")

    def _slot_for(self, frame: syn1.Frame) -> int:
        """The request's slot, made to hold exactly `frame.position` tokens (a replay rewinds it). Lock held."""
        pool, request_id = self.engine.pool, frame.request_id
        entry = self._entries.get(request_id)
        cached = 0 if entry is None else pool.lengths[entry.slot]
        if frame.position > cached:
            raise InvalidArgument(
                f"request {request_id} continues at position {frame.position} but this node holds "
                f"{cached} tokens of it; replay from position 0"
            )
        if entry is None:
            entry = self._entries[request_id] = _Entry(pool.acquire(), time.monotonic())
        pool.truncate(entry.slot, frame.position)
        entry.last_used = time.monotonic()
        return entry.slot

    def _free(self, request_id: int) -> None:
        """Forget a request (lock held); a slot a pending job still writes goes back when that job ends."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        if any(job.frame.request_id == request_id for job in self._pending):
            self._release_after.add(request_id)
        else:
            self.engine.pool.release(entry.slot)
