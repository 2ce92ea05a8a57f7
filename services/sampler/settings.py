"""Settings of the sampler service (`SYNAPSE_SAMPLER_*`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class SamplerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_SAMPLER_", extra="ignore")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port of the sampler; 0 picks a free one.")
    max_batch: int = Field(4096, gt=0, description="Most requests in one SampleBatch call.")
    max_vocab: int = Field(
        1_000_000, gt=0, description="Largest logits vector accepted, in entries; larger is INVALID_ARGUMENT."
    )
