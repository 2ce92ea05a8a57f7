"""Sampling: empirical distributions, filters, seeds, greedy, penalties, top-K exactness, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from services.common.errors import InvalidArgument
from services.sampler.sampling import (
    Candidates,
    RequestSampler,
    SamplingParams,
    TokenHistory,
    _greedy_candidates,
    _sample_candidates,
    sample_batch,
    sample_next,
)

DRAWS = 4_000
LOGITS = np.array([2.0, 1.5, 1.2, 0.8, 0.5, 0.1, -0.3, -1.0])  # (8,) every token likely enough


def softmax(values: np.ndarray) -> np.ndarray:
    weights = np.exp(values - values.max())
    return weights / weights.sum()


def draw_many(logits: np.ndarray, params: SamplingParams, history: TokenHistory | None = None) -> np.ndarray:
    rng = np.random.default_rng(params.seed)
    return np.array([sample_next(logits, params, rng, history).token_id for _ in range(DRAWS)])


def assert_distribution(draws: np.ndarray, expected: np.ndarray) -> None:
    """Draws come only from expected's support and pass a chi-square test against it."""
    counts = np.bincount(draws, minlength=expected.shape[0])
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew outside the support: {counts}"
    expected_counts = expected[support] / expected[support].sum() * draws.shape[0]
    assert chisquare(counts[support], expected_counts).pvalue > 1e-3


def truncated(probabilities: np.ndarray, keep: np.ndarray) -> np.ndarray:
    kept = np.where(keep, probabilities, 0.0)
    return kept / kept.sum()


def test_temperature_sampling_matches_softmax() -> None:
    draws = draw_many(LOGITS, SamplingParams(temperature=0.7, seed=11))
    assert_distribution(draws, softmax(LOGITS / 0.7))


def test_top_k_draws_only_the_best_k() -> None:
    draws = draw_many(LOGITS, SamplingParams(temperature=1.3, top_k=3, seed=12))
    assert_distribution(draws, truncated(softmax(LOGITS / 1.3), np.arange(8) < 3))


def test_top_p_never_draws_outside_the_nucleus() -> None:
    probabilities = softmax(LOGITS)  # sorted descending: the nucleus is a prefix
    mass_before = np.cumsum(probabilities) - probabilities
    nucleus = mass_before < 0.6
    assert 1 < nucleus.sum() < 8
    draws = draw_many(LOGITS, SamplingParams(top_p=0.6, seed=13))
    assert_distribution(draws, truncated(probabilities, nucleus))


def test_min_p_never_draws_below_the_threshold() -> None:
    probabilities = softmax(LOGITS)
    survivors = probabilities >= 0.3 * probabilities.max()
    assert 1 < survivors.sum() < 8
    draws = draw_many(LOGITS, SamplingParams(min_p=0.3, seed=14))
    assert_distribution(draws, truncated(probabilities, survivors))


def test_filters_combine_after_top_k() -> None:
    """top-p is measured on the distribution left by top-k; min-p and top-p both apply."""
    after_top_k = truncated(softmax(LOGITS), np.arange(8) < 4)
    keep = (np.cumsum(after_top_k) - after_top_k < 0.7) & (after_top_k >= 0.5 * after_top_k.max())
    draws = draw_many(LOGITS, SamplingParams(top_k=4, top_p=0.7, min_p=0.5, seed=15))
    assert_distribution(draws, truncated(after_top_k, keep))


def test_shuffled_candidates_sample_the_same_distribution() -> None:
    order = np.random.default_rng(0).permutation(8)
    candidates = Candidates(LOGITS[order], order + 100)
    rng = np.random.default_rng(16)
    params = SamplingParams(temperature=0.9, top_p=0.9)
    draws = np.array([sample_next(candidates, params, rng).token_id - 100 for _ in range(DRAWS)])
    probabilities = softmax(LOGITS / 0.9)
    assert_distribution(draws, truncated(probabilities, np.cumsum(probabilities) - probabilities < 0.9))


def test_logprob_is_from_the_distribution_drawn_from() -> None:
    result = sample_next(
        np.array([2.0, 1.0, 0.0]), SamplingParams(top_k=2, top_logprobs=5, seed=1), np.random.default_rng(1)
    )
    expected = np.log(softmax(np.array([2.0, 1.0])))
    assert result.logprob == pytest.approx(expected[result.token_id])
    assert [t.token_id for t in result.top_logprobs] == [0, 1]  # only tokens the draw could reach
    assert [t.logprob for t in result.top_logprobs] == pytest.approx(expected)


def test_same_seed_same_sequence_and_different_seeds_differ() -> None:
    logits = np.random.default_rng(3).normal(size=500)

    def sequence(seed: int) -> list[int]:
        sampler = RequestSampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler.sample(logits).token_id for _ in range(40)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_greedy_takes_the_lowest_id_on_ties_and_uses_no_randomness() -> None:
    """Full logits: lowest id wins a tie (argmax). Candidates: the first listed wins, because the last stage
    lists them by exact value, then id, before rounding them to f16 for the wire."""
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0])
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    greedy = SamplingParams(temperature=0.0, top_logprobs=3)
    result = sample_next(logits, greedy, rng)
    assert result.token_id == 1
    assert [t.token_id for t in result.top_logprobs] == [1, 3, 4]
    assert result.logprob == pytest.approx(math.log(softmax(logits)[1]))
    candidates = Candidates(np.array([3.0, 1.0, 3.0]), np.array([4, 2, 3]))
    assert sample_next(candidates, greedy, rng).token_id == 4
    assert rng.bit_generator.state == state


