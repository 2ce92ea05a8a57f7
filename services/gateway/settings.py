"""Settings of the gateway (`SYNAPSE_GATEWAY_*`, plus the shared `SYNAPSE_REDIS_URL`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

WEBNODE_DIR = Path(__file__).resolve().parents[2] / "webnode"


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SYNAPSE_GATEWAY_", extra="ignore", populate_by_name=True)

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
    max_frame_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest WebSocket message accepted.")
    webnode_dir: Path | None = Field(
        None,
        description="Static files of the web node page, served at /; unset = the webnode/ folder shipped with Synapse.",
    )

    @property
    def webnode_root(self) -> Path:
        return self.webnode_dir or WEBNODE_DIR
