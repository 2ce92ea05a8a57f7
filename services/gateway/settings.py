"""Settings of the gateway (`SYNAPSE_GATEWAY_*`, plus the shared `SYNAPSE_REDIS_URL`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.join_tokens import check_secrets
from services.common.settings import ServiceSettings

WEBNODE_DIR = Path(__file__).resolve().parents[2] / "webnode"


class GatewaySettings(ServiceSettings):
    # hide_input_in_errors: a rejected join secret is not echoed to the log.
    model_config = SettingsConfigDict(
        env_prefix="SYNAPSE_GATEWAY_", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    port: int = Field(50055, ge=0, le=65535, description="gRPC port the router calls; 0 picks a free one.")
    gateway_id: str | None = Field(None, description="Stable id of this gateway instance; default host-pid.")
    advertise_address: str | None = Field(
        None,
        description="host:port other gateways and the router reach this gateway's gRPC at; default host:port, "
        "or the address the hostname resolves to when bound to 0.0.0.0 (a container's own).",
    )
    ws_host: str = Field("127.0.0.1", description="Address the node WebSocket server binds to.")
    ws_port: int = Field(8765, ge=0, le=65535, description="Port of the node WebSocket server (and web page).")
    tls_cert: Path | None = Field(None, description="PEM certificate; with tls_key, nodes connect over wss.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert (`synapse certs` makes a pair).")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SYNAPSE_REDIS_URL", "redis_url"),
        description="Redis for the shared node registry (several gateways); unset = in memory.",
    )
    heartbeat_s: float = Field(1.0, gt=0, description="Seconds between WebSocket pings to each node.")
    heartbeat_timeout_s: float = Field(
        3.0, gt=0, description="A node that answers no ping for this long is marked gone."
    )
    step_timeout_s: float = Field(60.0, gt=0, description="Longest one stage may take for one step.")
    quarantine_s: float = Field(
        30.0, gt=0, description="How long a node that lied is refused at first; doubles per offense in a day."
    )
    quarantine_max_s: float = Field(3600.0, gt=0, description="Longest quarantine of a node.")
    max_frame_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest WebSocket message accepted; larger closes with 1009."
    )
    hello_timeout_s: float = Field(
        10.0, gt=0, description="A connection that sends no hello within this long is closed (1008)."
    )
    max_messages_per_s: float = Field(
        5000.0, gt=0, description="Messages per second one connection may send on average (token bucket; 4029)."
    )
    max_message_burst: int = Field(
        10000, gt=0, description="Messages one connection may send at once above max_messages_per_s."
    )
    max_connections_per_address: int = Field(
        64, ge=0, description="Open connections per client IP (a proxy's, behind one); 0 = no limit; more close 1013."
    )
    join_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Secrets join tokens are signed with, comma-separated, newest first (`synapse token` signs with "
        "the first; `synapse token --new-secret` makes one); unset with no join_secrets_file = any node may join.",
    )
    join_secrets_file: Path | None = Field(
        None,
        description="File of join secrets, one a line, newest first; re-read when it changes, so secrets rotate "
        "without a restart. Set (even empty), nodes need a token.",
    )
    webnode_dir: Path | None = Field(
        None,
        description="Static files of the web node page, served at /; unset = the webnode/ folder shipped with Synapse.",
    )

    @field_validator("join_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        """`a,b` from the environment (a JSON list works too)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part]
        return value

    @field_validator("join_secrets")
    @classmethod
    def _check_secrets(cls, value: list[str]) -> list[str]:
        return check_secrets(value)

    @property
    def webnode_root(self) -> Path:
        return self.webnode_dir or WEBNODE_DIR
