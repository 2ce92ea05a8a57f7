"""CUDA graphs of one decode step, captured at a set of batch sizes and replayed with padding (eager on the CPU)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.errors import InvalidArgument
from services.common.gpt2.kv_pool import StepPlan

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
WARMUP_RUNS = 2  # eager runs on a side stream before capture: lazy library set-up must not be captured


def graph_sizes(max_batch: int, sizes: Sequence[int] = DEFAULT_SIZES) -> tuple[int, ...]:
    """The captured batch sizes for a node batching up to max_batch requests: the defaults below it, then it."""
    if max_batch < 1:
        raise InvalidArgument(f"max_batch must be at least 1, got {max_batch}")
    return tuple(sorted({size for size in sizes if size < max_batch} | {max_batch}))


@dataclass
class StaticStep:
    """The buffers one batch size reads and writes. A captured graph holds their addresses: they never move."""

    size: int
    ints: Tensor  # a StepPlan.ints() array of `size` one-token requests, int32, on the device
    activations: Tensor | None  # (size, n_embd) inputs of a stage that is not the first
    plan: StepPlan | None = None  # the padded plan last filled in: what an eager run reads its host sizes from
    output: Tensor | None = None  # what the captured step returned; replays overwrite it


class DecodeGraphs:
    """One decode step (every request brings one token) at fixed batch sizes; a batch of B requests runs at
    the next size up, padded with requests that only touch the pool's scratch slot.

    capture=True (CUDA): each size is captured once as a CUDA graph over its StaticStep and replayed.
    capture=False: the same buffers, padding and step function, run eagerly: the form CPU tests exercise.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        make_static: Callable[[int], StaticStep],
        step: Callable[[StaticStep], Tensor],
        fill_idle: Callable[[StaticStep], None],
        *,
        capture: bool,
    ) -> None:
        self.sizes = tuple(sorted(sizes))
        self.step = step
        self.statics = {size: make_static(size) for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            memory = torch.cuda.graph_pool_handle()  # one pool for every size: only one replays at a time
            for size in reversed(self.sizes):  # largest first, so the smaller ones reuse its memory
                self.graphs[size] = self._capture(self.statics[size], fill_idle, memory)

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def size_for(self, batch: int) -> int:
        """The smallest size that holds `batch` requests."""
        if not 1 <= batch <= self.max_size:
            raise InvalidArgument(f"a decode graph batch must have 1 to {self.max_size} requests, got {batch}")
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def run(self, batch: int, fill: Callable[[StaticStep], None]) -> tuple[StaticStep, Tensor]:
        """fill(static) copies the padded step into the static buffers; returns them and the step's output
        (all `static.size` rows: the first `batch` are the requests')."""
        static = self.statics[self.size_for(batch)]
        fill(static)
        graph = self.graphs.get(static.size)
        if graph is None:
            return static, self.step(static)
        graph.replay()
        return static, static.output

    def _capture(
        self, static: StaticStep, fill_idle: Callable[[StaticStep], None], memory: tuple[int, int]
    ) -> torch.cuda.CUDAGraph:
        fill_idle(static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.step(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=memory):
            static.output = self.step(static)
        return graph
