"""What a caller may ask of Generate, and the limits it is checked against. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.gpt2.config import GPT2Config
from services.sampler.sampling import SamplingParams

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
