"""Settings every service shares: pydantic-settings read from `SYNAPSE_<SERVICE>_*` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProcessSettings(BaseSettings):
    """What every Synapse process has, gRPC server or not (the native node has none): metrics and logs.

    Subclasses set `model_config` with their own env prefix.
    """

    model_config = SettingsConfigDict(env_prefix="SYNAPSE_", extra="ignore")

    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; unset = no metrics endpoint, 0 = any."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level logged.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json for containers, text for terminals; auto picks by whether stderr is a TTY."
    )


class ServiceSettings(ProcessSettings):
    """Base of every gRPC service's settings: where the server binds and how it shuts down."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to (0.0.0.0 in containers).")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (logged at start).")
    shutdown_grace_s: float = Field(
        5.0, gt=0, description="Seconds in-flight calls get to finish after SIGTERM before they are cut."
    )


def settings_table(classes: list[type[BaseSettings]]) -> str:
    """A Markdown table of every setting of these classes: variable, type, default, description."""
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            variable = alias.choices[0] if hasattr(alias, "choices") else f"{prefix}{name}".upper()
            default = "" if field.is_required() else _default_text(field.get_default(call_default_factory=True))
            description = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{variable}` | {_type_text(field.annotation)} | {default} | {description} |")
    return "\n".join(rows)


def _type_text(annotation: object) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(str(choice) for choice in get_args(annotation))
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if args and get_origin(annotation) in (Union, UnionType):
        return _type_text(args[0]) + " (optional)"
    if get_origin(annotation) is list:
        return f"list[{_type_text(get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return f"`{'~' + text[len(home) :] if text.startswith(home) else text}`"
    if isinstance(value, list):
        return "`" + json.dumps(value) + "`"
    return f"`{value}`"