def penalised_reference(logits: np.ndarray, prompt: list[int], generated: list[int], params: SamplingParams):
    expected = logits.copy()
    for token_id in set(prompt) | set(generated):
        value = expected[token_id]
        penalty = params.repetition_penalty
        expected[token_id] = value / penalty if value > 0 else value * penalty
    for token_id in set(generated):
        count = generated.count(token_id)
        expected[token_id] -= params.presence_penalty + params.frequency_penalty * count
    return expected


def history_of(prompt: list[int], generated: list[int]) -> TokenHistory:
    history = TokenHistory(prompt)
    for token_id in generated:
        history.append(token_id)
    return history


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, repetition_penalty=1.5, top_logprobs=8),
        SamplingParams(temperature=0, repetition_penalty=0.8, top_logprobs=8),
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.3, top_logprobs=8),
        SamplingParams(temperature=0, presence_penalty=-0.5, frequency_penalty=-1.0, top_logprobs=8),
    ],
)
def test_penalties_change_logits_as_specified(params: SamplingParams) -> None:
    logits = np.array([2.0, -1.0, 1.2, 0.8, -0.5, 0.1, -0.3, 1.9])
    prompt, generated = [1, 2], [0, 0, 0, 4, 7]
    log_probabilities = np.log(softmax(penalised_reference(logits, prompt, generated, params)))
    result = sample_next(logits, params, np.random.default_rng(0), history_of(prompt, generated))
    assert {t.token_id: t.logprob for t in result.top_logprobs} == pytest.approx(dict(enumerate(log_probabilities)))
    candidates = Candidates(logits[[7, 0, 4]], np.array([7, 0, 4]))  # penalties reach candidates only
    result = sample_next(candidates, params, np.random.default_rng(0), history_of(prompt, generated))
    expected = np.log(softmax(penalised_reference(logits, prompt, generated, params)[[7, 0, 4]]))
    assert {t.token_id: t.logprob for t in result.top_logprobs} == pytest.approx(
        dict(zip([7, 0, 4], expected, strict=True))
    )
    assert logits[0] == 2.0  # the caller's array is untouched


def test_frequency_penalty_shifts_the_sampled_distribution() -> None:
    history = history_of([], [0, 0, 1])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.2, seed=17)
    draws = draw_many(LOGITS, params, history)
    expected = LOGITS - np.array([1.2, 0.7, 0, 0, 0, 0, 0, 0])
    assert_distribution(draws, softmax(expected))


def test_request_sampler_penalises_what_it_generated() -> None:
    sampler = RequestSampler(SamplingParams(temperature=0, frequency_penalty=2.0), prompt_ids=[5])
    tokens = [sampler.sample(np.array([1.0, 0.9, 0.8])).token_id for _ in range(3)]
    assert tokens == [0, 1, 2]  # each pick drops by 2 and the next best wins
    assert sampler.history.generated_count == 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=1, seed=1),
        SamplingParams(temperature=1.2, top_k=20, seed=2, top_logprobs=4),
        SamplingParams(temperature=0.9, top_k=64, top_p=0.8, seed=3),
        SamplingParams(temperature=1.0, top_k=50, min_p=0.05, top_p=0.95, seed=4, top_logprobs=20),
        SamplingParams(temperature=1.1, min_p=0.35, seed=5, top_logprobs=3),  # survivors fit in K
    ],
)
def test_top_k_input_equals_full_logits_exactly(params: SamplingParams) -> None:
    logits = (np.random.default_rng(6).normal(size=50257) * 2.5).astype(np.float32)
    top = np.argsort(-logits)[:64]
    if params.min_p and not params.top_k:
        survivors = np.exp((logits - logits.max()) / params.temperature) >= params.min_p
        assert 1 < survivors.sum() < 64
    full, cut = RequestSampler(params), RequestSampler(params)
    for _ in range(15):
        expected = full.sample(logits)
        assert cut.sample(Candidates(logits[top], top)) == expected


def test_greedy_on_top_k_input_picks_the_same_token_with_a_larger_logprob() -> None:
    logits = np.random.default_rng(7).normal(size=50257) * 2.5
    top = np.argsort(-logits)[:64]
    params = SamplingParams(temperature=0, top_logprobs=5)
    full = sample_next(logits, params, np.random.default_rng(0))
    cut = sample_next(Candidates(logits[top], top), params, np.random.default_rng(0))
    assert cut.token_id == full.token_id == int(np.argmax(logits))
    assert [t.token_id for t in cut.top_logprobs] == [t.token_id for t in full.top_logprobs]
    # The mass outside the 64 candidates is dropped, so the normaliser is smaller.
    assert full.logprob < cut.logprob < 0


