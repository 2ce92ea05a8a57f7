"""services.wire.control: every field a node sends is typed strictly and bounded; malformed text is InvalidArgument."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.common.node_status import node_event_pb, node_from_event
from services.common.nodes import NodeRecord
from services.wire import control


def hello(**fields: object) -> dict[str, object]:
    return {"kind": "hello", "node_id": "laptop-1", "node_kind": "native", "device": "cpu",
            "memory_bytes": 1 << 30, "speed": 100.0, **fields}  # fmt: skip


def refused(data: dict[str, object] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(InvalidArgument) as caught:
        control.parse_node_message(text)
    return str(caught.value)


def test_a_good_hello_parses() -> None:
    message = control.parse_node_message(json.dumps(hello(join_token="node.1.abc", device="webgpu: Apple M2")))
    assert isinstance(message, control.Hello)
    assert (message.node_id, message.memory_bytes, message.speed) == ("laptop-1", 1 << 30, 100.0)
    assert control.parse_node_message(json.dumps(hello(speed=7, memory_bytes=control.MAX_MEMORY_BYTES))).speed == 7.0


# The start of a hello as raw JSON text, for values json.dumps would not write.
RAW_HELLO = '{"kind": "hello", "node_id": "a", "node_kind": "web", "memory_bytes": 1, '
BAD_HELLOS = {
    "memory_bytes 2^64": (hello(memory_bytes=2**64), "memory_bytes: Input should be less than or equal to"),
    "memory_bytes over 2^50": (hello(memory_bytes=2**50 + 1), "memory_bytes"),
    "memory_bytes 0": (hello(memory_bytes=0), "memory_bytes: Input should be greater than 0"),
    "memory_bytes negative": (hello(memory_bytes=-1), "memory_bytes"),
    "memory_bytes as a string": (hello(memory_bytes="1073741824"), "memory_bytes: Input should be a valid integer"),
    "memory_bytes as a float": (hello(memory_bytes=1.5e9), "memory_bytes: Input should be a valid integer"),
    "memory_bytes true": (hello(memory_bytes=True), "memory_bytes: Input should be a valid integer"),
    "speed 1e999 (inf)": (RAW_HELLO + '"speed": 1e999}', "speed: Input should be a finite number"),
    "speed Infinity": (json.dumps(hello(speed=float("inf"))), "Infinity is not a JSON value"),
    "speed NaN": (json.dumps(hello(speed=float("nan"))), "NaN is not a JSON value"),
    "speed huge": (hello(speed=1e300), "speed: Input should be less than or equal to"),
    "speed 0": (hello(speed=0), "speed: Input should be greater than 0"),
    "speed as a string": (hello(speed="100"), "speed: Input should be a valid number"),
    "node_id empty": (hello(node_id=""), "node_id"),
    "node_id with a space": (hello(node_id="laptop 1"), "node_id: String should match pattern"),
    "node_id with a slash": (hello(node_id="../etc"), "node_id: String should match pattern"),
    "node_id with a newline": (hello(node_id="a\nnode_joined node=b"), "node_id"),
    "node_id too long": (hello(node_id="n" * 129), "node_id: String should have at most 128 characters"),
    "node_id a number": (hello(node_id=7), "node_id: Input should be a valid string"),
    "device too long": (hello(device="x" * 257), "device: String should have at most 256 characters"),
    "device with control characters": (hello(device="cpu\x1b[31m"), "device: Value error, must be printable"),
    "device with a lone surrogate": (RAW_HELLO + '"speed": 1, "device": "\\ud800"}', "device: Input should be a valid"),
    "join_token too long": (hello(join_token="t" * 513), "join_token: String should have at most 512 characters"),
    "join_token not a string": (hello(join_token=["a"]), "join_token: Input should be a valid string"),
    "protocol a string": (hello(protocol="1"), "protocol: Input should be a valid integer"),
    "protocol a float": (hello(protocol=1.0), "protocol: Input should be a valid integer"),
    "protocol huge": (hello(protocol=2**64), "protocol"),
    "node_kind unknown": (hello(node_kind="toaster"), "node_kind"),
}


@pytest.mark.parametrize("case", BAD_HELLOS)
def test_every_bad_hello_field_is_refused_by_name(case: str) -> None:
    data, expected = BAD_HELLOS[case]
    message = refused(data)
    assert message.startswith("bad 'hello' message") or "not JSON" in message, message
    assert expected in message, message


BAD_MESSAGES = {
    "ready with an empty range": ({"kind": "ready", "shard_id": "s", "layers": [5, 5]}, "not a range"),
    "ready with a reversed range": ({"kind": "ready", "shard_id": "s", "layers": [6, 0]}, "not a range"),
    "ready with a huge layer": ({"kind": "ready", "shard_id": "s", "layers": [0, 2**40]}, "layers.1"),
    "ready with three layers": ({"kind": "ready", "shard_id": "s", "layers": [0, 1, 2]}, "layers"),
    "ready with a string layer": ({"kind": "ready", "shard_id": "s", "layers": ["0", 1]}, "layers.0"),
    "progress over 2^53": ({"kind": "progress", "shard_id": "s", "done_bytes": 2**60, "total_bytes": 1}, "done_bytes"),
    "heartbeat with a negative step time": ({"kind": "heartbeat", "step_ms": -1}, "step_ms"),
    "error message too long": ({"kind": "error", "message": "x" * 4097}, "message"),
    "error fatal as a string": ({"kind": "error", "message": "m", "fatal": "yes"}, "fatal"),
    "bye reason too long": ({"kind": "bye", "reason": "x" * 1025}, "reason"),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_bad_fields_of_other_node_messages_are_refused(case: str) -> None:
    data, expected = BAD_MESSAGES[case]
    assert expected in refused(data)


def test_text_that_is_not_readable_json_is_refused_without_other_errors() -> None:
    assert "over the limit of 65536 bytes" in refused(json.dumps(hello(device="x" * 70000)))
    assert "nested too deeply" in refused("[" * 60000)
    assert "not JSON" in refused('{"kind": "hello", "memory_bytes": ' + "9" * 5000 + "}")  # > 4300 digits
    assert '"kind"' in refused("[1, 2]")
    unknown = refused('{"kind": "\\ud800"}')  # the error quotes the kind: it must stay encodable
    unknown.encode("utf-8")
    with pytest.raises(InvalidArgument, match="not JSON"):
        control.parse_node_message(b"\xff\xfe{")


def test_gateway_messages_are_bounded_too() -> None:
    with pytest.raises(InvalidArgument, match="request_ids"):
        control.parse_gateway_message(json.dumps({"kind": "release", "request_ids": [2**32]}))
    with pytest.raises(InvalidArgument, match="heartbeat_s"):
        control.parse_gateway_message('{"kind": "welcome", "gateway_id": "g", "heartbeat_s": 1e999}')


def test_node_status_conversion_never_raises_on_a_record() -> None:
    """A record a protobuf cannot hold is clamped, not fatal: WatchNodes carries every other node on."""
    rogue = NodeRecord("rogue\ud800", "native", "cpu\udfff", 2**64 + 5, float("inf"), "gw", "127.0.0.1:1",
                       layers=(0, 2**40), version=2**70)  # fmt: skip
    event = node_event_pb(rogue)
    assert event.node.memory_bytes == 2**64 - 1 and event.node.speed == 0.0
    assert event.node.layers.end == 2**32 - 1 and event.version == 2**64 - 1
    assert event.node.node_id == "rogue\\ud800"
    event.SerializeToString()
    nan = node_event_pb(NodeRecord("n", "web", "", -1, float("nan"), "gw", "a", state="gone"))
    assert (nan.node.memory_bytes, nan.node.speed) == (0, 0.0)
    good = NodeRecord("good", "web", "webgpu", 1 << 30, 12.5, "gw", "a", state="ready", layers=(0, 6), shard_id="s")
    assert node_from_event(node_event_pb(good)) == good
