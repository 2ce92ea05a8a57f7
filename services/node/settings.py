"""Settings of a native node (`SYNAPSE_NODE_*`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ProcessSettings


class NodeSettings(ProcessSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_NODE_", extra="ignore")

    gateway_url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ws://127.0.0.1:8765/ws"],
        min_length=1,
        description="Gateway WebSocket URL (wss:// with TLS), or several, comma-separated: the node joins the "
        "first and, when a link drops or a connection fails, tries the next in turn (the reconnect delay doubles "
        "after each full round).",
    )
    node_id: str | None = Field(None, description="Stable id of this node; default host-pid.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to compute; auto = cuda if present.")
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations on the device; auto = float32 on CPU, float16 on CUDA."
    )
    memory_bytes: int | None = Field(
        None, gt=0, description="Memory budget for weights and KV caches; default half the free RAM/VRAM."
    )
    speed: float | None = Field(None, gt=0, description="Skip the start-up benchmark and report this speed.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "synapse" / "shards", description="Downloaded shards, keyed by sha256."
    )
    threads: int | None = Field(None, gt=0, description="torch intra-op threads on CPU; default torch's choice.")
    idle_timeout_s: float = Field(300.0, gt=0, description="Free a request's KV cache after this long without a step.")
    max_batch: int = Field(64, gt=0, description="Most requests computed in one forward pass.")
    kv_slots: int | None = Field(
        None, gt=0, description="KV cache slots (concurrent requests) per stage; default 2 x max_batch, fit to memory."
    )
    shard_retry_s: float = Field(
        60.0,
        ge=0,
        description="How long a broken shard download is retried (resuming where it broke, backoff 0.5 s doubling "
        "to 8 s) before the load fails and the node leaves to rejoin.",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles up to reconnect_max_s.")
    reconnect_max_s: float = Field(15.0, gt=0, description="Longest reconnect delay.")
    fault_injection: Literal["none", "wrong_numbers", "never_ready"] = Field(
        "none",
        description="TEST ONLY, off by default: wrong_numbers shifts every answer a little (what verification must "
        "catch); never_ready accepts assignments and never loads them (what the load deadline must catch).",
    )
    tls_ca: Path | None = Field(None, description="CA/self-signed certificate to trust for wss:// gateways.")
    join_token: str = Field(
        "", max_length=512, description="Join token shown at hello (`synapse token` issues one); empty = none."
    )

    @field_validator("gateway_url", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """`ws://a/ws,ws://b/ws` from the environment or the command line (a JSON list works too)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part]
        return value

    @field_validator("gateway_url")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"gateway URL {url!r} must start with ws:// or wss://")
        return value
