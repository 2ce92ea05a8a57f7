"""Capacity-aware placement: contiguous layer ranges for a set of nodes, weighted by speed, within memory.

Pure and deterministic; docs/placement.md explains the algorithm and every choice below.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.sharder.footprint import ModelFootprint

_Plan = TypeVar("_Plan")


@dataclass(frozen=True)
class NodeCapacity:
    """What a node offers: memory for weights and KV cache, and its measured speed."""

    node_id: str
    memory_bytes: int
    speed: float  # layers per second from the join benchmark (any unit shared by all nodes), > 0


@dataclass(frozen=True)
class Assignment:
    """Node `node_id` runs layers [start, end) of the pipeline."""

    node_id: str
    start: int
    end: int

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Node:
    node_id: str
    memory_bytes: int
    speed: Fraction  # exact copy of the float, so every comparison is exact and order-independent


def plan_placement(footprint: ModelFootprint, nodes: Sequence[NodeCapacity]) -> list[Assignment]:
    """Contiguous ranges covering [0, n_layer) once, in pipeline order, minimising the slowest stage.

    Every node that can hold one layer gets at least one while there are no more such nodes than
    layers; otherwise one layer each goes to the fastest nodes that fit and the rest stay idle.
    """
    ranked = _ranked(nodes)
    usable = [node for node in ranked if node.memory_bytes >= footprint.per_layer_bytes]
    if not usable:
        raise _not_enough_memory(footprint, ranked)
    if len(usable) <= footprint.n_layer:
        plan = _plan_every_node(footprint, usable)
    else:
        plan = _plan_one_layer_each(footprint, usable)
    plan = plan or _plan_single_node(footprint, usable)
    if plan is None:
        raise _not_enough_memory(footprint, ranked)
    return plan


def stage_seconds(footprint: ModelFootprint, node: NodeCapacity, assignment: Assignment) -> float:
    """Time per token of one stage in the speed's unit: its layers (plus the LM head when last) / speed."""
    work = assignment.n_layers + (footprint.head_work_layers if assignment.end == footprint.n_layer else 0)
    return work / node.speed


def _ranked(nodes: Sequence[NodeCapacity]) -> list[_Node]:
    """Validate and sort: fastest first, then most memory, then node_id (so input order never matters)."""
    if not nodes:
        raise FailedPrecondition("no nodes connected; start a node with `synapse node --gateway URL`")
    seen: set[str] = set()
    ranked = []
    for node in nodes:
        if not isinstance(node.node_id, str) or not node.node_id:
            raise InvalidArgument(f"node_id must be a non-empty string, got {node.node_id!r}")
        if node.node_id in seen:
            raise InvalidArgument(f"node {node.node_id!r} is listed twice; node ids must be unique")
        seen.add(node.node_id)
        memory = node.memory_bytes
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise InvalidArgument(
                f"node {node.node_id!r} reports memory_bytes={node.memory_bytes!r}; it must be a positive int"
            )
        if not isinstance(node.speed, (int, float)) or not math.isfinite(node.speed) or node.speed <= 0:
            raise InvalidArgument(
                f"node {node.node_id!r} reports speed={node.speed!r}; rerun its benchmark, speed must be > 0"
            )
        ranked.append(_Node(node.node_id, node.memory_bytes, Fraction(node.speed)))
    ranked.sort(key=lambda node: (-node.speed, -node.memory_bytes, node.node_id))
    return ranked


