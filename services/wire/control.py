"""JSON control messages between gateway and nodes, both directions (docs/wire-protocol.md, "Control messages").

The gateway parses what nodes send with `parse_node_message`, the native node what gateways send with
`parse_gateway_message`; both say what is wrong with a malformed message.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.common.errors import InvalidArgument

PROTOCOL_VERSION = 1
# Wire dtype of activations between stages (syn1.ACTIVATION_DTYPES maps each to its SYN1 dtype).
ActivationDType = Literal["float16", "float32", "int8"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Hello(_Message):
    """node -> gateway, first message: who the node is and what it can do."""

    kind: Literal["hello"]
    protocol: int = Field(PROTOCOL_VERSION, description="Protocol version the node speaks.")
    node_id: str = Field(min_length=1, max_length=128)
    node_kind: Literal["native", "web"]
    device: str = Field("", max_length=256)
    memory_bytes: int = Field(gt=0)
    speed: float = Field(gt=0, description="GPT-2 layer forward passes per second (start-up benchmark).")
    join_token: str = ""


class Welcome(_Message):
    """gateway -> node, answer to hello."""

    kind: Literal["welcome"] = "welcome"
    gateway_id: str
    heartbeat_s: float


class Assign(_Message):
    """gateway -> node: download and load this shard."""

    kind: Literal["assign"] = "assign"
    shard_id: str
    layers: tuple[int, int]
    shard_url: str
    manifest_url: str
    sha256: str
    size_bytes: int
    top_k: int = 64
    activation_dtype: ActivationDType = "float16"


class Progress(_Message):
    """node -> gateway: shard download/load progress."""

    kind: Literal["progress"]
    shard_id: str
    done_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)


class Ready(_Message):
    """node -> gateway: the shard is loaded; the node serves these layers."""

    kind: Literal["ready"]
    shard_id: str
    layers: tuple[int, int]


class Release(_Message):
    """gateway -> node: free the KV caches of these requests."""

    kind: Literal["release"] = "release"
    request_ids: list[int]


class Error(_Message):
    """either way: something failed; `fatal` means the sender leaves."""

    kind: Literal["error"]
    message: str = Field(max_length=4096)
    fatal: bool = False


class GatewayError(_Message):
    """gateway -> node: why the gateway is closing this connection, or refusing a message."""

    kind: Literal["error"] = "error"
    message: str
    fatal: bool = True


class StepFailed(_Message):
    """node -> gateway, in place of a step's binary reply: that step failed (the node stays)."""

    kind: Literal["step_failed"] = "step_failed"
    message: str = Field("", max_length=4096)


class Heartbeat(_Message):
    """node -> gateway, periodic: counters for the status view and metrics."""

    kind: Literal["heartbeat"]
    requests_served: int = 0
    cached_requests: int = 0
    step_ms: float = 0.0


class Bye(_Message):
    """either way: leaving on purpose."""

    kind: Literal["bye"]
    reason: str = ""


NodeMessage = Annotated[Hello | Progress | Ready | Error | StepFailed | Heartbeat | Bye, Field(discriminator="kind")]
GatewayMessage = Annotated[Welcome | Assign | Release | GatewayError | Bye, Field(discriminator="kind")]
_NODE_MESSAGE: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)
_GATEWAY_MESSAGE: TypeAdapter[GatewayMessage] = TypeAdapter(GatewayMessage)


def parse_node_message(text: str | bytes) -> NodeMessage:
    """A node's JSON text -> message; anything malformed is InvalidArgument saying what is wrong."""
    return _parse(text, _NODE_MESSAGE)


def parse_gateway_message(text: str | bytes) -> GatewayMessage:
    """A gateway's JSON text -> message; anything malformed is InvalidArgument saying what is wrong."""
    return _parse(text, _GATEWAY_MESSAGE)


def _parse(text: str | bytes, adapter: TypeAdapter) -> Any:
    try:
        data: Any = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"control message is not JSON: {error}") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise InvalidArgument('control message must be a JSON object with a "kind"')
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "kind"
        raise InvalidArgument(f"bad {str(data.get('kind'))[:40]!r} message: {where}: {first['msg']}") from None


def dump(message: _Message) -> str:
    return message.model_dump_json()
