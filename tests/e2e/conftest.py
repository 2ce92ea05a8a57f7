"""End-to-end fixtures: a random GPT-2 checkpoint, its transformers reference, a real Redis, stacks of processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import Stack
from tests.checkpoints import greedy_reference as greedy_reference  # the e2e tests import it from here
from tests.checkpoints import load_reference, make_random_checkpoint
from tests.redis_server import redis_server

# GPT-2's real vocabulary (the tokenizer is real) on a small, fast body; six layers so three nodes fit.
SHAPE = dict(n_layer=6, n_head=4, n_embd=64, vocab_size=50257, n_positions=256)
EXACT_ENV = {"SYNAPSE_SHARDER_DTYPE": "float32", "SYNAPSE_ROUTER_ACTIVATION_DTYPE": "float32"}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=7, **SHAPE)


@pytest.fixture(scope="session")
def reference(checkpoint_dir: Path):
    return load_reference(checkpoint_dir)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def wait_for_pipeline(stack: Stack, stages: int, timeout_s: float = 90.0) -> router_pb2.TopologyResponse:
    """Until the router routes over one pipeline of `stages` ready nodes."""
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            topology = stub.Topology(router_pb2.TopologyRequest(), timeout=5)
            if any(len(p.stages) == stages for p in topology.pipelines):
                return topology
            time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in stack.processes)
    raise AssertionError(f"no {stages}-stage pipeline after {timeout_s} s; last topology:\n{topology}\n{logs}")


@pytest.fixture
def make_stack(checkpoint_dir: Path, tmp_path: Path) -> Iterator:
    stacks: list[Stack] = []

    def make(nodes: int, **options: object) -> Stack:
        env = {**EXACT_ENV, **options.pop("env", {})}
        stack = Stack(
            model=str(checkpoint_dir),
            workdir=tmp_path / f"stack{len(stacks)}",
            nodes=nodes,
            env=env,
            **options,
        )
        stacks.append(stack)
        stack.__enter__()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def log_events(stack: Stack, process: str, event: str) -> list[dict]:
    """The JSON log records of one process of the stack whose event is `event`, in order."""
    lines = (stack.workdir / "logs" / f"{process}.log").read_text().splitlines()
    return [record for line in lines if line.startswith("{") and (record := json.loads(line))["event"] == event]


def generate(address: str, **fields: object) -> list[router_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        return list(stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120))
