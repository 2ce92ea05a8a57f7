"""Prompt-lookup drafts for speculative decoding: the tokens that followed the last time the request's own
newest n-gram appeared (in its prompt or its output), proposed without a second model. Pure.

The pipeline then checks a draft in one pass: the last stage answers every row (SYN1 PREDICTED), row i
giving the next-token distribution after draft token i; the router samples the rows in order with the
request's own sampler and keeps the draft while it matches. So the output is exactly what decoding one
token per step gives, greedy or seeded, and a round trip yields 1 + (accepted draft tokens) tokens.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """For every n-gram (n = 1..max_ngram) of a token sequence, the position just after its latest
    occurrence, kept up to date as tokens are appended: a draft lookup costs O(max_ngram)."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index just after its latest occurrence
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add a token; the n-grams ending at the previous token now have a continuation."""
        tokens = self.tokens
        end = len(tokens)  # the n-grams ending just before `token` are followed by it
        for n in range(1, min(self.max_ngram, end) + 1):
            self._after[tuple(tokens[end - n : end])] = end
        tokens.append(token)

    def draft(self, max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed the longest n-gram matching the sequence's end, else []."""
        tokens = self.tokens
        if max_tokens <= 0:
            return []
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            start = self._after.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + max_tokens]
        return []
