"""Faults of the shared parts, with real processes killed: Redis restarted under traffic (the gateways keep their
nodes serving, refuse joins meanwhile with a reason, rebuild the registry when it is back), and the sharder
restarted during a shard download (the node resumes it; without a sharder the request ends UNAVAILABLE)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from services.common.nodes import NodeRecord
from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import Stack
from services.wire import control
from services.wire.membership import NODES_KEY
from tests.e2e.conftest import generate, greedy_reference, log_events, wait_for_pipeline
from tests.polling import eventually_sync
from tests.redis_server import RedisProcess

PROMPT = [464, 2068, 7586, 21831]
MAX_TOKENS = 32


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def tokens_of(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [r.token_id for r in responses if r.HasField("token_id")]


class Traffic:
    """Greedy requests back to back on `streams` threads until stopped: every stream and when it finished."""

    def __init__(self, address: str, streams: int) -> None:
        self.address = address
        self.finished: list[tuple[float, list[int]]] = []  # (time.monotonic() at the end, tokens)
        self.errors: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(streams)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=200)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            request = router_pb2.GenerateRequest(
                prompt_token_ids={"ids": PROMPT}, max_tokens=MAX_TOKENS, ignore_eos=True
            )
            while not self._stop.is_set():
                try:
                    responses = list(stub.Generate(request, timeout=180))
                except grpc.RpcError as error:
                    self.errors.append(error)
                    return
                self.finished.append((time.monotonic(), tokens_of(responses)))

    def between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.finished if start <= at <= end)


def registered(url: str) -> dict[str, NodeRecord]:
    """Every node record in Redis now (none when Redis does not answer)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return {record.node_id: record for record in map(NodeRecord.from_json, client.hvals(NODES_KEY))}
    except redis.RedisError:
        return {}
    finally:
        client.close()


def refused_with_reason(stack: Stack, node: str) -> bool:
    """The node process logged a refused hello that says why."""
    return any("registry unavailable" in r["error"] for r in log_events(stack, node, "gateway_unreachable"))


def try_to_join(stack: Stack, node_id: str) -> tuple[dict, int | None, str]:
    """A hello by hand: the gateway's answer, and the close code and reason that followed it."""
    hello = control.Hello(
        kind="hello", node_id=node_id, node_kind="native", memory_bytes=1 << 30, speed=1.0, join_token=stack.join_token
    )
    with connect(stack.gateway_url(0), open_timeout=10) as websocket:
        websocket.send(control.dump(hello))
        answer = control.parse_gateway_message(websocket.recv(timeout=10)).model_dump()
        with contextlib.suppress(ConnectionClosed):
            websocket.recv(timeout=10)
        close = websocket.protocol.close_rcvd
        return answer, close.code if close else None, close.reason if close else ""


