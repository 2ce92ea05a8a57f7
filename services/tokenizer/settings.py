"""Settings of the tokenizer service (`SYNAPSE_TOKENIZER_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class TokenizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_TOKENIZER_", extra="ignore")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port of the tokenizer; 0 picks a free one.")
    vocab_cache_dir: Path = Field(
        Path.home() / ".cache" / "synapse" / "tiktoken",
        description="tiktoken cache holding GPT-2's vocab.bpe and encoder.json (`bash ops/provision-vocab.sh`).",
    )
    allow_download: bool = Field(
        False, description="Let tiktoken download the vocabulary when it is missing (needs internet)."
    )
    max_input_chars: int = Field(
        1_000_000,
        gt=0,
        description="Longest text one Encode accepts, in characters; longer is INVALID_ARGUMENT.",
    )
    max_tokens: int = Field(
        8192,
        gt=0,
        description="Most ids one text may encode to, or one Decode carry; more is INVALID_ARGUMENT.",
    )
    max_batch: int = Field(1024, gt=0, description="Most texts or sequences in one batched call.")
