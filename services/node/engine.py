"""A stage's compute on its device: its KV pool, decode CUDA graphs, and one batched step from host arrays in
to one host array out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from services.common.gpt2.kv_pool import BatchMeta, StepPlan
from services.common.gpt2.model import GPT2Stage, ranked_top_k
from services.node.graphs import DecodeGraphs, StaticStep, graph_sizes

log = logging.getLogger(__name__)

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
        self.graphs: DecodeGraphs | None = None
        mode = ("capture" if self.device.type == "cuda" else "off") if graphs == "auto" else graphs
        if mode == "off":
            return
        try:
            capture = mode == "capture"
            self.graphs = DecodeGraphs(
                graph_sizes(max_batch), self._static, self._graph_step, self._fill_idle, capture=capture
            )
        except RuntimeError as error:
            if graphs != "auto":
                raise
            # Slower, not wrong: every step then runs eagerly through the same forward_step.
            log.warning("cuda_graphs_unavailable", extra={"error": str(error)[:300]})

    @property
    def max_positions(self) -> int:
        return self.pool.max_positions

    def compute(
        self,
        plan: StepPlan,
        token_ids: np.ndarray | None = None,
        activations: np.ndarray | None = None,
        answer_rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """One step: token ids (N,) on the first stage, else activations (N, n_embd), in plan order.

        On the last stage `answer_rows` picks the rows (of the N) answered, in order; None = each request's
        last row (a speculative draft asks for every row of its request)."""
        graphs = self.graphs
        if graphs is not None and plan.max_query == 1 and plan.batch <= graphs.max_size:
            static, output = graphs.run(plan.batch, lambda static: self._fill(static, plan, token_ids, activations))
            return self._to_host(static, output[: plan.batch])
        meta = plan.meta(torch.from_numpy(plan.ints(token_ids)).to(self.device))  # one host -> device copy
        inputs = None if activations is None else torch.from_numpy(activations).to(self.device, self.dtype)
        rows = None if answer_rows is None else torch.from_numpy(answer_rows).to(self.device)
        return self._step(meta, inputs, rows).cpu().numpy()  # the step's one device -> host copy

    @torch.inference_mode()
    def _step(self, meta: BatchMeta, activations: Tensor | None, answer_rows: Tensor | None = None) -> Tensor:
        hidden = self.stage.forward_step(meta, self.pool, activations)  # (N, C)
        if not self.stage.is_last:
            return hidden
        if answer_rows is not None:
            hidden = hidden.index_select(0, answer_rows)  # (R, C): the rows asked for
        elif meta.max_query > 1:
            hidden = hidden.index_select(0, meta.last_rows)  # (B, C): each request's last new token
        logits = self.stage.logits(hidden)  # (B, vocab)
        return ranked_top_k(logits, self.top_k) if self.top_k else logits.float()

    def _static(self, size: int) -> DecodeBuffers:
        """Device buffers of one graph size, with pinned host copies, the ints laid out as an idle step."""
        pinned = self.device.type == "cuda"
        idle = StepPlan.of([], [], [], self.pool.max_positions).padded(size, self.pool.scratch_slot)
        template = idle.ints()
        host_ints = torch.from_numpy(template.copy()).pin_memory() if pinned else torch.from_numpy(template.copy())
        ints = host_ints.to(self.device)
        activations = host_activations = None
        if not self.stage.is_first:
            host_dtype = self.dtype if self.dtype in (torch.float16, torch.float32) else torch.float32
            host_activations = torch.zeros(size, self.stage.config.n_embd, dtype=host_dtype, pin_memory=pinned)
            activations = host_activations.to(self.device, self.dtype)
        return DecodeBuffers(
            size, ints, activations, template=template, host_ints=host_ints, host_activations=host_activations
        )

    def _graph_step(self, static: DecodeBuffers) -> Tensor:
        return self._step(static.plan.meta(static.ints), static.activations)

    def _fill(
        self, static: DecodeBuffers, plan: StepPlan, token_ids: np.ndarray | None, activations: np.ndarray | None
    ) -> None:
        """Write a decode step over the idle layout (the rows past the batch stay padding), then copy it up.

        Sections of StepPlan.ints() for `size` one-token requests: tokens, positions, kv rows, request,
        offset, seqstart_q (size + 1), seqstart_k (size + 1), seqlen_k, last rows. Request, offset,
        seqstart_q and last rows are the same for every decode step of this size."""
        size, batch = static.size, plan.batch
        ints = static.host_ints.numpy()
        np.copyto(ints, static.template)
        first_rows = plan.slots * plan.max_positions
        if token_ids is not None:
            ints[:batch] = token_ids
        ints[size : size + batch] = plan.starts
        ints[2 * size : 2 * size + batch] = first_rows + plan.starts
        ints[6 * size + 1 : 6 * size + 1 + batch] = first_rows
        ints[7 * size + 2 : 7 * size + 2 + batch] = plan.starts + 1
        if static.ints is not static.host_ints:
            static.ints.copy_(static.host_ints, non_blocking=True)  # pinned: the host copy is not touched until
        if activations is not None:  # this step's output is back
            rows = static.host_activations.numpy()
            rows[:batch] = activations
            rows[batch:] = 0
            if static.activations is not static.host_activations:
                static.activations.copy_(static.host_activations, non_blocking=True)
        if self.graphs is None or not self.graphs.captured:
            static.plan = plan.padded(size, self.pool.scratch_slot)  # an eager run reads its sizes from it

    def _fill_idle(self, static: DecodeBuffers) -> None:
        """A step of padding only (every row in the scratch slot): what graphs are warmed up and captured with."""
        static.plan = StepPlan.of([], [], [], self.pool.max_positions).padded(static.size, self.pool.scratch_slot)
        static.ints.copy_(torch.from_numpy(static.template))
        if static.activations is not None:
            static.activations.zero_()

    def _to_host(self, static: DecodeBuffers, output: Tensor) -> np.ndarray:
        """The step's one device -> host copy, into pinned memory on CUDA; returns an array of its own."""
        if output.device.type == "cpu":
            return output.numpy()
        if static.host_output is None:
            shape = (static.size, *output.shape[1:])
            static.host_output = torch.empty(shape, dtype=output.dtype, pin_memory=True)
        host = static.host_output[: output.shape[0]]
        host.copy_(output, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy().copy()


@dataclass
class DecodeBuffers(StaticStep):
    """A graph size's static buffers, and the host side they are filled from."""

    template: np.ndarray | None = None  # StepPlan.ints() of an idle step of this size
    host_ints: Tensor | None = None  # pinned on CUDA; the device buffer itself on the CPU
    host_activations: Tensor | None = None
    host_output: Tensor | None = None  # pinned, made at the first step
