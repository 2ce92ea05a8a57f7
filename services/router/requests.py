"""One generation request's state: tokens so far, sampling, streaming text, stop conditions. Pure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.gpt2.config import GPT2Config
from services.sampler.sampling import Candidates, RequestSampler, SampleResult, SamplingParams
from services.tokenizer.tokenization import IncrementalDecoder
from services.wire import syn1

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass(frozen=True)
class GenerateParams:
    """What a caller asked for, before tokenizing. Exactly one of prompt and prompt_ids is set."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int] | None
    max_tokens: int  # 0 = the server's default
    stop: tuple[str, ...]
    ignore_eos: bool
    sampling: SamplingParams

    def validate(self, limits: Limits) -> None:
        """Raises InvalidArgument naming the first field out of range and its limit."""
        if self.max_tokens > limits.max_tokens:
            raise InvalidArgument(f"max_tokens {self.max_tokens} is above the limit {limits.max_tokens}")
        if self.prompt is not None and len(self.prompt) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"prompt has {len(self.prompt)} characters; the limit is {limits.max_prompt_chars} "
                "(SYNAPSE_ROUTER_MAX_PROMPT_CHARS)"
            )
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars")
        self.sampling.validate()
        self._check_candidates(limits.candidates)

    def _check_candidates(self, candidates: int) -> None:
        """The last stage returns `candidates` top logits per token (0 = all): what sampling may ask of them."""
        if not candidates:
            return
        sampling = self.sampling
        if not sampling.greedy and sampling.top_k > candidates:
            raise InvalidArgument(
                f"sampling.top_k {sampling.top_k} exceeds the {candidates} candidates the last stage returns "
                f"(SYNAPSE_ROUTER_TOP_K); ask for top_k <= {candidates}"
            )
        if sampling.top_logprobs > candidates:
            raise InvalidArgument(
                f"sampling.top_logprobs {sampling.top_logprobs} exceeds the {candidates} candidates the last "
                f"stage returns (SYNAPSE_ROUTER_TOP_K); ask for at most {candidates}"
            )


@dataclass(frozen=True)
class Limits:
    """What the router accepts: its settings, as the validation of a request needs them."""

    max_tokens: int  # SYNAPSE_ROUTER_MAX_TOKENS_LIMIT
    max_prompt_chars: int  # SYNAPSE_ROUTER_MAX_PROMPT_CHARS
    candidates: int  # SYNAPSE_ROUTER_TOP_K: top logits per token from the last stage, 0 = all


def check_prompt(prompt_ids: list[int], max_tokens: int, config: GPT2Config) -> None:
    """The tokenized prompt fits the model: ids inside the vocabulary, prompt + output inside the context."""
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty: send prompt text or prompt_token_ids")
    if any(token >= config.vocab_size for token in prompt_ids):
        raise InvalidArgument(f"prompt_token_ids must be < vocab_size {config.vocab_size}")
    if len(prompt_ids) + max_tokens > config.n_positions:
        raise InvalidArgument(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
            f"model's context of {config.n_positions} tokens; shorten one"
        )


@dataclass
class TokenEvent:
    token_id: int | None
    text: str
    logprob: float = 0.0
    top_logprobs: tuple = ()
    step_ms: float = 0.0
    compute_ms: float = 0.0
    finish_reason: str | None = None


@dataclass
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
        self.failovers += 1
        self.in_flight = False  # a step still running on the old pipeline is ignored when it returns

    def accept(self, candidates: Candidates, compute_ms: float) -> TokenEvent:
        """The last stage's output for the newest position -> the next token, its text, maybe the finish."""
        result: SampleResult = self.sampler.sample(candidates)
        now = time.perf_counter()
        step_ms, self.last_token_at = (now - self.last_token_at) * 1e3, now
        self.first_token_at = self.first_token_at or now
        self.position += len(self.pending)
        token = result.token_id
        self.generated.append(token)
        self.pending = [token]
        event = TokenEvent(token, "", result.logprob, result.top_logprobs, step_ms, compute_ms)
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


def candidates_of(frame: syn1.Frame) -> Candidates | np.ndarray:
    """The last stage's answer for a request's newest position: top-K candidates, or full logits (K = 0)."""
    if frame.token_ids is None:
        return np.asarray(frame.array[-1], dtype=np.float32)
    return Candidates(np.asarray(frame.array[-1], dtype=np.float32), np.asarray(frame.token_ids[-1]))
