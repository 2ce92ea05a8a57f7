"""Next-token choice from full logits or top-K candidates: penalties, temperature, top-k/p/min-p, draw.

Pure numpy. The order is fixed: penalties -> temperature -> top-k -> top-p and min-p -> draw.
Candidates are ranked by (logit descending, token id ascending) and drawn by inverse CDF with
one uniform number per sampled step, so a top-K input whose filtered set does not depend on the
mass outside K (top_k <= K; min-p whose survivors fit in K) gives bit-identical results to the
full logits row. docs/sampling.md says what is exact on top-K input and what is approximate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
# Below this temperature sampling is greedy: logits / T would overflow float64 (vLLM does the same).
GREEDY_BELOW_TEMPERATURE = 1e-5


def _int_in(value: object, low: float, high: float) -> bool:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return is_int and low <= value <= high


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; the defaults turn every filter and penalty off."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keeps tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 = off; over prompt + generated ids
    presence_penalty: float = 0.0  # subtracted once from every generated id
    frequency_penalty: float = 0.0  # subtracted once per occurrence of a generated id
    seed: int | None = None  # None = fresh OS entropy
    top_logprobs: int = 0  # alternatives to return with each token

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raises InvalidArgument naming the first setting out of range."""
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", _int_in(self.top_k, 0, math.inf), "an integer >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "> 0 (1 = off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("seed", self.seed is None or _int_in(self.seed, 0, 2**64 - 1), "None or in [0, 2**64)"),
            ("top_logprobs", _int_in(self.top_logprobs, 0, MAX_TOP_LOGPROBS), f"in [0, {MAX_TOP_LOGPROBS}]"),
        )  # fmt: skip
        for name, ok, requirement in checks:
            if not ok:
                raise InvalidArgument(f"{name} must be {requirement}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Candidates:
    """One logits row cut to its top K, as the last stage sends it: values (K,), token_ids (K,)."""

    values: np.ndarray
    token_ids: np.ndarray


LogitsInput = np.ndarray | Candidates


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log


@dataclass(frozen=True)
class SampleResult:
    """The chosen token, its logprob, and the best alternatives (most likely first) if asked."""

    token_id: int
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()


class TokenHistory:
    """Ids penalties look at: prompt + generated (repetition), generated counts (presence, frequency)."""

    def __init__(self, prompt_ids: Iterable[int] = ()) -> None:
        self._seen = {int(token_id) for token_id in prompt_ids}
        if any(token_id < 0 for token_id in self._seen):
            raise InvalidArgument("prompt_ids must be token ids >= 0")
        self._counts: dict[int, int] = {}
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def append(self, token_id: int) -> None:
        self._seen.add(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        self._arrays = None

    @property
    def generated_count(self) -> int:
        return sum(self._counts.values())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seen ids, generated ids, their counts), int64, rebuilt only after an append."""
        if self._arrays is None:
            self._arrays = (
                np.fromiter(self._seen, dtype=np.int64, count=len(self._seen)),
                np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts)),
                np.fromiter(self._counts.values(), dtype=np.int64, count=len(self._counts)),
            )
        return self._arrays


class _RowError(InvalidArgument):
    """An InvalidArgument about one row of a batch; the batch entry point names the row."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def _check_values(values: np.ndarray, name: str) -> None:
    """values: (B, N) float64."""
    if values.ndim != 2 or values.shape[1] == 0:
        raise InvalidArgument(f"{name} must be a non-empty row, got shape {values.shape[1:]}")
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = (int(i[0]) for i in np.nonzero(bad))
        raise _RowError(row, f"{name} must be finite; position {column} is {values[row, column]}")


def _check_token_ids(token_ids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """token_ids: (B, K) integers, unique within each row; returns them as int64."""
    if token_ids.shape != shape:
        raise InvalidArgument(f"token_ids has shape {token_ids.shape}, values {shape}")
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise InvalidArgument(f"token_ids must be integers, got dtype {token_ids.dtype}")
    negative = np.flatnonzero((token_ids < 0).any(axis=1))
    if negative.size:
        raise _RowError(int(negative[0]), "token_ids must be >= 0")
    ordered = np.sort(token_ids, axis=1)
    repeats = ordered[:, 1:] == ordered[:, :-1]
    if repeats.any():
        row = int(np.flatnonzero(repeats.any(axis=1))[0])
        repeated = np.unique(ordered[row, 1:][repeats[row]])[:5].tolist()
        raise _RowError(row, f"token_ids must be unique within a row; {repeated} repeat")
    return token_ids.astype(np.int64, copy=False)


def _check_top_k(params: Sequence[SamplingParams], candidates: int) -> None:
    for row, request in enumerate(params):
        if not request.greedy and request.top_k > candidates:
            raise _RowError(
                row,
                f"top_k {request.top_k} is larger than the {candidates} candidates; "
                "ask the last stage for K >= top_k or for full logits",
            )


def _positions(token_ids: np.ndarray, dense: bool, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in token_ids of the query ids it holds, mask over query of those held)."""
    if dense:
        held = query < token_ids.shape[0]
        return query[held], held
    order = np.argsort(token_ids)
    slots = np.minimum(np.searchsorted(token_ids[order], query), order.shape[0] - 1)
    held = token_ids[order][slots] == query
    return order[slots[held]], held


def _apply_penalties(
    values: np.ndarray, token_ids: np.ndarray, dense: bool, params: SamplingParams, history: TokenHistory
) -> np.ndarray:
    """Penalised copy of one row (vLLM semantics); only ids present in the row are touched."""
    penalised = values.copy()
    seen_ids, generated_ids, generated_counts = history.arrays()
    if params.repetition_penalty != 1.0:
        positions, _ = _positions(token_ids, dense, seen_ids)
        hit = penalised[positions]
        penalty = params.repetition_penalty
        penalised[positions] = np.where(hit > 0, hit / penalty, hit * penalty)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        positions, held = _positions(token_ids, dense, generated_ids)
        counts = generated_counts[held]
        penalised[positions] -= params.presence_penalty + params.frequency_penalty * counts
    return penalised


def _ranked(values: np.ndarray, token_ids: np.ndarray, limit: int) -> np.ndarray:
    """Indices of one row's best `limit` entries (all if 0) by (value descending, id ascending)."""
    size = values.shape[0]
    pool = np.arange(size)
    if 0 < limit < size:
        kth_largest = np.partition(values, size - limit)[size - limit]
        pool = np.flatnonzero(values >= kth_largest)  # keeps every tie at the boundary
    ranked = pool[np.lexsort((token_ids[pool], -values[pool]))]
    return ranked[:limit] if limit > 0 else ranked


def _kept(weights: np.ndarray, params: Sequence[SamplingParams]) -> np.ndarray:
    """(B, N) mask of what top-k, min-p and top-p keep; weights are ranked, weights[:, 0] = 1.

    Each filter keeps a prefix of the ranking, so their intersection is a prefix holding at
    least the best token. min-p needs no normaliser (p_i >= min_p * p_max <=> w_i >= min_p);
    top-p is measured on the distribution after top-k. Greedy rows keep everything.
    """
    column = np.arange(weights.shape[1])[None, :]
    top_k = np.array([0 if p.greedy else p.top_k for p in params])[:, None]
    min_p = np.array([0.0 if p.greedy else p.min_p for p in params])[:, None]
    top_p = np.array([1.0 if p.greedy else p.top_p for p in params])[:, None]
    kept = (top_k == 0) | (column < top_k)
    cumulative = np.cumsum(np.where(kept, weights, 0.0), axis=1)
    kept &= weights >= min_p
    before = np.concatenate([np.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=1)
    kept &= (top_p >= 1.0) | (before / cumulative[:, -1:] < top_p)
    return kept


def _choose(
    scaled: np.ndarray,
    token_ids: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    presorted: bool = False,
) -> list[SampleResult]:
    """The vectorised core: scaled (B, N) penalised logits / temperature, token_ids (B, N)."""
    if not presorted:
        # Best first; ties keep the order given. Full logits come in id order (lowest id wins, as argmax);
        # the last stage sends candidates sorted by exact f32 value then id, so a tie that only exists
        # after rounding to f16 on the wire still goes to the truly larger logit.
        order = np.argsort(-scaled, axis=-1, kind="stable")
        scaled = np.take_along_axis(scaled, order, axis=1)
        token_ids = np.take_along_axis(token_ids, order, axis=1)
    shifted = scaled - scaled[:, :1]  # <= 0
    weights = np.exp(shifted)
    kept = _kept(weights, params)
    cumulative = np.cumsum(np.where(kept, weights, 0.0), axis=1)
    total = cumulative[:, -1:]
    # One uniform per sampled row, none for greedy rows (u = 0 picks the best).
    uniforms = np.array([0.0 if p.greedy else rng.random() for p, rng in zip(params, rngs, strict=True)])
    # == searchsorted(side="right"): never lands on a zero-weight token; clamp guards u * total rounding.
    slots = np.count_nonzero(cumulative <= uniforms[:, None] * total, axis=1)
    slots = np.minimum(slots, np.count_nonzero(kept, axis=1) - 1)
    logprobs = shifted - np.log(total)
    return [
        _result(token_ids[row], logprobs[row], int(slots[row]), min(p.top_logprobs, int(kept[row].sum())))
        for row, p in enumerate(params)
    ]


def _result(ranked_ids: np.ndarray, logprobs: np.ndarray, slot: int, alternatives: int) -> SampleResult:
    top = tuple(
        TokenLogprob(int(token_id), float(logprob))
        for token_id, logprob in zip(ranked_ids[:alternatives], logprobs[:alternatives], strict=True)
    )
    return SampleResult(int(ranked_ids[slot]), float(logprobs[slot]), top)


def _greedy_dense(values: np.ndarray, top_logprobs: int) -> SampleResult:
    """Greedy over a full logits row (V,) without sorting the whole vocabulary."""
    best = values.max()
    log_total = best + math.log(np.exp(values - best).sum())
    ranked = _ranked(values, np.arange(values.shape[0]), max(top_logprobs, 1))  # best, lowest id
    return _result(ranked, values[ranked] - log_total, 0, top_logprobs)


def _greedy_candidates(values: np.ndarray, token_ids: np.ndarray, top_logprobs: int) -> SampleResult:
    """Greedy over one checked candidate row (K,) without penalties: what _choose gives a greedy row (best first,
    ties in the order given; the logprobs over all K), in a few array operations instead of the general pass."""
    order = np.argsort(-values, kind="stable")
    shifted = values[order] - values[order[0]]
    logprobs = shifted - np.log(np.cumsum(np.exp(shifted))[-1])
    return _result(token_ids[order], logprobs, 0, min(top_logprobs, values.shape[0]))


def _sample_dense(
    values: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: TokenHistory | None
) -> SampleResult:
    """One full logits row (V,): penalties, then greedy or top-k reduction before the core."""
    token_ids = np.arange(values.shape[0])
    if history is not None and params.has_penalties:
        values = _apply_penalties(values, token_ids, True, params, history)
    if params.greedy:
        return _greedy_dense(values, params.top_logprobs)
    scaled = values / params.temperature
    ranked = _ranked(scaled, token_ids, params.top_k)
    return _choose(scaled[ranked][None], ranked[None], [params], [rng], presorted=True)[0]


def _sample_candidates(
    values: np.ndarray,
    token_ids: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    histories: Sequence[TokenHistory | None],
) -> list[SampleResult]:
    """Checked (B, K) candidate rows: penalties row by row, then one vectorised pass."""
    penalised = [
        row
        for row, (request, history) in enumerate(zip(params, histories, strict=True))
        if history is not None and request.has_penalties
    ]
    if penalised:
        values = values.copy()  # never write into the caller's array
    for row in penalised:
        values[row] = _apply_penalties(values[row], token_ids[row], False, params[row], histories[row])
    temperature = np.array([1.0 if p.greedy else p.temperature for p in params])[:, None]
    return _choose(values / temperature, token_ids, params, rngs)


def sample_next(
    logits: LogitsInput,
    params: SamplingParams,
    rng: np.random.Generator,
    history: TokenHistory | None = None,
) -> SampleResult:
    """Chooses one token. Uses exactly one rng.random() when sampling and none when greedy."""
    params.validate()
    if isinstance(logits, Candidates):
        values = np.asarray(logits.values, dtype=np.float64)[None]
        _check_values(values, "values")
        token_ids = _check_token_ids(np.asarray(logits.token_ids)[None], values.shape)
        _check_top_k([params], values.shape[1])
        if params.greedy and not (history is not None and params.has_penalties):
            return _greedy_candidates(values[0], token_ids[0], params.top_logprobs)
        return _sample_candidates(values, token_ids, [params], [rng], [history])[0]
    values = np.asarray(logits, dtype=np.float64)[None]
    _check_values(values, "logits")
    _check_top_k([params], values.shape[1])
    return _sample_dense(values[0], params, rng, history)


class RequestSampler:
    """One request's sampling state, kept by its caller across steps: params, RNG, token history."""

    def __init__(self, params: SamplingParams, prompt_ids: Iterable[int] = ()) -> None:
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.history = TokenHistory(prompt_ids)

    def sample(self, logits: LogitsInput) -> SampleResult:
        """Chooses the next token and records it in the history for later penalties."""
        result = sample_next(logits, self.params, self.rng, self.history)
        self.history.append(result.token_id)
        return result


def sample_batch(
    samplers: Sequence[RequestSampler], values: np.ndarray, token_ids: np.ndarray | None = None
) -> list[SampleResult]:
    """One step for many requests: row b of values (B, V) full logits, or (B, K) with token_ids.

    Top-K rows are sampled in one vectorised pass. Every row is checked before any sampler
    advances, so an InvalidArgument (naming the row) leaves every RNG and history untouched.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != len(samplers):
        raise InvalidArgument(f"values must have shape ({len(samplers)}, K), got {values.shape}")
    params = [sampler.params for sampler in samplers]
    try:
        _check_values(values, "logits" if token_ids is None else "values")
        if token_ids is not None:
            token_ids = _check_token_ids(np.asarray(token_ids), values.shape)
        _check_top_k(params, values.shape[1])
    except _RowError as error:
        raise InvalidArgument(f"row {error.row}: {error}") from error
    if token_ids is None:
        results = [
            _sample_dense(row, sampler.params, sampler.rng, sampler.history)
            for row, sampler in zip(values, samplers, strict=True)
        ]
    else:
        rngs = [sampler.rng for sampler in samplers]
        histories = [sampler.history for sampler in samplers]
        results = _sample_candidates(values, token_ids, params, rngs, histories)
    for sampler, result in zip(samplers, results, strict=True):
        sampler.history.append(result.token_id)
    return results
