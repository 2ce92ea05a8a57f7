"""Fuzzing a real gateway over real WebSockets: random frames and control messages, in and out of order, from many
connections at once, while one honest node keeps serving steps. Used by tests/integration/test_gateway_fuzz.py
(bounded) and tests/fuzz/fuzz_gateway.py (as long as you like).

A crash is anything the gateway logs at ERROR (websockets logs a handler that raised as "connection handler
failed" and closes with 1011), a close code outside those docs/wire-protocol.md lists, a connection the gateway
neither closes nor answers, or a step to the honest node that fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from services.common.pb import common_pb2, gateway_pb2
from services.wire import syn1
from services.wire.steps import StepFailed
from tests.integration.gateway_fixtures import (
    FAKE_HIDDEN,
    RunningGateway,
    head,
    hello,
    reply_bytes,
    run_client,
    stage,
    token_step,
)

VECTORS = sorted((Path(__file__).parents[1] / "vectors" / "syn1").glob("*.bin"))
# What a fuzzed connection may be closed with: normal, policy, too big, too many connections, token, rate, replaced,
# quarantined (an answer for work not given), a missed step (1011, from a step timeout the fuzzer causes on purpose).
EXPECTED_CLOSES = {1000, 1001, 1008, 1009, 1011, 1013, 4000, 4001, 4003, 4029}
NASTY = [2**64, 2**50 + 1, -1, 0, 1e308, "Infinity", None, [], {}, True, "x" * 300, "\ud800", "a\nb", [0, 2**40]]
SEEDS = [
    hello("seed"),
    {"kind": "progress", "shard_id": "fuzz-0-1", "done_bytes": 1, "total_bytes": 2},
    {"kind": "ready", "shard_id": "fuzz-0-1", "layers": [0, 1]},
    {"kind": "ready", "shard_id": "gpt2-0-6", "layers": [0, 6]},
    {"kind": "error", "message": "boom", "fatal": False},
    {"kind": "step_failed", "message": "no cache"},
    {"kind": "heartbeat", "requests_served": 1},
    {"kind": "bye"},
    {"kind": "teleport"},
]
SETTINGS = dict(
    hello_timeout_s=0.5, step_timeout_s=1.0, max_frame_bytes=64 * 1024, max_messages_per_s=200.0, max_message_burst=100
)


@dataclass
class FuzzReport:
    connections: int = 0
    messages: int = 0
    honest_steps: int = 0
    fuzz_steps: int = 0
    closes: collections.Counter[int | None] = field(default_factory=collections.Counter)
    crashes: list[str] = field(default_factory=list)


class ErrorLog(logging.Handler):
    """Every ERROR (or worse) any logger reports while fuzzing: each is a crash."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}"[:2000])


def control_text(rng: random.Random) -> str:
    message = dict(rng.choice(SEEDS))
    for _ in range(rng.randrange(3)):
        key = rng.choice([*message, "kind", "node_id", "layers", "extra"])
        message[key] = rng.choice(NASTY) if rng.random() < 0.8 else rng.choice(SEEDS)
    text = json.dumps(message)
    roll = rng.random()
    if roll < 0.1:
        text = text[: rng.randrange(len(text) + 1)]
    elif roll < 0.2:
        text = text.replace("1", "NaN", 1).replace("0", "1e999", 1)
    elif roll < 0.25:
        text = "[" * rng.randrange(1, 3000)
    return text


def binary(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        data = bytearray(rng.choice(VECTORS).read_bytes())
        for _ in range(rng.randrange(1, 4) if data else 0):  # empty.bin stays empty
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data[: rng.randrange(len(data) + 1)])
    if roll < 0.5:
        return reply_bytes([head(syn1.Frame.tokens(rng.randrange(2**32), 0, [rng.randrange(50257)]))])
    if roll < 0.6:
        return syn1.encode(syn1.Frame.tokens(1, 0, [1])) * rng.choice([2, 1025, 2000])
    if roll < 0.65:
        return bytes(SETTINGS["max_frame_bytes"] + rng.randrange(1, 100))  # over the frame limit: 1009
    if roll < 0.75:
        return struct.pack("<4sBBBBIIII", b"SYN1", 5, 0, 1, 0, 0, 0, rng.randrange(2**32), rng.randrange(2**32))
    return rng.randbytes(rng.randrange(200))


def message(rng: random.Random) -> str | bytes:
    return control_text(rng) if rng.random() < 0.6 else binary(rng)


async def _drain(websocket: ClientConnection, timeout_s: float) -> int | None:
    """Read until the gateway closes (its close code), or close ourselves after timeout_s (None)."""
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        async with asyncio.timeout(timeout_s):
            async for _ in websocket:
                pass
    if websocket.protocol.close_rcvd is None:
        await websocket.close()
        return None
    return websocket.close_code