def test_batch_equals_one_request_at_a_time() -> None:
    params = [
        SamplingParams(temperature=0.0, top_logprobs=2),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(top_k=5, top_p=0.9, seed=2, top_logprobs=3),
        SamplingParams(min_p=0.1, repetition_penalty=1.3, frequency_penalty=0.4, seed=3),
    ]
    rng = np.random.default_rng(9)
    values = rng.normal(size=(4, 64)) * 2
    token_ids = np.stack([rng.permutation(50257)[:64] for _ in range(4)])
    batched = [RequestSampler(p, prompt_ids=token_ids[i, :8]) for i, p in enumerate(params)]
    single = [RequestSampler(p, prompt_ids=token_ids[i, :8]) for i, p in enumerate(params)]
    for _ in range(10):
        expected = [s.sample(Candidates(values[i], token_ids[i])) for i, s in enumerate(single)]
        assert sample_batch(batched, values, token_ids) == expected
    dense = rng.normal(size=(4, 300))
    expected = [s.sample(dense[i]) for i, s in enumerate(single)]
    assert sample_batch(batched, dense) == expected


def test_a_bad_row_fails_the_batch_before_any_request_advances() -> None:
    samplers = [RequestSampler(SamplingParams(seed=i)) for i in range(3)]
    states = [s.rng.bit_generator.state for s in samplers]
    values = np.zeros((3, 4))
    values[1, 2] = np.nan
    with pytest.raises(InvalidArgument, match=r"row 1: values must be finite"):
        sample_batch(samplers, values, np.tile(np.arange(4), (3, 1)))
    with pytest.raises(InvalidArgument, match=r"values must have shape \(3, K\)"):
        sample_batch(samplers, np.zeros((2, 4)))
    assert [s.rng.bit_generator.state for s in samplers] == states
    assert all(s.history.generated_count == 0 for s in samplers)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("frequency_penalty", math.nan),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
    ],
)
def test_invalid_setting_is_named(name: str, value: object) -> None:
    params = SamplingParams(**{name: value})
    with pytest.raises(InvalidArgument, match=f"^{name} must be"):
        params.validate()
    with pytest.raises(InvalidArgument, match=name):
        RequestSampler(params)
    with pytest.raises(InvalidArgument, match=name):
        sample_next(LOGITS, params, np.random.default_rng(0))


def test_top_p_message_matches_the_convention() -> None:
    with pytest.raises(InvalidArgument, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5).validate()


@pytest.mark.parametrize(
    ("logits", "params", "message"),
    [
        (np.array([1.0, np.nan]), SamplingParams(), "logits must be finite; position 1"),
        (np.array([1.0, -np.inf]), SamplingParams(), "logits must be finite"),
        (np.array([]), SamplingParams(), "logits must be a non-empty row"),
        (np.zeros((2, 3)), SamplingParams(), "logits must be a non-empty row"),
        (np.zeros(5), SamplingParams(top_k=6), "top_k 6 is larger than the 5 candidates"),
        (Candidates(np.array([1.0, np.inf]), np.array([1, 2])), SamplingParams(), "values must be finite"),
        (Candidates(np.zeros(3), np.array([1, 2])), SamplingParams(), "token_ids has shape"),
        (Candidates(np.zeros(3), np.array([4, 2, 4])), SamplingParams(), r"token_ids must be unique.*\[4\]"),
        (Candidates(np.zeros(2), np.array([1.0, 2.0])), SamplingParams(), "token_ids must be integers"),
        (Candidates(np.zeros(2), np.array([-1, 2])), SamplingParams(), "token_ids must be >= 0"),
        (Candidates(np.zeros(2), np.array([1, 2])), SamplingParams(top_k=3), "top_k 3 is larger"),
    ],
)
def test_invalid_input_is_named(logits: object, params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sample_next(logits, params, np.random.default_rng(0))  # type: ignore[arg-type]


def test_greedy_ignores_top_k_beyond_the_candidates() -> None:
    candidates = Candidates(np.array([0.5, 2.0]), np.array([9, 4]))
    result = sample_next(candidates, SamplingParams(temperature=0, top_k=50), np.random.default_rng(0))
    assert result.token_id == 4


def test_greedy_candidates_take_the_general_paths_answer() -> None:
    """The greedy shortcut over top-K candidates gives exactly what the vectorised pass gives a greedy row:
    the token (ties in the order sent), its logprob and the alternatives, bit for bit."""
    rng = np.random.default_rng(0)
    for trial in range(2000):
        k = int(rng.integers(1, 80))
        values = rng.normal(size=k).astype(np.float16).astype(np.float64)
        if trial % 3 == 0:
            values[: k // 2] = values[0]  # ties, as f16 rounding makes them
        token_ids = rng.permutation(50257)[:k].astype(np.int64)
        top_logprobs = int(rng.integers(0, 6))
        params = SamplingParams(temperature=0.0, top_logprobs=top_logprobs, top_k=int(rng.integers(0, 5)))
        general = _sample_candidates(values[None], token_ids[None], [params], [np.random.default_rng(1)], [None])
        assert _greedy_candidates(values, token_ids, top_logprobs) == general[0]
