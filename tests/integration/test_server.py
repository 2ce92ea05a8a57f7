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


async def _tokenizer_on(server: GrpcServer) -> None:
    """A tokenizer servicer that encodes nothing: enough to see what the interceptor lets through."""

    class Echo(tokenizer_pb2_grpc.TokenizerServiceServicer):
        async def Encode(self, request, context):
            return tokenizer_pb2.EncodeResponse(token_ids=[len(request.text)])

        async def Decode(self, request, context):
            raise InvalidArgument("token_ids is empty; the limit is 1 to 8192 ids")

    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(Echo(), server.server)
    await server.start()


async def test_api_tokens_are_required_on_every_method_but_health() -> None:
    server = GrpcServer(
        "test", ["synapse.v1.TokenizerService"], host="127.0.0.1", port=0, grace_s=0.5, api_tokens=["tok-1", "tok-2"]
    )
    await _tokenizer_on(server)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            request = tokenizer_pb2.EncodeRequest(text="abc")
            for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "tok-1"),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Encode(request, metadata=metadata, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert "token" in caught.value.details()
            for token in ("tok-1", "tok-2"):  # both during a rotation
                response = await stub.Encode(request, metadata=(("authorization", f"Bearer {token}"),), timeout=5)
                assert list(response.token_ids) == [3]
    finally:
        await server.stop()


async def test_tls_serves_clients_that_trust_the_certificate(tmp_path) -> None:
    from services.cli import main as synapse

    assert synapse(["certs", "--out", str(tmp_path)]) == 0
    cert, key = tmp_path / "gateway-cert.pem", tmp_path / "gateway-key.pem"
    server = GrpcServer("test", ["synapse.v1.TokenizerService"], host="127.0.0.1", port=0, grace_s=0.5, tls=(cert, key))
    await _tokenizer_on(server)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{server.port}", credentials) as channel:
            response = await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
                tokenizer_pb2.EncodeRequest(text="hello"), timeout=5
            )
            assert list(response.token_ids) == [5]
        async with grpc.aio.insecure_channel(f"localhost:{server.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tokenizer_pb2_grpc.TokenizerServiceStub(plain).Encode(tokenizer_pb2.EncodeRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_an_upstream_status_reaches_the_caller_as_it_was() -> None:
    from services.common.errors import UpstreamError
    from services.common.server import upstream

    server = GrpcServer("test", ["synapse.v1.TokenizerService"], host="127.0.0.1", port=0, grace_s=0.5)
    await _tokenizer_on(server)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(UpstreamError) as caught, upstream("tokenizer"):
                await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Decode(tokenizer_pb2.DecodeRequest(), timeout=5)
        assert caught.value.status == "INVALID_ARGUMENT"
        assert str(caught.value) == "tokenizer: token_ids is empty; the limit is 1 to 8192 ids"
        assert status_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop()
