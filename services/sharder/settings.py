"""Settings of the sharder service (`SYNAPSE_SHARDER_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class SharderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_SHARDER_", extra="ignore")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port of the sharder; 0 picks a free one.")
    model: str = Field(
        "gpt2",
        description="Checkpoint to serve: a local folder (config.json + model.safetensors) or a hub name.",
    )
    shards_dir: Path = Field(Path("var/shards"), description="Where shard files and manifests are written.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Element type of written shards.")
    http_host: str = Field("127.0.0.1", description="Address the shard download server binds to.")
    http_port: int = Field(8081, ge=0, le=65535, description="Port of the shard download server; 0 = any.")
    http_max_bytes_per_s: int | None = Field(
        None,
        gt=0,
        description="Most bytes per second one shard download is sent at (spare a shared uplink); unset = no cap.",
    )
    public_url: str | None = Field(
        None, description="Base URL nodes download shards from; default http://<http_host>:<http_port>."
    )
    random_fallback: bool = Field(
        False,
        description="When the hub cannot be reached, serve a random-weight GPT-2 of the same shape (labelled).",
    )
