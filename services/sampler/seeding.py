"""Stateless seeding: the RNG of decode step n is derived from (seed, n), so any process can redo a step.

The sampler service keeps nothing between calls, so a seeded request cannot carry one RNG across
steps there. Instead step n draws from `np.random.default_rng([seed, n])`. `sample_step` is
exactly what one Sample call runs; `SteppedSampler` gives the router's in-process path the same
draws (same seed, logits and history -> same tokens whichever side samples).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from services.sampler.sampling import (
    LogitsInput,
    RequestSampler,
    SampleResult,
    SamplingParams,
    TokenHistory,
    sample_batch,
    sample_next,
)


def rng_for(seed: int | None, step: int) -> np.random.Generator:
    """The generator of one decode step (0 = first generated token); no seed -> fresh OS entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, step])


def history_for(prompt_ids: Iterable[int], generated_ids: Iterable[int]) -> TokenHistory:
    """The penalties' view of a request rebuilt from its ids: prompt + generated, generated counted."""
    history = TokenHistory(prompt_ids)
    for token_id in generated_ids:
        history.append(int(token_id))
    return history


def sample_step(
    logits: LogitsInput,
    params: SamplingParams,
    step: int,
    prompt_ids: Sequence[int] = (),
    generated_ids: Sequence[int] = (),
) -> SampleResult:
    """One stateless step, as the service runs it: RNG from (seed, step), history from the ids."""
    history = history_for(prompt_ids, generated_ids) if params.has_penalties else None
    return sample_next(logits, params, rng_for(params.seed, step), history)


class SteppedSampler(RequestSampler):
    """A RequestSampler whose step n draws from rng_for(seed, n): the service's behaviour, in-process.

    The step is the number of tokens sampled so far. Without a seed it keeps one entropy-seeded
    RNG, as RequestSampler does.
    """

    @property
    def step(self) -> int:
        return self.history.generated_count

    def reseed(self) -> None:
        """Points self.rng at this step's generator; sample() and sample_batch_stepped() call it."""
        if self.params.seed is not None:
            self.rng = rng_for(self.params.seed, self.step)

    def sample(self, logits: LogitsInput) -> SampleResult:
        self.reseed()
        return super().sample(logits)


def sample_batch_stepped(
    samplers: Sequence[SteppedSampler], values: np.ndarray, token_ids: np.ndarray | None = None
) -> list[SampleResult]:
    """sample_batch() with every sampler reseeded for its current step first."""
    for sampler in samplers:
        sampler.reseed()
    return sample_batch(samplers, values, token_ids)
