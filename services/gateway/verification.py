"""Verification: a stage recomputed on other nodes holding the same layers, the answers compared within a
tolerance set by the wire dtype, and the odd one out named. Pure (numpy and SYN1)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from services.wire import syn1

# Largest difference between two honest nodes' answers, relative to the largest magnitude in the row: f32
# and f16 wire values of nodes computing in f32 or f16 on CPU or GPU stay well under; int8 allows a few
# quantization steps (a step is 1/127 of the row's largest magnitude).
TOLERANCE = {syn1.DType.F32: 1e-2, syn1.DType.F16: 2e-2, syn1.DType.I8: 4 / 127}


def subset(message: bytes, request_ids: Collection[int]) -> bytes | None:
    """The frames of `message` for these requests, in order, copied unread; None when it holds none of them."""
    view = memoryview(message)
    parts = [
        view[offset : offset + header.frame_size]
        for offset, header in syn1.headers(message)
        if header.request_id in request_ids
    ]
    return b"".join(parts) if parts else None


def agree(a: syn1.Frame, b: syn1.Frame) -> bool:
    """Two answers for the same request and positions are the same numbers, within the tolerance."""
    if (a.msg_type, a.request_id, a.position, a.rows, a.cols) != (b.msg_type, b.request_id, b.position, b.rows, b.cols):
        return False
    tolerance = max(TOLERANCE.get(a.dtype, 1e-2), TOLERANCE.get(b.dtype, 1e-2))
    if a.token_ids is None:
        return _close(a.to_float32(), b.to_float32(), tolerance)
    return all(
        _same_top_k(a.token_ids[row], a.to_float32()[row], b.token_ids[row], b.to_float32()[row], tolerance)
        for row in range(a.rows)
    )


def _close(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """(rows, cols) values: every row's largest difference within tolerance x its largest magnitude."""
    scale = np.maximum(np.abs(a).max(axis=1), np.abs(b).max(axis=1)) + 1e-6
    return bool((np.abs(a - b).max(axis=1) <= tolerance * scale).all())


def _same_top_k(ids_a: np.ndarray, values_a: np.ndarray, ids_b: np.ndarray, values_b: np.ndarray, tol: float) -> bool:
    """Top-K candidates agree: shared ids have close values, and an id only one side kept sits near the other
    side's K-th value (rounding may swap near-ties at the boundary, nothing more)."""
    slack = tol * (max(np.abs(values_a).max(), np.abs(values_b).max()) + 1e-6)
    by_id_b = dict(zip(ids_b.tolist(), values_b.tolist(), strict=True))
    for token, value in zip(ids_a.tolist(), values_a.tolist(), strict=True):
        other = by_id_b.pop(token, None)
        if other is None:
            if value > values_b.min() + slack:
                return False
        elif abs(value - other) > slack:
            return False
    return all(value <= values_a.min() + slack for value in by_id_b.values())


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "agreed" | "outvoted" (the liars are named) | "unresolved" (two opinions, no majority)
    liars: tuple[str, ...] = ()
    disagreeing: tuple[str, ...] = ()


def judge(opinions: Mapping[str, list[syn1.Frame]]) -> Verdict:
    """opinions: node id -> its answer frames for the verified requests (same order). A node whose answer
    agrees with no other while the others agree among themselves is outvoted; with two opinions that differ
    nobody can tell which lied."""
    nodes = list(opinions)
    agreeing = {
        node: {other for other in nodes if other != node and _all_agree(opinions[node], opinions[other])}
        for node in nodes
    }
    if all(len(others) == len(nodes) - 1 for others in agreeing.values()):
        return Verdict("agreed")
    liars = tuple(node for node in nodes if not agreeing[node])
    honest = [node for node in nodes if node not in liars]
    if liars and len(honest) >= 2 and all(set(honest) - {node} <= agreeing[node] for node in honest):
        return Verdict("outvoted", liars=liars)
    return Verdict("unresolved", disagreeing=tuple(nodes))


def _all_agree(a: list[syn1.Frame], b: list[syn1.Frame]) -> bool:
    return len(a) == len(b) and all(agree(x, y) for x, y in zip(a, b, strict=True))