def _cap(footprint: ModelFootprint, node: _Node, limit: Fraction, *, first: bool, last: bool) -> int:
    """Most layers `node` can run in a given role within its memory and within time `limit`."""
    free = node.memory_bytes - footprint.extra_bytes(first=first, last=last)
    head = Fraction(footprint.head_work_layers) if last else Fraction(0)
    in_time = math.floor(limit * node.speed - head)
    return max(min(max(free, 0) // footprint.per_layer_bytes, footprint.n_layer, in_time), 0)


def _time_limits(footprint: ModelFootprint, nodes: list[_Node], most_layers: int) -> list[Fraction]:
    """Every value the slowest stage's time can take, ascending: (layers [+ LM head]) / speed."""
    head = Fraction(footprint.head_work_layers)
    limits = {Fraction(count) + extra for count in range(1, most_layers + 1) for extra in (Fraction(0), head)}
    return sorted({work / node.speed for work in limits for node in nodes})


def _smallest_feasible(limits: list[Fraction], choose: Callable[[Fraction], _Plan | None]) -> _Plan | None:
    """Binary search for the smallest limit where `choose` finds a plan (feasibility grows with it)."""
    if choose(limits[-1]) is None:
        return None
    low, high = 0, len(limits) - 1
    while low < high:
        middle = (low + high) // 2
        if choose(limits[middle]) is None:
            low = middle + 1
        else:
            high = middle
    return choose(limits[low])


def _plan_every_node(footprint: ModelFootprint, nodes: list[_Node]) -> list[Assignment] | None:
    """At least one layer on every node (2 <= len(nodes) <= n_layer); None when memory cannot allow it."""
    if len(nodes) < 2:
        return None
    limits = _time_limits(footprint, nodes, footprint.n_layer)
    chosen = _smallest_feasible(limits, lambda limit: _choose_roles(footprint, nodes, limit))
    if chosen is None:
        return None
    order, caps = chosen
    counts = _allocate(footprint, order, caps)
    return _assignments(order, counts)


def _choose_roles(
    footprint: ModelFootprint, nodes: list[_Node], limit: Fraction
) -> tuple[list[_Node], list[int]] | None:
    """Pick the first and last node that leave the most layer capacity; returns pipeline order and caps."""
    middle = [_cap(footprint, node, limit, first=False, last=False) for node in nodes]
    if min(middle) < 1:
        return None
    first = [_cap(footprint, node, limit, first=True, last=False) for node in nodes]
    last = [_cap(footprint, node, limit, first=False, last=True) for node in nodes]
    # Ties go to the highest-ranked first node and the lowest-ranked last node, so equal nodes line
    # up in rank order. The two best last-stage candidates suffice: one of them pairs with any first.
    last_options = sorted((middle[i] - last[i], -i) for i in range(len(nodes)) if last[i] >= 1)[:2]
    best: tuple[int, int, int] | None = None
    for f in range(len(nodes)):
        if first[f] < 1:
            continue
        for loss, negative_l in last_options:
            if -negative_l != f:
                key = (middle[f] - first[f] + loss, f, negative_l)
                best = key if best is None else min(best, key)
                break
    if best is None or sum(middle) - best[0] < footprint.n_layer:
        return None
    _, f, negative_l = best
    l_index = -negative_l
    inner = [i for i in range(len(nodes)) if i not in (f, l_index)]
    order = [nodes[f]] + [nodes[i] for i in inner] + [nodes[l_index]]
    caps = [first[f]] + [middle[i] for i in inner] + [last[l_index]]
    return order, caps


def _allocate(footprint: ModelFootprint, order: list[_Node], caps: list[int]) -> list[int]:
    """One layer each, then each next layer to the stage that would finish it soonest (ties: earlier stage).

    Greedy increments are optimal for a min-max of increasing per-stage times, and give layers in
    proportion to speed; `caps` (memory and the optimal time limit) bound every stage.
    """
    head = Fraction(footprint.head_work_layers)
    counts = [1] * len(order)
    offsets = [Fraction(0)] * (len(order) - 1) + [head]
    heap = [((2 + offsets[i]) / node.speed, i) for i, node in enumerate(order) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(footprint.n_layer - len(order)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < caps[i]:
            heapq.heappush(heap, ((counts[i] + 1 + offsets[i]) / order[i].speed, i))
    return counts


def _plan_one_layer_each(footprint: ModelFootprint, nodes: list[_Node]) -> list[Assignment] | None:
    """More usable nodes than layers: one layer on each of the n_layer fastest nodes that fit."""
    n_layer = footprint.n_layer

    def choose(limit: Fraction) -> list[_Node] | None:
        def fits(i: int, *, first: bool, last: bool) -> bool:
            return _cap(footprint, nodes[i], limit, first=first, last=last) >= 1

        fast = [i for i in range(len(nodes)) if fits(i, first=False, last=False)]
        if len(fast) < n_layer:
            return None
        if n_layer == 1:
            return next(([nodes[i]] for i in fast if fits(i, first=True, last=True)), None)
        lasts = [i for i in fast if fits(i, first=False, last=True)]
        for f in fast:
            partner = next((i for i in lasts if i != f), None)
            if partner is not None and fits(f, first=True, last=False):
                chosen = sorted([f, partner, *[i for i in fast if i not in (f, partner)][: n_layer - 2]])
                # Within the chosen nodes, the lowest-ranked one that can be last is last (rank order).
                l_index = next(i for i in reversed(chosen) if i != f and i in lasts)
                inner = [i for i in chosen if i not in (f, l_index)]
                return [nodes[f]] + [nodes[i] for i in inner] + [nodes[l_index]]
        return None

    order = _smallest_feasible(_time_limits(footprint, nodes, 1), choose)
    return None if order is None else _assignments(order, [1] * n_layer)


def _plan_single_node(footprint: ModelFootprint, nodes: list[_Node]) -> list[Assignment] | None:
    """The whole model on the fastest node that holds it (used when no multi-node split fits)."""
    for node in nodes:  # ranked fastest first
        if node.memory_bytes >= footprint.total_bytes:
            return [Assignment(node.node_id, 0, footprint.n_layer)]
    return None


def _assignments(order: list[_Node], counts: list[int]) -> list[Assignment]:
    plan, start = [], 0
    for node, count in zip(order, counts, strict=True):
        plan.append(Assignment(node.node_id, start, start + count))
        start += count
    return plan


def _not_enough_memory(footprint: ModelFootprint, nodes: list[_Node]) -> ResourceExhausted:
    available = sum(node.memory_bytes for node in nodes)
    largest = max(node.memory_bytes for node in nodes)
    first_stage = footprint.per_layer_bytes + footprint.extra_bytes(first=True, last=False)
    last_stage = footprint.per_layer_bytes + footprint.extra_bytes(first=False, last=True)
    extras = footprint.extra_bytes(first=True, last=False) + footprint.extra_bytes(first=False, last=True)
    split = footprint.n_layer * footprint.per_layer_bytes + extras
    needed = footprint.total_bytes if len(nodes) == 1 else split
    return ResourceExhausted(
        f"not enough memory to place the model: it needs {_human(needed)} ({needed} bytes: "
        f"{footprint.n_layer} layers x {_human(footprint.per_layer_bytes)}"
        f"{'' if len(nodes) == 1 else ' + embeddings on the first node + LM head on the last'}), "
        f"the {len(nodes)} node(s) have {_human(available)} ({available} bytes); "
        f"the largest node has {_human(largest)}, a first stage needs at least {_human(first_stage)}, "
        f"a last stage {_human(last_stage)}; connect nodes with more memory "
        "or reserve less KV cache"
    )


def _human(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
