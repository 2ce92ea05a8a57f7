"""Services started in-process on 127.0.0.1 port 0; a server fixture yields a running GrpcServer (`.address`).

Limits are small so error paths are cheap; a test module overrides `*_settings` to change them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import tiktoken

from services.common.server import GrpcServer
from services.sampler.__main__ import start_sampler
from services.sampler.settings import SamplerSettings
from services.tokenizer.__main__ import start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from services.tokenizer.tokenization import Tokenizer
from services.tokenizer.vocab import load_gpt2_encoding


@pytest.fixture(scope="session")
def gpt2_encoding() -> tiktoken.Encoding:
    """The provisioned GPT-2 vocabulary (`bash ops/provision-vocab.sh`), parsed once per session."""
    return load_gpt2_encoding(TokenizerSettings().vocab_cache_dir)


@pytest.fixture
def tokenizer_settings() -> TokenizerSettings:
    return TokenizerSettings(
        host="127.0.0.1", port=0, metrics_port=None, shutdown_grace_s=0.5,
        max_input_chars=10_000, max_tokens=4_096, max_batch=16,
    )  # fmt: skip


@pytest.fixture
async def tokenizer_server(
    tokenizer_settings: TokenizerSettings, gpt2_encoding: tiktoken.Encoding
) -> AsyncIterator[GrpcServer]:
    tokenizer = Tokenizer(
        gpt2_encoding,
        max_input_chars=tokenizer_settings.max_input_chars,
        max_tokens=tokenizer_settings.max_tokens,
    )
    server = await start_tokenizer(tokenizer_settings, tokenizer)
    yield server
    await server.stop()


@pytest.fixture
def sampler_settings() -> SamplerSettings:
    return SamplerSettings(
        host="127.0.0.1", port=0, metrics_port=None, shutdown_grace_s=0.5, max_batch=8, max_vocab=65_536
    )


@pytest.fixture
async def sampler_server(sampler_settings: SamplerSettings) -> AsyncIterator[GrpcServer]:
    server = await start_sampler(sampler_settings)
    yield server
    await server.stop()
