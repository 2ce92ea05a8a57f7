"""Faults of real processes mid-generation: a node's TCP connection reset by the kernel, a node frozen with
SIGSTOP (its heartbeat lost) and thawed, a gateway SIGKILLed beside another, and layers nobody can take over.

Every stream that can finish must equal transformers' greedy run; one that cannot ends UNAVAILABLE, naming
the layers it lacks, within the failover deadline (never a hang)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from services.common.pb import router_pb2, router_pb2_grpc
from services.launcher import Process, Stack
from tests.e2e.conftest import greedy_reference, log_events, wait_for_pipeline
from tests.polling import eventually_sync
from tests.redis_server import redis_server

PROMPT = [464, 2068, 7586, 21831]
MAX_TOKENS = 40
FAULT_AT_TOKEN = 5
# The gateway pings every 0.2 s and gives up on a node after 1 s without a pong (the defaults: 1 s, 3 s).
FAST_HEARTBEAT = {"SYNAPSE_GATEWAY_HEARTBEAT_S": "0.2", "SYNAPSE_GATEWAY_HEARTBEAT_TIMEOUT_S": "1"}


def stream(
    stack: Stack,
    fault: Callable[[], None] | None = None,
    request_id: str = "",
    max_tokens: int = MAX_TOKENS,
    received: list[router_pb2.GenerateResponse] | None = None,
) -> list[router_pb2.GenerateResponse]:
    """One greedy Generate stream, its responses also appended to `received` as they come; `fault` runs once,
    in the middle, right after token FAULT_AT_TOKEN."""
    received = [] if received is None else received
    with grpc.insecure_channel(stack.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(
            prompt_token_ids={"ids": PROMPT}, max_tokens=max_tokens, ignore_eos=True, request_id=request_id
        )
        for response in stub.Generate(request, timeout=120):
            received.append(response)
            if fault is not None and len(received) == FAULT_AT_TOKEN:
                fault()
    assert fault is None or len(received) > FAULT_AT_TOKEN, "the stream ended before the fault"
    return received


def tokens_of(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [response.token_id for response in responses if response.HasField("token_id")]


def ready_stack(make_stack, nodes: int = 2, **options: object) -> Stack:
    """A stack whose pipeline of `nodes` stages has served a first request (its scheduler is running)."""
    stack = make_stack(nodes, **options)
    wait_for_pipeline(stack, nodes)
    stream(stack, max_tokens=2)
    return stack


def reset_connections(process: Process, port: int) -> None:
    """Abort the TCP connections `process` holds to 127.0.0.1:`port` the way a NAT or firewall that forgets
    a flow does: the kernel destroys the socket (SOCK_DESTROY through `ss -K`), so the process's next read
    fails with ECONNABORTED and the peer gets a RST. Nothing in either program is told or hooked.
    Needs CAP_NET_ADMIN (CI runs as root) and a kernel with CONFIG_INET_DIAG_DESTROY."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dport", "=", f":{port}"], capture_output=True, text=True, check=True
    ).stdout
    ours = [line for line in listing.splitlines() if f"pid={process.popen.pid}," in line]
    local_ports = [re.search(r"127\.0\.0\.1:(\d+)\s", line).group(1) for line in ours]
    assert local_ports, f"{process.name} holds no connection to port {port}:\n{listing}"
    for local_port in local_ports:
        killed = subprocess.run(
            ["ss", "-K", "-Htn", "state", "established", "sport", "=", f":{local_port}", "dport", "=", f":{port}"],
            capture_output=True,
            text=True,
        )
        assert f":{local_port}" in killed.stdout, (
            f"`ss -K` destroyed nothing (needs root and CONFIG_INET_DIAG_DESTROY): {killed.stderr or killed.stdout}"
        )


def ws_port(stack: Stack, gateway: int = 0) -> int:
    return stack.gateway_ports[gateway][1]


