"""Settings of the topology-router (`SYNAPSE_ROUTER_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_ROUTER_", extra="ignore", populate_by_name=True)

    port: int = Field(50050, ge=0, le=65535, description="Public gRPC port (Generate); 0 picks a free one.")
    gateways: list[str] = Field(
        default_factory=list,
        description="gRPC addresses of gateways to follow always, JSON list (e.g. '[\"gw1:50055\"]'); "
        "empty = those registered in Redis, or 127.0.0.1:50055 without Redis.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SYNAPSE_REDIS_URL", "redis_url"),
        description="Redis the gateways register in; set, the router follows every live gateway (no list needed).",
    )
    discovery_period_s: float = Field(
        2.0, gt=0, description="How often the router looks for gateways that registered or expired in Redis."
    )
    tokenizer_address: str = Field("127.0.0.1:50051", description="gRPC address of the tokenizer service.")
    sharder_address: str = Field("127.0.0.1:50053", description="gRPC address of the sharder service.")
    model: str = Field("", description="Model id to serve; empty = the sharder's default.")
    vocab_cache_dir: Path = Field(
        Path.home() / ".cache" / "synapse" / "tiktoken",
        description="tiktoken cache for in-process streaming detokenization (same files as the tokenizer's).",
    )
    default_max_tokens: int = Field(64, gt=0, description="max_tokens when a request leaves it 0.")
    max_tokens_limit: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for.")
    top_k: int = Field(64, ge=0, description="Candidates the last stage returns per token (0 = full logits).")
    activation_dtype: Literal["float16", "float32", "int8"] = Field(
        "float16", description="Wire dtype of activations between stages."
    )
    max_batch: int = Field(32, gt=0, le=1024, description="Most requests in one pipeline step (SYN1: 1,024 frames).")
    prefill_chunk: int = Field(
        256,
        gt=0,
        description="Most prompt tokens of one request per step: long prompts go in chunks, so decodes "
        "of other requests are not held up for long.",
    )
    speculate_tokens: int = Field(
        0,
        ge=0,
        le=16,
        description="Speculative decoding: most prompt-lookup draft tokens checked per decode step (0 = off); "
        "output is unchanged, a round trip yields up to 1 + this many tokens (native-node pipelines).",
    )
    speculate_ngram: int = Field(3, ge=1, le=8, description="Longest n-gram prompt lookup matches drafts by.")
    micro_batches: int = Field(
        0, ge=0, description="Micro-batches the active requests are split into (0 = one per stage, so stages overlap)."
    )
    pipeline_wait_s: float = Field(
        10.0, ge=0, description="How long a request waits for a complete pipeline before UNAVAILABLE."
    )
    failover_wait_s: float = Field(
        120.0, ge=0, description="How long a request whose node failed waits for a new pipeline (re-plan, shard load)."
    )
    max_failovers: int = Field(
        16, ge=0, description="Most replays of one request before it ends UNAVAILABLE (each waits longer)."
    )
    load_deadline_s: float = Field(
        120.0, gt=0, description="A node that has not loaded its assigned shard by then is planned around."
    )
    load_exclude_s: float = Field(300.0, gt=0, description="How long such a node is left out of plans.")
    replicas: int = Field(
        1,
        ge=1,
        le=8,
        description="Pipelines to plan over disjoint groups of nodes, each with the same layer "
        "ranges (more throughput, and verifiers for each other).",
    )
    verify_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of requests whose every stage is recomputed on a replica holding the "
        "same layers and compared; a node outvoted is quarantined (needs replicas >= 2, best 3).",
    )
    replan_settle_s: float = Field(
        1.0, ge=0, description="Membership must be unchanged this long before a re-plan (no storms on churn)."
    )
    step_timeout_s: float = Field(60.0, gt=0, description="Longest one pipeline step may take.")
    max_prompt_chars: int = Field(
        100_000, gt=0, description="Longest prompt text accepted, in characters (checked before tokenizing)."
    )
    max_streams_per_client: int = Field(
        64, gt=0, description="Concurrent Generate streams one client (API token, else address) may hold."
    )
    api_tokens: list[str] = Field(
        default_factory=list,
        description="Bearer tokens the public API accepts, JSON list; empty = no token needed. Health stays open.",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate; with tls_key the public API serves TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    call_timeout_s: float = Field(10.0, gt=0, description="Deadline of unary calls to the other services.")
