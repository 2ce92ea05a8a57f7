"""One gRPC server builder for every service: health, reflection, error/metrics/request-id interceptor, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import SynapseError, Unauthenticated, UpstreamError
from services.common.logs import request_id_var
from services.common.metrics import GRPC_DURATION, GRPC_HANDLED

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"
# Large enough for full-logit tensors of big vocabularies; decode frames are tiny.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that waits on a long step
]
# Servers accept those pings: by default a server allows one per 5 minutes without data and answers more with
# GOAWAY too_many_pings, which broke a Run stream whose step took over a minute (a browser node's prefill).
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def status_of(error: SynapseError) -> grpc.StatusCode:
    """The one place a domain error becomes a gRPC status."""
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return uuid.uuid4().hex[:16]


def _check_bearer(context: grpc.aio.ServicerContext, tokens: tuple[bytes, ...]) -> None:
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <one of tokens>` (constant-time compare)."""
    value = next((str(v) for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_KEY), "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("this API needs `authorization: Bearer <token>` metadata (an API token)")
    offered = token.strip().encode()
    if not any(hmac.compare_digest(offered, known) for known in tokens):
        raise Unauthenticated("the bearer token is not valid here; ask the operator for a current API token")


class _Call:
    """Bookkeeping around one call: request id, timing, status, error mapping."""

    def __init__(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method, self.context = service, method, context
        self.started = time.perf_counter()
        # Each call runs in its own task (its own context copy), so the id needs no reset afterwards.
        request_id_var.set(_request_id(context))

    async def fail(self, error: BaseException) -> None:
        if isinstance(error, SynapseError):
            code = status_of(error)
            log.info("rpc_error", extra={"method": self.method, "code": code.name, "error": str(error)[:300]})
            self.finish(code)
            await self.context.abort(code, str(error))
        if isinstance(error, asyncio.CancelledError):
            self.finish(grpc.StatusCode.CANCELLED)
            raise error
        code = self.context.code() if isinstance(error, grpc.aio.AbortError) else None
        if code is not None:
            self.finish(code)
            raise error
        self.finish(grpc.StatusCode.INTERNAL)
        log.exception("rpc_failed", extra={"method": self.method})
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}: {error!r}")

    def finish(self, code: grpc.StatusCode | None = None) -> None:
        code = code or self.context.code() or grpc.StatusCode.OK
        GRPC_HANDLED.labels(self.service, self.method, code.name).inc()
        GRPC_DURATION.labels(self.service, self.method).observe(time.perf_counter() - self.started)


def _wrap_unary(
    service: str, method: str, behaviour: Callable[..., Awaitable[Any]], tokens: tuple[bytes, ...]
) -> Callable:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(service, method, context)
        try:
            if tokens:
                _check_bearer(context, tokens)
            response = await behaviour(request, context)
        except BaseException as error:
            await call.fail(error)
            raise
        call.finish()
        return response

    return wrapper


def _wrap_stream(
    service: str, method: str, behaviour: Callable[..., AsyncIterator[Any]], tokens: tuple[bytes, ...]
) -> Callable:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(service, method, context)
        try:
            if tokens:
                _check_bearer(context, tokens)
            async for response in behaviour(request, context):
                yield response
        except BaseException as error:
            await call.fail(error)
            raise
        call.finish()

    return wrapper


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses, counts and times calls, binds the request id to the logs; with API
    tokens, refuses calls without one (health and reflection stay open, for probes and grpcurl)."""

    def __init__(self, service: str, api_tokens: Iterable[str] = ()) -> None:
        self.service = service
        self.tokens = tuple(token.encode() for token in api_tokens if token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kind_wrappers = {
            "unary_unary": (_wrap_unary, grpc.unary_unary_rpc_method_handler),
            "stream_unary": (_wrap_unary, grpc.stream_unary_rpc_method_handler),
            "unary_stream": (_wrap_stream, grpc.unary_stream_rpc_method_handler),
            "stream_stream": (_wrap_stream, grpc.stream_stream_rpc_method_handler),
        }
        for kind, (wrap, make) in kind_wrappers.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    wrap(self.service, method, behaviour, self.tokens),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


class GrpcServer:
    """A grpc.aio server with health + reflection, started on host:port (0 = any free port).

    With `tls` (certificate, key) it serves TLS; with `api_tokens`, every call but health and reflection
    needs one as a bearer token.
    """

    def __init__(
        self,
        service: str,
        service_names: Iterable[str],
        *,
        host: str,
        port: int,
        grace_s: float,
        tls: tuple[Path, Path] | None = None,
        api_tokens: Iterable[str] = (),
    ) -> None:
        self.service = service
        self.grace_s = grace_s
        interceptor = ServiceInterceptor(service, api_tokens)
        self.server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.names = list(service_names)
        reflection.enable_server_reflection([*self.names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1].read_bytes(), tls[0].read_bytes())])
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        self.address = f"{host}:{self.port}"
        self._stopped = asyncio.Event()
        self._started = False

    async def _set_status(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ["", *self.names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.server.start()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("grpc_serving", extra={"address": self.address, "services": ",".join(self.names)})

    async def stop(self) -> None:
        """Health goes NOT_SERVING first so balancers drain, then in-flight calls get the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_s)
        log.info("grpc_stopped", extra={"address": self.address})

    async def wait(self) -> None:
        await self._stopped.wait()


async def run_until_signal(server: GrpcServer, *cleanups: Callable[[], Awaitable[None]]) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully and run the cleanups in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("shutdown_requested")
    await server.stop()
    for cleanup in cleanups:
        await cleanup()


def channel(target: str) -> grpc.aio.Channel:
    """One long-lived insecure channel per upstream (loopback or a private network)."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


@contextlib.contextmanager
def upstream(service: str) -> Iterator[None]:
    """Calls to another service inside this block fail as UpstreamError with that service's own status and
    message, so our caller sees them as they were (INVALID_ARGUMENT stays INVALID_ARGUMENT), not INTERNAL."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise UpstreamError(service, error.code().name, error.details() or error.code().name) from None


def request_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id upstream."""
    request_id = request_id_var.get()
    return ((REQUEST_ID_KEY, request_id),) if request_id else ()
