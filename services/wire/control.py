"""JSON control messages between gateway and nodes, both directions (docs/wire-protocol.md, "Control messages").

The gateway parses what nodes send with `parse_node_message`, the native node what gateways send with
`parse_gateway_message`; both say what is wrong with a malformed message. Nodes are not trusted: every
field a node sends is typed strictly (no "5" for 5, no true for 1) and bounded, so a record built from a
hello always fits the protobufs and the planner's arithmetic.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from services.common.errors import InvalidArgument

PROTOCOL_VERSION = 1
# Wire dtype of activations between stages (syn1.ACTIVATION_DTYPES maps each to its SYN1 dtype).
ActivationDType = Literal["float16", "float32", "int8"]
# Longest control message accepted, UTF-8 bytes: the largest real one (an error) is ~4 KiB; parsing
# megabytes of JSON would stall the gateway's event loop for every other node.
MAX_CONTROL_BYTES = 64 * 1024
MAX_MEMORY_BYTES = 2**50  # 1 PiB: beyond any device, and far inside u64 and float precision
MAX_SPEED = 1e7  # layer passes per second; an H200 runs a GPT-2 124M layer ~1e5 times a second
MAX_LAYER = 2**16  # layer indices; GPT-2 XL has 48
MAX_COUNT = 2**53  # byte counts and counters: exact as a float, fits in a u64
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a host name, "web-1a2b", "laptop_2": safe in logs and keys


def _printable(text: str) -> str:
    """One line of text, no control characters: names, ids and devices end up in logs and status views."""
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in text):
        raise ValueError("must be printable text on one line (no control characters)")
    return text


# Strict str also refuses lone surrogates (JSON's "\ud800"), which no log or protobuf could encode.
Text = Annotated[str, Field(strict=True), AfterValidator(_printable)]  # names, ids: one printable line
Prose = Annotated[str, Field(strict=True)]  # messages: may span lines
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
Layer = Annotated[int, Field(strict=True, ge=0, le=MAX_LAYER)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class Hello(_Message):
    """node -> gateway, first message: who the node is and what it can do."""

    kind: Literal["hello"]
    protocol: int = Field(PROTOCOL_VERSION, strict=True, ge=0, le=2**31, description="Protocol version spoken.")
    node_id: Text = Field(min_length=1, max_length=128, pattern=NODE_ID_PATTERN)
    node_kind: Literal["native", "web"]
    device: Text = Field("", max_length=256)
    memory_bytes: int = Field(strict=True, gt=0, le=MAX_MEMORY_BYTES)
    speed: float = Field(
        strict=True, gt=0, le=MAX_SPEED, description="GPT-2 layer forward passes per second (start-up benchmark)."
    )
    join_token: Text = Field("", max_length=512)


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
    shard_id: Text = Field(max_length=256)
    done_bytes: Count
    total_bytes: Count


class Ready(_Message):
    """node -> gateway: the shard is loaded; the node serves these layers."""

    kind: Literal["ready"]
    shard_id: Text = Field(max_length=256)
    layers: tuple[Layer, Layer]

    @model_validator(mode="after")
    def _half_open(self) -> Ready:
        if self.layers[0] >= self.layers[1]:
            raise ValueError(f"layers {list(self.layers)} is not a range [start, end) with start < end")
        return self


class Release(_Message):
    """gateway -> node: free the KV caches of these requests."""

    kind: Literal["release"] = "release"
    request_ids: list[Annotated[int, Field(ge=0, le=2**32 - 1)]]  # SYN1 request ids: u32


class Error(_Message):
    """either way: something failed; `fatal` means the sender leaves."""

    kind: Literal["error"]
    message: Prose = Field(max_length=4096)
    fatal: bool = Field(False, strict=True)


class GatewayError(_Message):
    """gateway -> node: why the gateway is closing this connection, or refusing a message."""

    kind: Literal["error"] = "error"
    message: str = Field(max_length=4096)
    fatal: bool = True


class StepFailed(_Message):
    """node -> gateway, in place of a step's binary reply: that step failed (the node stays)."""

    kind: Literal["step_failed"] = "step_failed"
    message: Prose = Field("", max_length=4096)


class Heartbeat(_Message):
    """node -> gateway, periodic: counters for the status view and metrics."""

    kind: Literal["heartbeat"]
    requests_served: Count = 0
    cached_requests: Count = 0
    step_ms: float = Field(0.0, strict=True, ge=0, le=1e9)


class Bye(_Message):
    """either way: leaving on purpose."""

    kind: Literal["bye"]
    reason: Prose = Field("", max_length=1024)


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
    size = _utf8_size(text)
    if size > MAX_CONTROL_BYTES:
        raise InvalidArgument(f"control message of {size} bytes is over the limit of {MAX_CONTROL_BYTES} bytes")
    try:
        data: Any = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise InvalidArgument("control message is not readable JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise InvalidArgument(f"control message is not JSON: {error}") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise InvalidArgument('control message must be a JSON object with a "kind"')
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = first["loc"]  # (kind, field, ...); () when the kind itself is unknown
        where = ".".join(str(part) for part in location[1:]) or ("fields" if location else "kind")
        text = f"bad {str(data.get('kind'))[:40]!r} message: {where}: {first['msg']}"
        # The text quotes the sender's input (an unknown kind, say): keep it writable as UTF-8.
        raise InvalidArgument(text.encode("utf-8", "backslashreplace").decode("utf-8")[:1000]) from None


def _utf8_size(text: str | bytes) -> int:
    """Bytes of the message; a str is measured only when its length alone does not already settle it."""
    if isinstance(text, bytes) or len(text) > MAX_CONTROL_BYTES:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON value")


def dump(message: _Message) -> str:
    return message.model_dump_json()
