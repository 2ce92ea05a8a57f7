"""Cancellation and deadlines free every node's KV cache; the README's commands work against a real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import Stack
from tests.e2e.conftest import wait_for_pipeline
from tests.polling import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [464, 2068, 7586, 21831]


def released(stack: Stack, node: str) -> list[dict]:
    events = []
    for line in stack.process(node).log_path.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == "requests_released":
                events.append(event)
    return events


def wait_until_released(stack: Stack, nodes: list[str], timeout_s: float = 20.0) -> None:
    def all_freed() -> bool:
        return all(released(stack, node) and released(stack, node)[-1]["cached"] == 0 for node in nodes)

    eventually_sync(all_freed, timeout_s, f"every cache freed on {nodes}")


def test_client_going_away_frees_every_nodes_cache(make_stack) -> None:
    stack = make_stack(2, node_env={"SYNAPSE_NODE_LOG_LEVEL": "DEBUG"})
    wait_for_pipeline(stack, 2)
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        call = stub.Generate(
            router_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, max_tokens=200, ignore_eos=True), timeout=60
        )
        for count, _response in enumerate(call, 1):
            if count == 3:
                call.cancel()
                break
    wait_until_released(stack, ["node-0", "node-1"])


def test_deadline_stops_the_request_and_frees_caches(make_stack) -> None:
    stack = make_stack(2, node_env={"SYNAPSE_NODE_LOG_LEVEL": "DEBUG"})
    wait_for_pipeline(stack, 2)
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(prompt_token_ids={"ids": PROMPT}, max_tokens=250, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as caught:
            for _response in stub.Generate(request, timeout=0.3):
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_released(stack, ["node-0", "node-1"])


def test_synapse_generate_streams_text_from_the_router(make_stack) -> None:
    stack = make_stack(2)
    wait_for_pipeline(stack, 2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "generate",
            "Hello there",
            "--router",
            stack.router_address,
            "--max-tokens",
            "8",
            "--stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello there") and len(result.stdout.strip()) > len("Hello there")
    assert "8 tokens" in result.stderr


def test_synapse_up_once_runs_the_whole_stack_and_generates(checkpoint_dir: Path, tmp_path: Path) -> None:
    """The README's run command (`make run` = `synapse up`), on a local checkpoint instead of the hub."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--once",
            "--model",
            str(checkpoint_dir),
            "--nodes",
            "2",
            "--workdir",
            str(tmp_path / "up"),
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    pipeline = next(line for line in result.stdout.splitlines() if ": pipeline " in line)
    assert "node-0[" in pipeline and "node-1[" in pipeline, pipeline
    assert "8 tokens in" in result.stdout
