"""The compose stack of the deployment test: images built offline, `up` with 3 gateways and 2 native nodes on a
random GPT-2 checkpoint, published on loopback ports of its own; `down -v` at the end.

The stack is one per module (it takes minutes to build and start). Where no Docker engine answers, the module
is skipped and says why; everything else that is missing is a failure (`bash ops/setup.sh` installs it).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.common.join_tokens import issue, new_secret
from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import free_port
from tests.checkpoints import load_reference, make_random_checkpoint
from tests.deploy.docker import REPO, Compose, engine_missing, left_behind, run
from tests.deploy.images import build_images
from tests.e2e.conftest import SHAPE

GATEWAYS = 3
JOIN_SECRET = new_secret()
JOIN_TOKEN = issue(JOIN_SECRET, expires_at=int(time.time()) + 86400)  # any node id, for a day
NODES = 2
SERVICES = ["redis", "tokenizer", "sampler", "sharder", "gateway", "router", "certs", "loadbalancer", "prometheus"]


@dataclass
class Deployment:
    compose: Compose
    router_address: str  # the published Generate port
    https_port: int  # the load balancer: web node page and wss
    prometheus_url: str
    reference: object  # transformers' GPT2LMHeadModel of the checkpoint
    timings: dict[str, float] = field(default_factory=dict)

    def topology(self) -> router_pb2.TopologyResponse:
        with grpc.insecure_channel(self.router_address) as channel:
            return router_pb2_grpc.RouterServiceStub(channel).Topology(router_pb2.TopologyRequest(), timeout=10)

    def wait_for_pipeline(
        self, accept: Callable[[router_pb2.Pipeline], bool], timeout_s: float = 240.0
    ) -> router_pb2.Pipeline:
        """Until the router has a pipeline `accept` likes; fails with the last topology and the logs."""
        deadline, topology = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                topology = self.topology()
            except grpc.RpcError:
                topology = None  # the router is still starting
            for pipeline in topology.pipelines if topology else ():
                if accept(pipeline):
                    return pipeline
            time.sleep(0.5)
        raise AssertionError(f"no such pipeline after {timeout_s:.0f} s: {topology}\n{self.compose.logs()}")

    def query(self, expr: str, since_s: float = 600.0) -> list[dict]:
        """Prometheus range query over the last `since_s` seconds, 5 s steps: the series it returns."""
        now = time.time()
        query = urllib.parse.urlencode({"query": expr, "start": now - since_s, "end": now, "step": 5})
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/query_range?{query}", timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def query_now(self, expr: str) -> list[dict]:
        query = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/query?{query}", timeout=10) as response:
            return json.load(response)["data"]["result"]


def has_finite_value(series: dict) -> bool:
    return any(math.isfinite(float(value)) for _, value in series["values"])


def readable_checkpoint() -> tuple[Path, Path]:
    """(folder to delete afterwards, checkpoint): a random GPT-2 that the sharder (uid 10001) can read through a
    bind mount, so outside pytest's private temporary folders."""
    root = Path(tempfile.mkdtemp(prefix="synapse-deploy-"))
    root.chmod(0o755)
    checkpoint = make_random_checkpoint(root / "tiny-gpt2", seed=7, **SHAPE)
    for path in [checkpoint, *checkpoint.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root, checkpoint


def compose_env(images_env: dict[str, str], ports: dict[str, int], checkpoint: Path) -> dict[str, str]:
    """The compose file's variables for the test: local images, loopback ports of its own, float32 end to end."""
    return {
        **images_env,
        "SYNAPSE_PUBLISH_ADDRESS": "127.0.0.1",
        "SYNAPSE_GENERATE_PORT": str(ports["generate"]),
        "SYNAPSE_HTTPS_PORT": str(ports["https"]),
        "SYNAPSE_PROMETHEUS_PORT": str(ports["prometheus"]),
        "SYNAPSE_SHARD_DTYPE": "float32",  # exact greedy tokens, as tests/e2e runs
        "SYNAPSE_ACTIVATION_DTYPE": "float32",
        "SYNAPSE_TEST_MODEL_DIR": str(checkpoint),
        # A closed stack, as in production: nodes need a join token.
        "SYNAPSE_JOIN_SECRETS": JOIN_SECRET,
        "SYNAPSE_JOIN_TOKEN": JOIN_TOKEN,
    }


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    reason = engine_missing()
    if reason:
        print(f"skipping the compose tests: {reason}")
        pytest.skip(reason)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    images = build_images(timings)
    model_root, checkpoint = readable_checkpoint()
    ports = {name: free_port() for name in ("generate", "https", "prometheus")}
    files = [REPO / "docker-compose.yml", REPO / "tests" / "deploy" / "compose.test.yml"]
    env = compose_env(images.compose_env(), ports, checkpoint)
    compose = Compose(f"synapse-test-{uuid.uuid4().hex[:8]}", env, files)
    deployment = Deployment(
        compose,
        router_address=f"127.0.0.1:{ports['generate']}",
        https_port=ports["https"],
        prometheus_url=f"http://127.0.0.1:{ports['prometheus']}",
        reference=load_reference(checkpoint),
        timings=timings,
    )
    failed_before = request.session.testsfailed
    try:
        up_started = time.perf_counter()
        scale = ["--scale", f"gateway={GATEWAYS}", "--scale", f"node={NODES}"]
        compose("--profile", "nodes", "up", "--detach", "--no-build", *scale, *SERVICES, "node", timeout_s=900)
        deployment.wait_for_pipeline(lambda pipeline: len(pipeline.stages) == NODES)
        timings["up until a 2-node pipeline"] = time.perf_counter() - up_started
        yield deployment
    finally:
        if request.session.testsfailed > failed_before:
            print(f"--- compose logs (last lines of each service)\n{compose.logs()}")
        compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout_s=300, check=False)
        shutil.rmtree(model_root, ignore_errors=True)
        timings["whole module"] = time.perf_counter() - started
        print("\ncompose test timings (s): " + ", ".join(f"{what} {seconds:.1f}" for what, seconds in timings.items()))
        assert not left_behind(compose.project), left_behind(compose.project)


def stop_container(container: str, grace_s: int = 1) -> None:
    """`docker stop` with a short grace: SIGTERM, then SIGKILL after grace_s (restart: unless-stopped keeps it down)."""
    run(["docker", "stop", "--time", str(grace_s), container], timeout_s=120)
