"""The shared gRPC server builder: health, request ids in logs, error mapping, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from services.common.pb import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import GrpcServer, status_of
from services.launcher import free_port


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (DataLoss("x"), grpc.StatusCode.DATA_LOSS),
    ],
)
def test_domain_errors_map_to_their_status(error: Exception, code: grpc.StatusCode) -> None:
    assert status_of(error) == code


async def test_stop_turns_health_not_serving_before_closing() -> None:
    server = GrpcServer("test", ["synapse.v1.TokenizerService"], host="127.0.0.1", port=0, grace_s=0.5)
    await server.start()
    statuses = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses.append((await stub.Check(health_pb2.HealthCheckRequest())).status)
        await server._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)  # the first half of stop()
        statuses.append((await stub.Check(health_pb2.HealthCheckRequest(service="synapse.v1.TokenizerService"))).status)
    await server.stop()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


def test_sigterm_shuts_a_service_down_cleanly_with_request_ids_in_its_logs(tmp_path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SYNAPSE_TOKENIZER_PORT": str(port),
        "SYNAPSE_TOKENIZER_LOG_FORMAT": "json",
        "SYNAPSE_TOKENIZER_LOG_LEVEL": "DEBUG",
    }
    log_path = tmp_path / "tokenizer.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.tokenizer"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Decode(
                    tokenizer_pb2.DecodeRequest(token_ids=[10**6]), metadata=(("x-request-id", "req-42"),), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    assert "shutdown_requested" in names and "grpc_stopped" in names
    assert names.index("shutdown_requested") < names.index("grpc_stopped")
    assert all(event["service"] == "tokenizer" for event in events)
    errors = [event for event in events if event["event"] == "rpc_error"]
    assert errors and errors[0]["request_id"] == "req-42" and errors[0]["code"] == "INVALID_ARGUMENT"