def test_redis_restarted_under_traffic_streams_stay_exact_and_the_registry_is_rebuilt(
    make_stack, reference, tmp_path: Path
) -> None:
    """SIGKILL redis-server while generations run on two gateways' nodes, start it again on the same port: the
    streams go on (identical to transformers), a join meanwhile is refused with 1013 and a reason, and once Redis
    is back the registry holds every live node again, a new node joins and new requests are exact."""
    server = RedisProcess(tmp_path)
    server.start()
    try:
        stack = make_stack(2, gateways=2, redis_url=server.url)
        wait_for_pipeline(stack, 2)
        expected = greedy_reference(reference, PROMPT, MAX_TOKENS)
        eventually_sync(lambda: set(registered(server.url)) == {"node-0", "node-1"}, 30, "both nodes in Redis")
        with Traffic(stack.router_address, streams=2) as traffic:
            eventually_sync(lambda: len(traffic.finished) >= 2, 60, "traffic running")
            server.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            answer, code, reason = try_to_join(stack, "node-while-away")
            late = stack.add_node("node-late", gateway=0)  # refused too until Redis is back, then joins
            eventually_sync(lambda: traffic.between(killed_at, time.monotonic()) >= 2, 60, "streams while away")
            eventually_sync(lambda: refused_with_reason(stack, "node-late"), 60, "the late node refused")
            server.start()
            restarted_at = time.monotonic()
            eventually_sync(
                lambda: set(registered(server.url)) == {"node-0", "node-1", "node-late"}, 60, "registry rebuilt"
            )
            wait_for_pipeline(stack, 3)
            eventually_sync(lambda: traffic.between(restarted_at, time.monotonic()) >= 2, 60, "streams after")
        assert not traffic.errors, traffic.errors
        assert all(tokens == expected for _, tokens in traffic.finished)
        assert traffic.between(killed_at, restarted_at) >= 2, "no stream finished while Redis was away"

        assert answer["kind"] == "error" and answer["fatal"]
        assert code == 1013 and reason.startswith("registry unavailable, try again later"), (code, reason)
        refused = [r for r in log_events(stack, "gateway-0", "node_message_rejected") if r["node"] == "node-while-away"]
        assert [r["reason"] for r in refused] == ["registry_unavailable"]
        gateway = stack.process("gateway-0").metrics_url
        assert metric(gateway, "synapse_gateway_rejected_messages_total", reason="registry_unavailable") >= 2
        assert late.popen.poll() is None

        records = registered(server.url)
        assert {node_id: record.state for node_id, record in records.items()} == dict.fromkeys(records, "ready")
        assert {r.gateway_id for r in records.values()} == {"gateway-0", "gateway-1"}
        for index in range(2):  # once at start-up, once when Redis came back without this gateway's key
            rebuilt = log_events(stack, f"gateway-{index}", "registry_rebuilt")
            assert [r["key_lost"] for r in rebuilt] == [True, True], rebuilt
        responses = generate(stack.router_address, prompt_token_ids={"ids": PROMPT}, max_tokens=8, ignore_eos=True)
        assert tokens_of(responses) == greedy_reference(reference, PROMPT, 8)
    finally:
        server.stop()


# --- the sharder restarted during a shard download ---------------------------------------------------------

SLOW_SHARDER = {"SYNAPSE_SHARDER_HTTP_MAX_BYTES_PER_S": "3000000"}  # ~4 s per 13 MB shard: a download to catch


def partial_downloads(stack: Stack) -> dict[Path, int]:
    """Every node's .part files now, with their sizes."""
    found = {}
    for path in (stack.workdir / "node-cache").glob("*/*/*.part"):
        with contextlib.suppress(FileNotFoundError):
            found[path] = path.stat().st_size
    return found


def kill_sharder_mid_download(stack: Stack) -> None:
    eventually_sync(lambda: any(size >= 1 << 20 for size in partial_downloads(stack).values()), 90, "a download")
    stack.stop_process(stack.process("sharder"), signal.SIGKILL)


def node_events(stack: Stack, event: str) -> list[dict]:
    return [record for index in range(2) for record in log_events(stack, f"node-{index}", event)]


def test_sharder_killed_mid_download_and_started_again_the_download_resumes(make_stack, reference) -> None:
    stack = make_stack(2, env=SLOW_SHARDER)
    kill_sharder_mid_download(stack)
    eventually_sync(lambda: node_events(stack, "shard_fetch_retry"), 30, "a node retrying its download")
    stack.start_again(stack.process("sharder"))
    wait_for_pipeline(stack, 2)
    responses = generate(stack.router_address, prompt_token_ids={"ids": PROMPT}, max_tokens=16, ignore_eos=True)
    assert tokens_of(responses) == greedy_reference(reference, PROMPT, 16)
    downloaded = node_events(stack, "shard_downloaded")
    assert len(downloaded) == 2 and any(record["resumed_from"] > 0 for record in downloaded), downloaded
    assert not node_events(stack, "shard_load_failed")
    assert not partial_downloads(stack)


def test_sharder_killed_mid_download_for_good_requests_end_unavailable_naming_the_layers(make_stack) -> None:
    env = {**SLOW_SHARDER, "SYNAPSE_NODE_SHARD_RETRY_S": "4", "SYNAPSE_ROUTER_PIPELINE_WAIT_S": "2"}
    stack = make_stack(2, env=env)
    kill_sharder_mid_download(stack)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack.router_address, prompt_token_ids={"ids": PROMPT}, max_tokens=4)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no ready node holds layers [" in caught.value.details(), caught.value.details()
    # Each node gives up after its retries, leaves to rejoin, and never loads what it has of the shard.
    eventually_sync(lambda: len(node_events(stack, "shard_load_failed")) >= 2, 60, "both loads given up")
    assert not list((stack.workdir / "node-cache").glob("*/*/*.safetensors"))
    assert not node_events(stack, "shard_loaded")
