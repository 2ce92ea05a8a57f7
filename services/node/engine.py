"""A stage's compute on its device: its KV pool, decode CUDA graphs, and one batched step from host arrays in
to one host array out."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from services.common.gpt2.kv_pool import BatchMeta, StepPlan
from services.common.gpt2.model import GPT2Stage, ranked_top_k
from services.node.graphs import DecodeGraphs, StaticStep, graph_sizes

GraphMode = Literal["auto", "capture", "eager", "off"]


class StageEngine:
    """Runs StepPlans over one stage and its KV pool, one device -> host copy per step.

    compute() returns (N, n_embd) activations on a stage that is not the last, else one row per request:
    (B, 2k) int32 top-k (float32 value bits, then token ids, as ranked_top_k packs them) or, with
    top_k == 0, (B, vocab) float32 logits.

    graphs: "capture" runs decode-only steps of up to max_batch requests as CUDA graphs; "eager" runs the
    same padded static-buffer path without capture (the CPU-testable form); "off" never pads; "auto" is
    "capture" on CUDA and "off" elsewhere. Steps with a prompt (more than one new token) always run eagerly.
    """

    def __init__(self, stage: GPT2Stage, *, slots: int, top_k: int, max_batch: int, graphs: GraphMode = "auto") -> None:
        weight = stage.h[0].ln_1.weight
        self.stage, self.device, self.dtype = stage, weight.device, weight.dtype
        self.pool = stage.new_pool(slots)
        self.top_k = min(top_k, stage.config.vocab_size) if stage.is_last else 0
        if graphs == "auto":
            graphs = "capture" if self.device.type == "cuda" else "off"
        self.graphs = None
        if graphs != "off":
            sizes = graph_sizes(max_batch)
            self.graphs = DecodeGraphs(
                sizes, self._static, self._graph_step, self._fill_idle, capture=graphs == "capture"
            )

    @property
    def max_positions(self) -> int:
        return self.pool.max_positions

    def compute(
        self, plan: StepPlan, token_ids: np.ndarray | None = None, activations: np.ndarray | None = None
    ) -> np.ndarray:
        """One step: token ids (N,) on the first stage, else activations (N, n_embd), in plan order."""
        graphs = self.graphs
        if graphs is not None and plan.max_query == 1 and plan.batch <= graphs.max_size:
            output = graphs.run(plan.batch, lambda static: self._fill(static, plan, token_ids, activations))
        else:
            meta = plan.meta(torch.from_numpy(plan.ints(token_ids)).to(self.device))  # one host -> device copy
            inputs = None if activations is None else torch.from_numpy(activations).to(self.device, self.dtype)
            output = self._step(meta, inputs)
        return output.cpu().numpy()  # the step's one device -> host copy; waits for the device

    @torch.inference_mode()
    def _step(self, meta: BatchMeta, activations: Tensor | None) -> Tensor:
        hidden = self.stage.forward_step(meta, self.pool, activations)  # (N, C)
        if not self.stage.is_last:
            return hidden
        if meta.max_query > 1:
            hidden = hidden.index_select(0, meta.last_rows)  # (B, C): each request's last new token
        logits = self.stage.logits(hidden)  # (B, vocab)
        return ranked_top_k(logits, self.top_k) if self.top_k else logits.float()

    def _static(self, size: int) -> StaticStep:
        ints = torch.zeros(9 * size + 2, dtype=torch.int32, device=self.device)  # StepPlan.ints() of size x 1 token
        activations = None
        if not self.stage.is_first:
            activations = torch.zeros(size, self.stage.config.n_embd, dtype=self.dtype, device=self.device)
        return StaticStep(size, ints, activations)

    def _graph_step(self, static: StaticStep, meta: BatchMeta) -> Tensor:
        return self._step(meta, static.activations)

    def _fill(
        self, static: StaticStep, plan: StepPlan, token_ids: np.ndarray | None, activations: np.ndarray | None
    ) -> BatchMeta:
        """Copy a decode step, padded to the static size, into the static buffers."""
        padded = plan.padded(static.size, self.pool.scratch_slot)
        static.ints.copy_(torch.from_numpy(padded.ints(token_ids)))
        if static.activations is not None:
            rows = np.zeros((static.size, activations.shape[1]), activations.dtype)
            rows[: plan.batch] = activations
            static.activations.copy_(torch.from_numpy(rows))
        return padded.meta(static.ints)

    def _fill_idle(self, static: StaticStep) -> BatchMeta:
        """A step of padding only (every row in the scratch slot): what graphs are warmed up and captured with."""
        empty = StepPlan.of([], [], [], self.pool.max_positions)
        padded = empty.padded(static.size, self.pool.scratch_slot)
        static.ints.copy_(torch.from_numpy(padded.ints()))
        if static.activations is not None:
            static.activations.zero_()
        return padded.meta(static.ints)
