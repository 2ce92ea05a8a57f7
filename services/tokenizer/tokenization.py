"""GPT-2 text <-> token ids with input limits, and incremental detokenization for streaming."""

from __future__ import annotations

import codecs
import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from services.common.errors import InvalidArgument
from services.tokenizer.vocab import ensure_vocabulary, load_gpt2_encoding

DEFAULT_MAX_INPUT_CHARS = 100_000
DEFAULT_MAX_TOKENS = 8_192


class Tokenizer:
    """tiktoken's `gpt2` encoding behind the checks a service needs.

    Every method rejects bad input with InvalidArgument naming the parameter, so one request's
    bad text or ids never reach tiktoken (which raises KeyError or panics on unknown ids).
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        *,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if max_input_chars < 1 or max_tokens < 1:
            raise InvalidArgument(f"max_input_chars and max_tokens must be >= 1, got {max_input_chars}, {max_tokens}")
        self._encoding = encoding
        self.max_input_chars = max_input_chars
        self.max_tokens = max_tokens

    @classmethod
    def from_cache(
        cls,
        cache_dir: Path,
        *,
        allow_download: bool = False,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> Tokenizer:
        """Loads the vocabulary from cache_dir; raises FailedPrecondition at once if absent."""
        ensure_vocabulary(cache_dir, allow_download=allow_download)
        encoding = load_gpt2_encoding(cache_dir)
        return cls(encoding, max_input_chars=max_input_chars, max_tokens=max_tokens)

    @property
    def eos_token_id(self) -> int:
        return self._encoding.eot_token

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of text; without allow_special, `<|endoftext|>` is encoded as plain text."""
        self._check_text(text, "text")
        if allow_special:
            ids = self._encoding.encode(text, allowed_special="all")
        else:
            ids = self._encoding.encode_ordinary(text)
        if len(ids) > self.max_tokens:
            raise InvalidArgument(f"text encodes to {len(ids)} tokens; max_tokens is {self.max_tokens}")
        return ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """encode() for each text; all texts are checked before any is encoded."""
        for index, text in enumerate(texts):
            self._check_text(text, f"texts[{index}]")
        return [self.encode(text, allow_special=allow_special) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self._encoding.decode(self._checked_ids(ids, "ids"))

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        checked = [self._checked_ids(ids, f"batch[{index}]") for index, ids in enumerate(batch)]
        return [self._encoding.decode(ids) for ids in checked]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
        return self._encoding.decode_single_token_bytes(self._checked_id(token_id, "token_id"))

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def _check_text(self, text: str, name: str) -> None:
        if not isinstance(text, str):
            raise InvalidArgument(f"{name} must be a str, got {type(text).__name__}")
        if len(text) > self.max_input_chars:
            raise InvalidArgument(f"{name} has {len(text)} characters; max_input_chars is {self.max_input_chars}")

    def _checked_id(self, token_id: int, name: str) -> int:
        try:
            value = operator.index(token_id)
        except TypeError:
            raise InvalidArgument(f"{name} must be an integer token id, got {token_id!r}") from None
        if not 0 <= value < self.vocab_size:
            raise InvalidArgument(f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")
        return value

    def _checked_ids(self, ids: Iterable[int], name: str) -> list[int]:
        checked = [self._checked_id(token_id, name) for token_id in ids]
        if len(checked) > self.max_tokens:
            raise InvalidArgument(f"{name} has {len(checked)} tokens; max_tokens is {self.max_tokens}")
        return checked


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, one token at a time, O(1) per token.

    Works on token bytes: a token that ends inside a multi-byte UTF-8 character yields "" and
    the character arrives whole with the token that completes it. Bytes that can never form a
    character become U+FFFD as soon as that is certain, so the concatenated deltas plus flush()
    always equal Tokenizer.decode() of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_count = 0

    def push(self, token_id: int) -> str:
        """Feeds one token id; returns the text that is now complete (may be "")."""
        delta = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        self.token_count += 1
        return delta

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(token_id) for token_id in token_ids)

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an unfinished character held back so far (at most 3)."""
        return self._utf8.getstate()[0]

    def flush(self) -> str:
        """Ends the stream: an unfinished character comes out as U+FFFD; the decoder resets."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail
