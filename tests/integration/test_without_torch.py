"""The control plane runs without torch: tokenizer, sampler, sharder, gateway and router start as processes in which
`import torch` fails (a sys.meta_path blocker in a sitecustomize on PYTHONPATH), and each serves real calls.

This is what the control-plane image relies on: it ships no torch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import services
from services.common.pb import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    sampler_pb2,
    sampler_pb2_grpc,
    sharder_pb2,
    sharder_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.launcher import Stack, free_port
from tests.unit.test_shard_bytes import make_checkpoint

BLOCKER = '''"""Test fixture: make `import torch` fail in this interpreter, as on a machine without it."""
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''
REPO = Path(services.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torchless_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("no-torch")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(folder), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_the_blocker_blocks_torch(torchless_env: dict[str, str]) -> None:
    result = run_python("import torch", torchless_env)
    assert result.returncode != 0 and "blocked by the test" in result.stderr


@pytest.fixture(scope="module")
def stack(torchless_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gpt2", "float32")
    workdir = tmp_path_factory.mktemp("stack")
    with Stack(model=str(checkpoint), workdir=workdir, nodes=0, env=torchless_env) as running:
        yield running


def test_every_control_plane_service_serves_without_torch(stack: Stack) -> None:
    ports = stack.ports
    with grpc.insecure_channel(f"127.0.0.1:{ports['tokenizer']}") as channel:
        encoded = tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
            tokenizer_pb2.EncodeRequest(text="Hello world"), timeout=10
        )
    assert list(encoded.token_ids) == [15496, 995]
    with grpc.insecure_channel(f"127.0.0.1:{ports['sampler']}") as channel:
        candidates = sampler_pb2.Candidates(values=[0.5, 3.0, 1.0], token_ids=[7, 8, 9])
        sampled = sampler_pb2_grpc.SamplerServiceStub(channel).Sample(
            sampler_pb2.SampleRequest(candidates=candidates), timeout=10
        )
    assert sampled.token_id == 8  # greedy by default
    with grpc.insecure_channel(stack.router_address) as channel:
        topology = router_pb2_grpc.RouterServiceStub(channel).Topology(router_pb2.TopologyRequest(), timeout=10)
    assert not topology.pipelines  # no node yet: the router runs and reports so
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway_ports[0][1]}/", timeout=10) as response:
        assert response.status == 200 and b"<html" in response.read().lower()
    for process in stack.processes:
        assert process.popen.poll() is None, f"{process.name} exited:\n{process.tail()}"


def test_the_container_health_check_without_torch(stack: Stack, torchless_env: dict[str, str]) -> None:
    def healthcheck(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "services.common.healthcheck", *args, "--timeout", "5"]
        return subprocess.run(command, env={**os.environ, **torchless_env}, capture_output=True, text=True)

    for process in stack.processes:
        result = healthcheck(process.grpc_address)
        assert result.returncode == 0 and "healthy" in result.stdout and "SERVING" in result.stdout, result
    ws_port = stack.gateway_ports[0][1]
    assert healthcheck("--http", f"http://127.0.0.1:{ws_port}/healthz").returncode == 0
    assert healthcheck("--http", f"http://127.0.0.1:{ws_port}/no-such-page").returncode == 1
    closed = healthcheck(f"127.0.0.1:{free_port()}")
    assert closed.returncode == 1 and closed.stdout.startswith("unhealthy") and "UNAVAILABLE" in closed.stdout


def test_the_sharder_plans_and_serves_shards_without_torch(stack: Stack) -> None:
    nodes = [common_pb2.NodeCapacity(node_id=f"n{index}", memory_bytes=1 << 30, speed=1.0) for index in range(2)]
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['sharder']}") as channel:
        plan = sharder_pb2_grpc.ShardServiceStub(channel).Plan(sharder_pb2.PlanRequest(nodes=nodes), timeout=30)
    assert [(a.layers.start, a.layers.end) for a in plan.assignments] == [(0, 2), (2, 3)]
    for assignment in plan.assignments:
        with urllib.request.urlopen(assignment.shard_url, timeout=10) as response:
            data = response.read()
        assert len(data) == assignment.size_bytes
        assert hashlib.sha256(data).hexdigest() == assignment.sha256


def test_the_random_weights_fallback_needs_no_torch(torchless_env: dict[str, str]) -> None:
    code = (
        "from services.sharder.catalog import load_model\n"
        "checkpoint = load_model('gpt2', random_fallback=True)\n"
        "print(checkpoint.model_id, sum(t.size for t in checkpoint.tensors.values()))\n"
    )
    result = run_python(code, torchless_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["gpt2-random-weights", "124439808"]  # GPT-2 124M without the tied head
