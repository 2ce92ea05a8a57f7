"""Prompt-lookup drafts, and a Generation that keeps a draft only while the pipeline's rows confirm it."""

from __future__ import annotations

import numpy as np

from services.router.requests import Generation
from services.router.speculation import NgramIndex
from services.sampler.sampling import Candidates, SamplingParams
from services.sampler.seeding import SteppedSampler


class Decoder:
    """Stands in for the tokenizer's incremental decoder: text is the ids, space-separated."""

    def push(self, token: int) -> str:
        return f" {token}"

    def flush(self) -> str:
        return ""


def generation(prompt: list[int], max_tokens: int = 20) -> Generation:
    sampler = SteppedSampler(SamplingParams(temperature=0.0), prompt)
    return Generation(
        request_id="r", wire_id=1, prompt_ids=prompt, max_tokens=max_tokens, stop=[], ignore_eos=True, eos_id=0,
        sampler=sampler, decoder=Decoder(), ngrams=NgramIndex(prompt),
    )  # fmt: skip


def step(gen: Generation, rows: list[Candidates]) -> list:
    """One step as the scheduler runs it: the input it sends, then the answer's rows."""
    gen.next_input(256)
    return gen.accept(rows, 1.0)


def row(best: int) -> Candidates:
    """A top-2 answer whose greedy token is `best`."""
    return Candidates(np.array([5.0, 1.0], np.float32), np.array([best, 999]))


def test_drafts_follow_the_latest_occurrence_of_the_longest_matching_ngram() -> None:
    index = NgramIndex([1, 2, 3, 9, 1, 2, 3, 4, 1, 2])
    assert index.draft(3) == [3, 4, 1]  # (1, 2) last seen before 3, 4, 1
    index.append(7)
    assert index.draft(3) == []  # 7 never appeared before
    assert NgramIndex([5, 6]).draft(2) == [] and NgramIndex([5, 5]).draft(0) == []


def test_an_accepted_draft_yields_several_tokens_and_the_position_skips_ahead() -> None:
    gen = generation([1, 2, 3, 1, 2])
    assert step(gen, [row(3)])[0].token_id == 3  # the prefill: position 5
    assert (gen.position, gen.pending) == (5, [3])
    gen.propose(4, n_positions=64)
    assert gen.draft == [1, 2, 3] and gen.pending == [3, 1, 2, 3]
    events = step(gen, [row(1), row(2), row(7), row(8)])  # draft kept for 2 tokens, then 7 instead of 3
    assert [e.token_id for e in events] == [1, 2, 7]
    assert gen.generated == [3, 1, 2, 7]
    assert (gen.position, gen.pending, gen.draft) == (8, [7], [])  # 5 + the 3 kept inputs: 3, 1, 2


def test_a_fully_accepted_draft_adds_its_bonus_token() -> None:
    gen = generation([4, 5, 4])
    step(gen, [row(5)])
    gen.propose(2, n_positions=64)
    assert gen.pending == [5, 4, 5]
    assert [e.token_id for e in step(gen, [row(4), row(5), row(6)])] == [4, 5, 6]
    assert (gen.position, gen.pending) == (6, [6])


def test_drafts_stop_at_max_tokens_and_the_context() -> None:
    gen = generation([1, 2, 1, 2, 1, 2], max_tokens=3)
    step(gen, [row(1)])
    gen.propose(8, n_positions=64)
    assert len(gen.draft) == 1  # 3 tokens at most: one generated, this step's token, one draft token
    events = step(gen, [row(2), row(1)])
    assert [e.token_id for e in events] == [2, 1] and events[-1].finish_reason == "length"
    near_the_end = generation([1, 2, 1, 2])
    step(near_the_end, [row(1)])
    near_the_end.propose(8, n_positions=6)  # position 4: this token takes 5, one more fits
    assert len(near_the_end.draft) == 1


def test_a_long_prompt_goes_in_chunks_and_only_its_last_chunk_is_sampled() -> None:
    gen = generation(list(range(1, 11)))
    assert gen.next_input(4) == [1, 2, 3, 4]
    assert gen.accept([row(50)], 1.0) == [] and (gen.position, gen.generated) == (4, [])
    assert gen.next_input(4) == [5, 6, 7, 8]
    assert gen.accept([row(50)], 1.0) == []
    assert gen.next_input(4) == [9, 10]
    assert [e.token_id for e in gen.accept([row(50)], 1.0)] == [50]
    assert (gen.position, gen.pending) == (10, [50])