async def one_connection(gateway: RunningGateway, rng: random.Random, index: int, report: FuzzReport) -> None:
    """A connection in one of several moods: lying node, garbage first, silent, flooding, a node with a step."""
    try:
        websocket = await connect(gateway.ws_url, compression=None, open_timeout=5, close_timeout=1, max_size=None)
    except (OSError, InvalidHandshake) as error:
        report.crashes.append(f"connection {index} could not connect: {error!r}")
        return
    node_id = f"fuzz-{index}"
    mood = rng.choice(["node", "node", "node", "garbage", "silent", "flood", "stepped"])
    report.connections += 1
    sent: list[str | bytes] = []
    with contextlib.suppress(ConnectionClosed):
        if mood in ("node", "flood", "stepped"):
            sent.append(json.dumps(hello(node_id)))
        if mood in ("node", "garbage"):
            sent += [message(rng) for _ in range(rng.randrange(1, 12))]
        if mood == "flood":
            sent += ['{"kind": "heartbeat"}'] * 300
        for item in sent:
            await websocket.send(item)
            report.messages += 1
        if mood == "stepped":
            await _stepped(gateway, websocket, node_id, rng, report)
    code = await _drain(websocket, timeout_s=3.0)
    report.closes[code] += 1
    if code is not None and code not in EXPECTED_CLOSES:
        report.crashes.append(f"{node_id} ({mood}) closed with {code}: {websocket.close_reason}")


async def _stepped(
    gateway: RunningGateway, websocket: ClientConnection, node_id: str, rng: random.Random, report: FuzzReport
) -> None:
    """A node that is assigned a shard and sent a step, and answers it with anything at all."""
    welcome = await asyncio.wait_for(websocket.recv(), 5)
    if "welcome" not in str(welcome):
        return
    config = common_pb2.ModelConfig(n_layer=2, n_head=1, n_embd=FAKE_HIDDEN, vocab_size=1000, n_positions=64)
    request = gateway_pb2.AssignShardRequest(
        node_id=node_id, shard_id="fuzz-0-1", activation_dtype=common_pb2.DTYPE_INT8, config=config
    )
    request.layers.start, request.layers.end = 0, 1
    with contextlib.suppress(Exception):  # the node may be gone already: UNAVAILABLE is an answer too
        await gateway.stub.AssignShard(request, timeout=5)
    await websocket.send(json.dumps({"kind": "ready", "shard_id": "fuzz-0-1", "layers": [0, 1]}))
    async with run_client(gateway) as client:
        step = asyncio.create_task(client.step(token_step([stage(node_id, 0, 1)], index_of(node_id), 0, [7]), 10))
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while True:
                received = await asyncio.wait_for(websocket.recv(), 3)
                if isinstance(received, bytes):
                    break
        answer = rng.choice([message(rng), reply_bytes([head(syn1.Frame.tokens(index_of(node_id), 0, [7]))]), None])
        if answer is not None:
            await websocket.send(answer)
            report.messages += 1
        try:
            await step  # an answer, a StepFailed, or the gateway's step timeout: never a hang
            report.fuzz_steps += 1
        except StepFailed:
            report.fuzz_steps += 1


def index_of(node_id: str) -> int:
    return int(node_id.rsplit("-", 1)[1])


async def honest_steps(gateway: RunningGateway, node_id: str, stop: asyncio.Event, report: FuzzReport) -> None:
    """Steps through the honest node, back to back, until told to stop: every one must succeed."""
    async with run_client(gateway) as client:
        while not stop.is_set():
            try:
                result = await client.step(token_step([stage(node_id, 0, 2)], 1, 0, [41]), 10)
                (frame,) = syn1.decode_frames(result.frames)
                assert frame.token_ids[0, 0] == 42
                report.honest_steps += 1
            except (StepFailed, AssertionError) as error:
                report.crashes.append(f"the honest node's step failed: {error!r}")
            await asyncio.sleep(0.01)


async def fuzz_gateway(
    gateway: RunningGateway, honest: str, seed: int, connections: int, concurrency: int, first_index: int = 0
) -> FuzzReport:
    """Run `connections` fuzzed connections, `concurrency` at a time, while `honest` serves steps."""
    report = FuzzReport()
    rng = random.Random(seed)
    stop = asyncio.Event()
    driver = asyncio.create_task(honest_steps(gateway, honest, stop, report))
    gate = asyncio.Semaphore(concurrency)

    async def bounded(index: int, seed: int) -> None:
        async with gate:
            try:
                await one_connection(gateway, random.Random(seed), index, report)
            except Exception as error:  # a fuzzer-side surprise: reported, never a hang
                report.crashes.append(f"connection {index} (seed {seed}): {error!r}")

    try:
        indexes = range(first_index, first_index + connections)
        await asyncio.gather(*(bounded(index, rng.randrange(2**32)) for index in indexes))
    finally:
        stop.set()
        await driver
    return report
