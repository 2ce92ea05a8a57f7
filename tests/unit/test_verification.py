"""Comparing recomputed answers: honest rounding agrees, a 5% shift does not, and the odd one out is named."""

from __future__ import annotations

import numpy as np

from services.gateway.verification import agree, judge, subset
from services.wire import syn1


def activation(values: np.ndarray, request_id: int = 1) -> syn1.Frame:
    return syn1.Frame.activation(request_id, 4, values.astype(np.float32))


def wire(frame: syn1.Frame, dtype: syn1.DType) -> syn1.Frame:
    return syn1.decode(syn1.encode(frame, dtype))


HIDDEN = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32) * 3


def test_rounding_agrees_and_a_subtle_shift_does_not() -> None:
    exact = activation(HIDDEN)
    assert agree(exact, wire(exact, syn1.DType.F16))
    assert agree(exact, wire(exact, syn1.DType.I8))
    assert not agree(exact, activation(HIDDEN + 0.05 * np.abs(HIDDEN).max()))
    assert not agree(exact, activation(HIDDEN, request_id=2))  # another request's answer


def test_top_k_agrees_across_a_near_tie_swap_only() -> None:
    values = np.array([[9.0, 8.0, 5.0, 4.999]], np.float32)
    ids = np.array([[7, 3, 11, 12]])
    mine = syn1.Frame.output(1, 4, values, ids)
    swapped = syn1.Frame.output(1, 4, np.array([[9.0, 8.0, 5.0, 4.998]], np.float32), np.array([[7, 3, 11, 13]]))
    assert agree(mine, swapped)  # 12 and 13 tie at the boundary: either may be kept
    wrong_top = syn1.Frame.output(1, 4, values, np.array([[3, 7, 11, 12]]))
    assert not agree(mine, wrong_top)


def test_the_odd_one_out_is_outvoted_and_two_differing_answers_are_unresolved() -> None:
    good, bad = [activation(HIDDEN)], [activation(HIDDEN * 1.1)]
    assert judge({"a": good, "b": good, "c": good}).outcome == "agreed"
    verdict = judge({"a": good, "b": bad, "c": good})
    assert verdict.outcome == "outvoted" and verdict.liars == ("b",)
    assert judge({"a": good, "b": bad}).outcome == "unresolved"


def test_subset_keeps_only_the_verified_requests_frames_in_order() -> None:
    frames = [syn1.Frame.tokens(r, 0, [r, r + 1]) for r in (1, 2, 3)]
    message = syn1.encode_frames(frames)
    picked = syn1.decode_frames(subset(message, {3, 1}))
    assert [frame.request_id for frame in picked] == [1, 3]
    assert subset(message, {9}) is None
