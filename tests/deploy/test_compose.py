"""docker-compose.yml on the real Docker engine: images built offline, 3 gateways behind the load balancer, 2 native
nodes; Generate from the host equals transformers; a gateway stopped mid-stream; a browser node over wss; every
gateway scraped by Prometheus and every dashboard query answered; `down -v` leaves nothing.

The tests share one stack and run in file order (each builds on what the one before left): the slow docker parts
of the suite all live here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from services.common.pb import router_pb2, router_pb2_grpc
from services.wire import control
from tests.deploy.conftest import GATEWAYS, JOIN_TOKEN, NODES, Deployment, has_finite_value, stop_container
from tests.deploy.docker import REPO, left_behind, run
from tests.e2e.conftest import greedy_reference
from tests.webnode.conftest import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.timeout(3600)

PROMPTS = [[15496, 11, 995], [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13], [50256]]
MAX_TOKENS = 12
LONG_TOKENS = 240  # a few seconds of decoding: long enough to stop a gateway in the middle
DASHBOARD = REPO / "ops" / "grafana" / "dashboards" / "synapse.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "10m"}


def stream(address: str, prompt: list[int], max_tokens: int, on_token=None) -> list[int]:
    """Greedy token ids of one Generate stream through the published port."""
    tokens = []
    with grpc.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(prompt_token_ids={"ids": prompt}, max_tokens=max_tokens, ignore_eos=True)
        for response in router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=300):
            if response.HasField("token_id"):
                tokens.append(response.token_id)
                if on_token:
                    on_token(len(tokens))
    return tokens


def test_prometheus_scrapes_every_gateway_instance(deployment: Deployment) -> None:
    # Targets come from DNS, refreshed every 5 s, and a target counts once it has been scraped: wait for the whole
    # set, each service once (each gateway and node on its own address), rather than the gateways alone.
    expected = {
        "router": 1,
        "tokenizer": 1,
        "sampler": 1,
        "sharder": 1,
        "loadbalancer": 1,
        "gateway": GATEWAYS,
        "node": NODES,
    }
    deadline = time.monotonic() + 120
    while True:
        up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in deployment.query_now("up")}
        scraped = {job: [value for (name, _), value in up.items() if name == job] for job in expected}
        if all(values == ["1"] * expected[job] for job, values in scraped.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for job, count in expected.items():
        assert scraped[job] == ["1"] * count, (job, up)


def test_generate_from_the_host_equals_transformers(deployment: Deployment) -> None:
    for prompt in PROMPTS:
        assert stream(deployment.router_address, prompt, MAX_TOKENS) == greedy_reference(
            deployment.reference, prompt, MAX_TOKENS
        ), prompt
    with grpc.insecure_channel(deployment.router_address) as channel, pytest.raises(grpc.RpcError) as error:
        request = router_pb2.GenerateRequest(prompt_token_ids={"ids": [1]}, max_tokens=10**6)
        list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # a bad request gets its status, end to end


def test_a_gateway_stopped_mid_stream_loses_nothing(deployment: Deployment) -> None:
    pipeline = deployment.wait_for_pipeline(lambda p: len(p.stages) == NODES)
    gateway_id = pipeline.stages[0].gateway_id  # host-pid-port, and the host name is the container id
    container = next(c for c in deployment.compose.container_ids("gateway") if c.startswith(gateway_id.split("-")[0]))
    prompt, result, streaming = PROMPTS[1], {}, threading.Event()

    def consume() -> None:
        result["tokens"] = stream(deployment.router_address, prompt, LONG_TOKENS, lambda n: n >= 5 and streaming.set())
        result["finished_at"] = time.monotonic()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert streaming.wait(120), "the stream never started"
    stop_container(container)
    stopped_at = time.monotonic()
    consumer.join(300)
    assert result["tokens"] == greedy_reference(deployment.reference, prompt, LONG_TOKENS)
    assert result["finished_at"] > stopped_at, "the stream ended before the gateway was down: nothing was tested"
    # The nodes reconnected through the load balancer, to gateways that still run; new requests work.
    moved = deployment.wait_for_pipeline(
        lambda p: len(p.stages) == NODES and all(s.gateway_id != gateway_id for s in p.stages)
    )
    assert {s.node_id for s in moved.stages} == {s.node_id for s in pipeline.stages}
    assert stream(deployment.router_address, PROMPTS[0], MAX_TOKENS) == greedy_reference(
        deployment.reference, PROMPTS[0], MAX_TOKENS
    )


def spki_hash(certificate_pem: bytes) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 sha256 of the public key's DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def stack_certificate(deployment: Deployment, folder: Path) -> Path:
    """The certificate the stack made (`synapse certs`, in the certs volume), copied out of the certs container."""
    (certs,) = deployment.compose.container_ids("certs", all_states=True)
    run(["docker", "cp", f"{certs}:/certs/gateway-cert.pem", str(folder / "cert.pem")])
    return folder / "cert.pem"


def hello_through_the_load_balancer(deployment: Deployment, certificate: Path, token: str) -> list[str]:
    """A native node's hello over wss through the load balancer: the kinds of the gateway's answers until its
    welcome, or until it closes the connection ("closed <code>")."""
    tls = ssl.create_default_context(cafile=str(certificate))
    hello = control.Hello(
        kind="hello", node_id="probe", node_kind="native", memory_bytes=1 << 30, speed=1.0, join_token=token
    )
    url = f"wss://127.0.0.1:{deployment.https_port}/ws"  # 127.0.0.1 is in the certificate's names
    answers: list[str] = []
    with connect(url, ssl=tls, open_timeout=10, proxy=None) as websocket:
        websocket.send(control.dump(hello))
        try:
            while "welcome" not in answers:
                answers.append(json.loads(websocket.recv(timeout=10))["kind"])
        except ConnectionClosed as closed:
            answers.append(f"closed {closed.rcvd.code if closed.rcvd else None}")
    return answers


def test_the_stack_admits_only_nodes_with_a_join_token(deployment: Deployment, tmp_path: Path) -> None:
    certificate = stack_certificate(deployment, tmp_path)
    assert hello_through_the_load_balancer(deployment, certificate, "") == ["error", "closed 4001"]
    assert hello_through_the_load_balancer(deployment, certificate, JOIN_TOKEN) == ["welcome"]


def test_a_browser_node_joins_over_wss_and_serves_a_stage(deployment: Deployment, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    trust = f"--ignore-certificate-errors-spki-list={spki_hash(stack_certificate(deployment, tmp_path).read_bytes())}"
    # One native node leaves, so the plan needs the browser.
    stop_container(deployment.compose.container_ids("node")[0])
    query = urllib.parse.urlencode({"node_id": "web-0", "speed": 3.0, "join_token": JOIN_TOKEN})
    url = f"https://synapse.localhost:{deployment.https_port}/?{query}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, trust], headless=True)
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(url)
            pipeline = deployment.wait_for_pipeline(lambda p: "web-0" in {s.node_id for s in p.stages})
            for prompt in PROMPTS[:2]:
                assert stream(deployment.router_address, prompt, MAX_TOKENS) == greedy_reference(
                    deployment.reference, prompt, MAX_TOKENS
                ), prompt
            state = page.evaluate("JSON.parse(JSON.stringify(window.synapse))")
        finally:
            browser.close()
    assert state["gateway"] == f"wss://synapse.localhost:{deployment.https_port}/ws", (state, console[-20:])
    assert state["state"] == "ready" and state["stepsServed"] > 0, (state, console[-20:])
    web_stage = next(s for s in pipeline.stages if s.node_id == "web-0")
    assert 0 < web_stage.layers.end - web_stage.layers.start < deployment.reference.config.n_layer


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$__\w+", lambda match: GRAFANA_VARIABLES[match.group(0)], target["expr"])
            queries.append((f"{panel['title']} / {target['legendFormat']}", expr))
    return queries


def test_every_dashboard_query_returns_series(deployment: Deployment) -> None:
    stream(deployment.router_address, PROMPTS[0], MAX_TOKENS)  # fresh traffic inside every rate window
    queries = dashboard_queries()
    assert len(queries) >= 20
    missing = queries
    deadline = time.monotonic() + 90  # scrapes every 5 s: the last generation reaches Prometheus soon
    while missing and time.monotonic() < deadline:
        missing = [(title, expr) for title, expr in missing if not any(map(has_finite_value, deployment.query(expr)))]
        if missing:
            time.sleep(2)
    assert not missing, "dashboard queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in missing)


def test_down_removes_every_container_network_and_volume(deployment: Deployment) -> None:
    assert left_behind(deployment.compose.project)  # the stack is still there
    deployment.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout_s=300)
    assert left_behind(deployment.compose.project) == {}
