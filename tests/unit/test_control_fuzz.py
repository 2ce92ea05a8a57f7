"""Property-based fuzzing of the JSON control parsers: any text parses or raises InvalidArgument, and what parses
fits everything downstream (a node record and its protobuf, the error text a gateway sends back).

Bounded and derandomized; tests/fuzz/fuzz_control.py runs the same properties under atheris.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.node_status import node_event_pb
from services.gateway.hub import record_for
from services.wire import control

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
NODE_MESSAGES = [
    {"kind": "hello", "protocol": 1, "node_id": "laptop-1", "node_kind": "native", "device": "cpu",
     "memory_bytes": 1 << 30, "speed": 100.0, "join_token": "*.1700000000.abc"},
    {"kind": "progress", "shard_id": "gpt2-0-6", "done_bytes": 10, "total_bytes": 20},
    {"kind": "ready", "shard_id": "gpt2-0-6", "layers": [0, 6]},
    {"kind": "error", "message": "sha256 mismatch", "fatal": True},
    {"kind": "step_failed", "message": "no cache for request 3"},
    {"kind": "heartbeat", "requests_served": 3, "cached_requests": 1, "step_ms": 2.5},
    {"kind": "bye", "reason": "done"},
]  # fmt: skip
GATEWAY_MESSAGES = [
    {"kind": "welcome", "gateway_id": "gw-a", "heartbeat_s": 1.0},
    {"kind": "assign", "shard_id": "s", "layers": [0, 6], "shard_url": "http://h/s", "manifest_url": "http://h/m",
     "sha256": "ab" * 32, "size_bytes": 10, "top_k": 64, "activation_dtype": "int8"},
    {"kind": "release", "request_ids": [1, 2]},
    {"kind": "error", "message": "bad frames", "fatal": True},
    {"kind": "bye", "reason": "shutting down"},
]  # fmt: skip
KINDS = sorted({message["kind"] for message in NODE_MESSAGES + GATEWAY_MESSAGES})

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**50, 2**50 + 1, 2**53 + 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(KINDS),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children)),
    max_leaves=12,
)


def parse_checked(parse, text: str) -> object | None:
    """parse(text) gives a message or InvalidArgument with an encodable message; nothing else."""
    try:
        message = parse(text)
    except InvalidArgument as error:
        str(error).encode("utf-8")  # the gateway sends this text back to the node
        return None
    if isinstance(message, control.Hello):
        record = record_for(message, "gw", "127.0.0.1:1")
        status = node_event_pb(record).node
        assert status.memory_bytes == message.memory_bytes and status.speed == message.speed
        assert math.isfinite(message.speed) and 0 < message.speed <= control.MAX_SPEED
        node_event_pb(record).SerializeToString()
    control.dump(message).encode("utf-8")
    return message


@st.composite
def altered(draw: st.DrawFn, messages: list[dict[str, object]]) -> str:
    """A valid message with fields replaced by random JSON, dropped, or added; sometimes with its text cut."""
    message = dict(draw(st.sampled_from(messages)))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from([*message, "extra"]))
        if draw(st.booleans()):
            message[field] = draw(JSON)
        else:
            message.pop(field, None)
    text = json.dumps(message)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@pytest.mark.timeout(120)
@FUZZ
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    parse_checked(control.parse_node_message, text)
    parse_checked(control.parse_gateway_message, text)


@pytest.mark.timeout(120)
@FUZZ
@given(JSON.map(json.dumps))
def test_random_json(text: str) -> None:
    parse_checked(control.parse_node_message, text)
    parse_checked(control.parse_gateway_message, text)


@pytest.mark.timeout(120)
@FUZZ
@given(altered(NODE_MESSAGES))
def test_node_messages_with_fields_replaced(text: str) -> None:
    parse_checked(control.parse_node_message, text)


@pytest.mark.timeout(120)
@FUZZ
@given(altered(GATEWAY_MESSAGES))
def test_gateway_messages_with_fields_replaced(text: str) -> None:
    parse_checked(control.parse_gateway_message, text)


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    parse_checked(control.parse_node_message, data)


def test_the_seed_messages_are_valid() -> None:
    """The fuzzing starts from real messages: each parses as it stands."""
    for message in NODE_MESSAGES:
        assert parse_checked(control.parse_node_message, json.dumps(message)) is not None, message
    for message in GATEWAY_MESSAGES:
        assert parse_checked(control.parse_gateway_message, json.dumps(message)) is not None, message
