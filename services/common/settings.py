"""Settings every service shares: pydantic-settings read from `SYNAPSE_<SERVICE>_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Base of every service's settings; subclasses set `model_config` with their own env prefix."""

    model_config = SettingsConfigDict(env_prefix="SYNAPSE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to (0.0.0.0 in containers).")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (logged at start).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; unset = no metrics endpoint, 0 = any."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level logged."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json for containers, text for terminals; auto picks by whether stderr is a TTY."
    )
    shutdown_grace_s: float = Field(
        5.0, gt=0, description="Seconds in-flight calls get to finish after SIGTERM before they are cut."
    )


def settings_table(classes: list[type[BaseSettings]]) -> str:
    """A Markdown table of every setting of these classes: variable, type, default, description."""
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else None
            variable = alias or f"{prefix}{name}".upper()
            annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
            annotation = annotation.replace("typing.", "").replace("|", "\\|")
            default = "" if field.is_required() else repr(field.default)
            rows.append(f"| `{variable}` | {annotation} | {default} | {field.description or ''} |")
    return "\n".join(rows)
