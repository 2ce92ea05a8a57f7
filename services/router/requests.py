"""One generation request's state: tokens so far, sampling, streaming text, stop conditions. Pure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.router.speculation import NgramIndex
from services.sampler.sampling import Candidates, LogitsInput, RequestSampler, SampleResult
from services.tokenizer.tokenization import IncrementalDecoder
from services.wire import syn1

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"


@dataclass
class TokenEvent:
    token_id: int | None
    text: str
    logprob: float = 0.0
    top_logprobs: tuple = ()
    step_ms: float = 0.0
    compute_ms: float = 0.0
    finish_reason: str | None = None
    index: int = 0  # the token's place among the completion's tokens (0-based)


@dataclass(eq=False)  # an entity: two requests are never equal, however alike (`in` and remove() by identity)
class Generation:
    """A request in flight. `position` = tokens the pipeline's KV caches hold; `pending` = tokens to send."""

    request_id: str
    wire_id: int
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    eos_id: int
    sampler: RequestSampler
    decoder: IncrementalDecoder
    deadline: float | None = None  # time.monotonic()
    generated: list[int] = field(default_factory=list)
    position: int = 0
    pending: list[int] = field(default_factory=list)
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    first_token_at: float | None = None
    finish_reason: str | None = None
    failovers: int = 0
    in_flight: bool = False
    draft: list[int] = field(default_factory=list)  # the tail of `pending` that is a speculative draft
    sent: int = 0  # tokens of `pending` the step in flight carries (a long prompt goes in chunks)
    verified: bool = False  # every stage of every step is recomputed on replicas and compared
    ngrams: NgramIndex | None = None  # prompt + generated, for drafts; None = no speculation
    abandoned: bool = False  # the client went away: never (re)submitted to a pipeline again
    steps_out: int = 0  # steps of it on their way (a retired pipeline's may still be, after a failover)
    holders: dict[str, str] = field(default_factory=dict)  # node id -> gateway address: who may cache it
    release_after_step: bool = False  # freeing it waits for its steps out to be back
    _held_text: str = ""  # text withheld because it may be the start of a stop string

    def __post_init__(self) -> None:
        self.pending = list(self.prompt_ids)
        self.last_token_at = self.started

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def rewind(self) -> None:
        """The pipeline lost this request's caches: replay every token so far from position 0."""
        self.position = 0
        self.pending = self.prompt_ids + self.generated
        self.draft = []
        self.failovers += 1
        self.in_flight = False  # a step still running on the old pipeline is ignored when it returns

    def propose(self, max_draft: int, n_positions: int) -> None:
        """Before a decode step: append a prompt-lookup draft to the one pending token, if one is found.

        The draft never runs past the model's context or the request's max_tokens."""
        if self.ngrams is None or len(self.pending) != 1 or self.position == 0:
            return
        room = min(max_draft, n_positions - self.position - 1, self.max_tokens - len(self.generated) - 1)
        self.draft = self.ngrams.draft(room)
        self.pending = self.pending[:1] + self.draft

    def next_input(self, prefill_chunk: int) -> list[int]:
        """The tokens the next step carries: every pending one, or the next chunk of a long prompt (so a
        prefill never holds the pipeline's other requests up for long)."""
        self.sent = min(len(self.pending), prefill_chunk) if not self.draft else len(self.pending)
        return self.pending[: self.sent]

    def accept(self, rows: Sequence[LogitsInput], compute_ms: float) -> list[TokenEvent]:
        """The last stage's answer for the step: rows[i] is the next-token distribution after the i-th of the
        last len(rows) pending tokens (one row, or 1 + the draft's length). Tokens are sampled row by row and
        kept while they match the draft, so the result is exactly one-token-per-step decoding's. A step that
        carried a chunk of a longer prompt only moves the position on."""
        if self.sent < len(self.pending):
            self.position += self.sent
            self.pending = self.pending[self.sent :]
            return []
        draft = self.draft
        events: list[TokenEvent] = []
        for index, row in enumerate(rows[: len(draft) + 1]):
            events.append(self._take(row, compute_ms if index == 0 else 0.0))
            if self.done or index == len(draft) or events[-1].token_id != draft[index]:
                break
        # The caches now hold every pending token; the valid ones end with the last draft token kept.
        self.position += len(self.pending) - len(draft) + len(events) - 1
        self.pending, self.draft = [self.generated[-1]], []
        return events

    def _take(self, row: LogitsInput, compute_ms: float) -> TokenEvent:
        """Sample one token from one row; its text delta and, maybe, the finish."""
        result: SampleResult = self.sampler.sample(row)
        now = time.perf_counter()
        step_ms, self.last_token_at = (now - self.last_token_at) * 1e3, now
        self.first_token_at = self.first_token_at or now
        token = result.token_id
        self.generated.append(token)
        if self.ngrams is not None:
            self.ngrams.append(token)
        event = TokenEvent(token, "", result.logprob, result.top_logprobs, step_ms, compute_ms)
        event.index = len(self.generated) - 1
        if token == self.eos_id and not self.ignore_eos:
            event.token_id, event.finish_reason = token, FINISH_EOS
            event.text = self._release_text(self.decoder.flush(), final=True)
        else:
            event.text = self._release_text(self.decoder.push(token), final=False)
        if event.finish_reason is None and self.finish_reason is None and len(self.generated) >= self.max_tokens:
            event.finish_reason = FINISH_LENGTH
            event.text += self._release_text(self.decoder.flush(), final=True)
        if self.finish_reason is not None:  # a stop string matched inside _release_text
            event.finish_reason = self.finish_reason
        self.finish_reason = event.finish_reason
        return event

    def _release_text(self, delta: str, *, final: bool) -> str:
        """Stream text, but hold back a tail that could still become a stop string; cut at a full match."""
        text = self._held_text + delta
        for stop in self.stop:
            index = text.find(stop)
            if index >= 0:
                self.finish_reason = FINISH_STOP
                self._held_text = ""
                return text[:index]
        if final or not self.stop:
            self._held_text = ""
            return text
        hold = max((_overlap(text, stop) for stop in self.stop), default=0)
        self._held_text = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def rows_of(frame: syn1.Frame) -> list[LogitsInput]:
    """The last stage's answer for a request, row by row: top-K candidates, or full logits (K = 0)."""
    values = np.asarray(frame.array, dtype=np.float32)
    if frame.token_ids is None:
        return list(values)
    return [Candidates(row, ids) for row, ids in zip(values, np.asarray(frame.token_ids), strict=True)]