def test_node_connection_reset_mid_generation_stream_finishes_identically(make_stack, reference) -> None:
    """node-1's WebSocket is reset under it by the kernel: the gateway fails its step at once, node-1 joins
    again on a new connection with its caches cleared, and the request replays."""
    stack = ready_stack(make_stack)
    node = stack.process("node-1")
    received = stream(stack, lambda: reset_connections(node, ws_port(stack)), request_id="reset-1")
    assert tokens_of(received) == greedy_reference(reference, PROMPT, MAX_TOKENS)
    assert received[-1].usage.failovers >= 1
    assert received[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    left = [r for r in log_events(stack, "gateway-0", "node_left") if r["node"] == "node-1"]
    assert left and "connection closed" in left[0]["why"], left
    # The node noticed too (its socket aborted), came back by itself, and serves as before.
    eventually_sync(lambda: len(log_events(stack, "node-1", "gateway_joined")) >= 2, timeout_s=30, what="rejoin")
    wait_for_pipeline(stack, 2)
    assert tokens_of(stream(stack)) == greedy_reference(reference, PROMPT, MAX_TOKENS)
    assert node.popen.poll() is None
    rejected = [r for r in log_events(stack, "gateway-0", "node_message_rejected") if r["node"] == "node-1"]
    assert not rejected, rejected


@contextlib.contextmanager
def frozen(process: Process) -> Iterator[Callable[[], None]]:
    """SIGSTOP the process when the yielded function is called; SIGCONT it on leaving, whatever happened."""
    stopped = threading.Event()

    def stop() -> None:
        os.kill(process.popen.pid, signal.SIGSTOP)
        stopped.set()

    try:
        yield stop
    finally:
        if stopped.is_set():
            os.kill(process.popen.pid, signal.SIGCONT)


def test_node_frozen_mid_generation_is_detected_by_heartbeat_and_may_rejoin(make_stack, reference) -> None:
    """node-1 is SIGSTOPped mid-stream: its socket stays open but it answers no ping. The gateway calls the
    heartbeat lost after SYNAPSE_GATEWAY_HEARTBEAT_TIMEOUT_S (set low here), the router re-plans every layer
    onto node-0 and the request replays. Thawed, node-1 finds its connection closed, joins again and takes
    layers back under traffic; what it had computed or queued for the old connection never reaches anyone."""
    stack = ready_stack(make_stack, env=FAST_HEARTBEAT)
    node = stack.process("node-1")
    expected = greedy_reference(reference, PROMPT, MAX_TOKENS)
    with frozen(node) as freeze:
        received = stream(stack, freeze, request_id="frozen-1")
        assert tokens_of(received) == expected
        assert received[-1].usage.failovers >= 1
        left = [r for r in log_events(stack, "gateway-0", "node_left") if r["node"] == "node-1"]
        assert left and left[0]["why"].startswith("heartbeat lost"), left
        topology = wait_for_pipeline(stack, 1)
        assert [stage.node_id for stage in topology.pipelines[0].stages] == ["node-0"]

        finished: list[list[int]] = []
        failovers: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                responses = stream(stack)
                finished.append(tokens_of(responses))
                failovers.append(responses[-1].usage.failovers)

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            eventually_sync(lambda: len(finished) >= 1, timeout_s=30)
            os.kill(node.popen.pid, signal.SIGCONT)  # thawed under traffic; `frozen` sends it again: harmless
            wait_for_pipeline(stack, 2)
        finally:
            stop.set()
            worker.join(timeout=120)
    assert not worker.is_alive() and len(finished) > 1
    assert all(tokens == expected for tokens in finished)
    assert sum(failovers) >= 1, "no request was in flight when node-1 took its layers back"
    assert len([r for r in log_events(stack, "gateway-0", "node_joined") if r["node"] == "node-1"]) == 2
    rejected = [r for r in log_events(stack, "gateway-0", "node_message_rejected") if r["node"] == "node-1"]
    assert not rejected, rejected
    assert tokens_of(stream(stack)) == expected


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own: no node record of an earlier stack in it."""
    folder = tmp_path / "redis"
    folder.mkdir()
    with redis_server(folder) as url:
        yield url


def test_gateway_killed_mid_generation_nodes_move_to_the_other_gateway(make_stack, reference, own_redis) -> None:
    """Two gateways share Redis; each node knows both URLs, its own first. The gateway the pipeline enters
    by is SIGKILLed mid-stream: its nodes join the other gateway, the router re-plans there and replays."""
    stack = ready_stack(make_stack, gateways=2, redis_url=own_redis)
    topology = wait_for_pipeline(stack, 2)
    entry = topology.pipelines[0].stages[0].gateway_id
    survivor = "gateway-1" if entry == "gateway-0" else "gateway-0"
    moved = [stage.node_id for stage in topology.pipelines[0].stages if stage.gateway_id == entry]

    def kill_entry_gateway() -> None:
        stack.stop_process(stack.process(entry), signal.SIGKILL)

    received = stream(stack, kill_entry_gateway, request_id="gateway-killed")
    assert tokens_of(received) == greedy_reference(reference, PROMPT, MAX_TOKENS)
    assert received[-1].usage.failovers >= 1
    assert received[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    topology = wait_for_pipeline(stack, 2)
    assert {stage.gateway_id for stage in topology.pipelines[0].stages} == {survivor}
    for node_id in moved:
        joined = log_events(stack, node_id, "gateway_joined")
        assert [record["gateway"] for record in joined][-1] == survivor, joined


def test_layers_nobody_can_take_end_the_stream_unavailable_naming_them(make_stack, reference) -> None:
    """node-0 has memory for at most four of the six layers; node-1, holding the rest, is SIGKILLed. No plan
    fits node-0 alone, nobody comes back: after SYNAPSE_ROUTER_FAILOVER_WAIT_S the stream ends UNAVAILABLE
    naming node-1's layers, half-open."""
    # float32 shards: wte 12.87 MB, wpe 66 KB, a layer 200 KB. 13.8 MB hold wte + wpe + 4 layers, not 6.
    stack = make_stack(0, env={"SYNAPSE_ROUTER_FAILOVER_WAIT_S": "3"})
    stack.add_node("node-0", MEMORY_BYTES=13_800_000)
    stack.add_node("node-1")
    topology = wait_for_pipeline(stack, 2)
    stages = {stage.node_id: (stage.layers.start, stage.layers.end) for stage in topology.pipelines[0].stages}
    start, end = stages["node-1"]
    received: list[router_pb2.GenerateResponse] = []

    def kill() -> None:
        stack.stop_process(stack.process("node-1"), signal.SIGKILL)

    with pytest.raises(grpc.RpcError) as caught:
        stream(stack, kill, request_id="no-replacement", received=received)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    details = caught.value.details()
    assert f"no ready node holds layers [{start}, {end})" in details, details
    assert "the last re-plan failed: not enough memory to place the model" in details, details
    tokens = tokens_of(received)
    assert len(tokens) >= FAULT_AT_TOKEN and tokens == greedy_reference(reference, PROMPT, MAX_TOKENS)[: len(tokens)]
    assert log_events(stack, "router", "replan_failed"), "the router never tried to plan without node-1"
