"""Coverage-guided fuzzing of the JSON control parsers (both directions) with atheris. Not collected by pytest
(tests/unit/test_control_fuzz.py checks the same properties with hypothesis in the suite).

    pip install atheris
    PYTHONPATH=. python tests/fuzz/fuzz_control.py -max_total_time=300 -rss_limit_mb=2048

With no corpus folder given it starts from var/fuzz/control/, seeded with one message of every kind. A crash is
any exception but InvalidArgument, an error text that cannot be sent back as UTF-8, or a hello whose record
does not fit its protobuf exactly (or a speed that is not finite); libFuzzer writes the input as
var/fuzz/crash-<sha1> and stops, or with --keep-going the first input of each distinct crash and goes on.
"""

from __future__ import annotations

import json
import math
import re
import sys

import atheris

from tests.fuzz.crashes import keep_going

with atheris.instrument_imports(include=["services"]):  # our code; numpy, pydantic and grpc as they are
    from services.common.errors import InvalidArgument
    from services.common.node_status import node_event_pb
    from services.gateway.hub import record_for
    from services.wire import control

from tests.fuzz.crashes import FOLDER
from tests.unit.test_control_fuzz import GATEWAY_MESSAGES, NODE_MESSAGES

PARSERS = (control.parse_node_message, control.parse_gateway_message)


SEEDS = NODE_MESSAGES + GATEWAY_MESSAGES
BIG, DEEP = "<big int of digits:>", "<nested arrays:>"  # placeholders, replaced in the JSON text


def fuzzed_value(provider: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    """Any JSON value, typed by the input: the parsers' pydantic and json code is compiled, so coverage alone
    would not find its edges; structure does."""
    choice = provider.ConsumeIntInRange(0, 10 if depth < 3 else 7)
    if choice == 0:
        return provider.ConsumeInt(provider.ConsumeIntInRange(1, 10))
    if choice == 6:  # json.dumps cannot write an int past 4300 digits, or nest this deep: spliced in after
        return f"{BIG}{provider.ConsumeIntInRange(1, 6000)}"
    if choice == 7:
        return f"{DEEP}{provider.ConsumeIntInRange(1, 5000)}"
    if choice == 1:
        return provider.ConsumeFloat()  # inf and nan included: json.dumps writes Infinity, NaN
    if choice == 2:
        return provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 300))
    if choice == 3:
        return provider.ConsumeBool()
    if choice == 4:
        return None
    if choice == 5:
        return provider.PickValueInList(["hello", "ready", "progress", "error", "bye", "welcome", "assign", "native"])
    if choice == 8:
        return [fuzzed_value(provider, depth + 1) for _ in range(provider.ConsumeIntInRange(0, 3))]
    keys = ["kind", "layers", "node_id", "x"]
    return {
        provider.PickValueInList(keys): fuzzed_value(provider, depth + 1)
        for _ in range(provider.ConsumeIntInRange(0, 3))
    }


def structured(data: bytes) -> str:
    """A real message of some kind with a few fields replaced, dropped or added."""
    provider = atheris.FuzzedDataProvider(data)
    message = dict(SEEDS[provider.ConsumeIntInRange(0, len(SEEDS) - 1)])
    for _ in range(provider.ConsumeIntInRange(0, 3)):
        key = provider.PickValueInList([*message, "extra"])
        if provider.ConsumeBool():
            message.pop(key, None)
        else:
            message[key] = fuzzed_value(provider)
    text = json.dumps(message)
    text = re.sub(f'"{BIG}([0-9]+)"', lambda match: "9" * int(match[1]), text)
    return re.sub(f'"{DEEP}([0-9]+)"', lambda match: "[" * int(match[1]) + "0" + "]" * int(match[1]), text)


def test_one_input(data: bytes) -> None:
    # First byte: 0 mod 3, the rest as bytes (json.loads sniffs the encoding); 1, as text, as websockets gives
    # it; 2, as the recipe for a real message with fields replaced.
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    text: str | bytes = rest if mode == 0 else rest.decode("utf-8", "replace") if mode == 1 else structured(rest)
    for parse in PARSERS:
        try:
            message = parse(text)
        except InvalidArgument as error:
            str(error).encode("utf-8")
            continue
        control.dump(message).encode("utf-8")
        if isinstance(message, control.Hello):
            if not math.isfinite(message.speed):
                raise AssertionError(f"a hello with speed {message.speed} was accepted")
            status = node_event_pb(record_for(message, "gw", "127.0.0.1:1")).node
            if (status.memory_bytes, status.speed, status.node_id) != (
                message.memory_bytes,
                message.speed,
                message.node_id,
            ):
                raise AssertionError(f"a hello's record does not fit its protobuf: {message}")


def main() -> None:
    argv = list(sys.argv)
    if not any(not argument.startswith("-") for argument in argv[1:]):
        folder = FOLDER / "control"
        folder.mkdir(parents=True, exist_ok=True)
        for index, message in enumerate(NODE_MESSAGES + GATEWAY_MESSAGES):
            (folder / f"seed-{index}").write_bytes(b"\1" + json.dumps(message).encode())
        argv.append(str(folder))
    if not any(argument.startswith("-artifact_prefix=") for argument in argv):
        argv.insert(1, f"-artifact_prefix={FOLDER}/")  # crash files there, not in the checkout
    atheris.Setup(argv, keep_going(argv, test_one_input, "control"))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
