"""Tokenizer against an independent GPT-2 BPE (Hugging Face tokenizers), limits, and streaming decode."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HuggingFaceTokenizer
from tokenizers import decoders, models, pre_tokenizers

from services.common.errors import InvalidArgument
from services.tokenizer import vocab
from services.tokenizer.tokenization import Tokenizer
from services.tokenizer.vocab import ENCODER_JSON, VOCAB_BPE, cache_path

# Where CI's `bash ops/provision-vocab.sh` put the real files (the script's own default).
PROVISIONED = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or vocab.DEFAULT_CACHE_DIR).expanduser()

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and trailing   ",
    "I'm sure they'll say it's what we'd've done; you're right, we've DONE it.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tpass\r\n",
    "for (let i = 0; i < n; i++) { sum += a[i]; }",
    "3.14159 1,000,000 2024-01-31 0x1F 12345678901234567890",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️",
    "中文分词测试，日本語のテキスト、한국어 문장。",
    "Mixed: naïve café Ωμέγα Привет мир مرحبا नमस्ते",
    "\n\n\n   \t\t  \n",
    "tabs\tand\u00a0non-breaking\u3000spaces",
    "<|endoftext|> is plain text here",
    "",
    "a",
    "!!!???...,,,;;;",
    "https://example.com/path?query=1&other=two#fragment",
    "ÀÁÂÃÄÅ àáâãäå ÇçÑñ ßẞ",
    "𝕳𝖊𝖑𝖑𝖔 𝓌𝑜𝓇𝓁𝒹 (mathematical alphanumerics)",
]
RANDOM_PIECES = [*"ab cd\n\t  '", "'s", "'ll", "é", "中", "😀", "👍🏽", "\u200d", "7", "42"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_cache(PROVISIONED, max_input_chars=2_000, max_tokens=1_000)


@pytest.fixture(scope="module")
def reference() -> HuggingFaceTokenizer:
    model = models.BPE.from_file(str(cache_path(PROVISIONED, ENCODER_JSON)), str(cache_path(PROVISIONED, VOCAB_BPE)))
    reference = HuggingFaceTokenizer(model)
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    return reference


def random_texts(count: int, seed: int = 0) -> list[str]:
    generator = random.Random(seed)
    return ["".join(generator.choice(RANDOM_PIECES) for _ in range(generator.randint(0, 24))) for _ in range(count)]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_independent_bpe(tokenizer: Tokenizer, reference: HuggingFaceTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids
    assert tokenizer.decode(ids) == text == reference.decode(ids)


def test_random_texts_match_independent_bpe(tokenizer: Tokenizer, reference: HuggingFaceTokenizer) -> None:
    texts = random_texts(500)
    assert tokenizer.encode_batch(texts) == [e.ids for e in reference.encode_batch(texts)]


def test_known_ids_and_eos(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.vocab_size == 50257
    assert tokenizer.decode([50256]) == "<|endoftext|>"


def test_special_token_only_when_allowed(tokenizer: Tokenizer) -> None:
    text = "a<|endoftext|>b"
    assert 50256 not in tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(text, allow_special=True) == [64, 50256, 65]


def test_batched_forms(tokenizer: Tokenizer) -> None:
    batch = tokenizer.encode_batch(CORPUS)
    assert batch == [tokenizer.encode(text) for text in CORPUS]
    assert tokenizer.decode_batch(batch) == CORPUS


def test_limits_name_the_parameter(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgument, match="max_input_chars is 2000"):
        tokenizer.encode("x" * 2_001)
    with pytest.raises(InvalidArgument, match="max_tokens is 1000"):
        tokenizer.encode("😀" * 1_000)  # 1000 characters, 2000+ tokens
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        tokenizer.encode_batch(["ok", "x" * 2_001])
    with pytest.raises(InvalidArgument, match="ids has 1001 tokens"):
        tokenizer.decode([0] * 1_001)


@pytest.mark.parametrize("bad", [-1, 50257, 10**12, 1.5, "7", None])
def test_invalid_token_ids(tokenizer: Tokenizer, bad: object) -> None:
    with pytest.raises(InvalidArgument, match="ids"):
        tokenizer.decode([1, bad])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="token_id"):
        tokenizer.incremental_decoder().push(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"batch\[0\]"):
        tokenizer.decode_batch([[bad]])  # type: ignore[list-item]


def test_numpy_ids_are_accepted(tokenizer: Tokenizer) -> None:
    ids = np.array(tokenizer.encode("numpy ids"), dtype=np.int64)
    assert tokenizer.decode(ids) == "numpy ids"  # type: ignore[arg-type]


def test_incremental_characters_arrive_whole(tokenizer: Tokenizer) -> None:
    text = "😀中文👍🏽 done"
    ids = tokenizer.encode(text)
    split = [i for i in ids if tokenizer.token_bytes(i).decode("utf-8", "replace") == "\ufffd"]
    assert split, "the test text must contain tokens that end inside a character"
    decoder = tokenizer.incremental_decoder()
    deltas = [decoder.push(token_id) for token_id in ids]
    assert "" in deltas
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) + decoder.flush() == text
    assert decoder.token_count == len(ids)


def test_incremental_equals_full_decode(tokenizer: Tokenizer) -> None:
    streams = [tokenizer.encode(t) for t in CORPUS + random_texts(200, seed=1)]
    generator = random.Random(2)
    streams += [[generator.randrange(50257) for _ in range(40)] for _ in range(50)]
    for ids in streams:
        decoder = tokenizer.incremental_decoder()
        streamed = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
        assert streamed == tokenizer.decode(ids)


def test_flush_replaces_an_unfinished_character(tokenizer: Tokenizer) -> None:
    first_part, _ = tokenizer.encode("😀")
    assert tokenizer.token_bytes(first_part) == b"\xf0\x9f\x98"  # 3 of the 4 bytes
    decoder = tokenizer.incremental_decoder()
    assert decoder.push(first_part) == ""
    assert decoder.pending_bytes == b"\xf0\x9f\x98"
    assert decoder.flush() == "\ufffd"
    assert decoder.pending_bytes == b""
    assert decoder.push_many(tokenizer.encode("ok")) == "ok"
