"""The nodes' WebSocket endpoint (/ws): hello, control messages, step replies; and the web node page at /."""

from __future__ import annotations

import asyncio
import http
import logging
import mimetypes
import ssl
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.common.errors import InvalidArgument
from services.gateway import metrics
from services.gateway.hub import Hub, record_for
from services.gateway.nodes import NodeConnection
from services.gateway.settings import GatewaySettings
from services.wire import control, syn1

log = logging.getLogger(__name__)

WS_PATH = "/ws"
HEALTH_PATH = "/healthz"  # the load balancer's health check: 200 while this endpoint serves
HELLO_TIMEOUT_S = 10.0
CLOSE_POLICY = 1008  # malformed or unexpected message: this connection only
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wgsl": "text/plain",
    ".json": "application/json",
}


def static_response(root: Path, request: Request) -> Response | None:
    """Serve the web node's files for plain GETs; None lets WebSocket upgrades through."""
    path = request.path.split("?", 1)[0]
    if path == WS_PATH and "upgrade" in request.headers.get("Connection", "").lower():
        return None
    if path == HEALTH_PATH:
        return _response(http.HTTPStatus.OK, b"ok\n", "text/plain")
    relative = "index.html" if path in ("", "/") else path.lstrip("/")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or not target.is_file():
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
    content_type = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return _response(http.HTTPStatus.OK, target.read_bytes(), content_type)


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-cache"})
    return Response(status.value, status.phrase, headers, body)


class NodeEndpoint:
    def __init__(self, hub: Hub, settings: GatewaySettings) -> None:
        self.hub = hub
        self.settings = settings
        self.server: Server | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.settings
        tls = None
        if settings.tls_cert and settings.tls_key:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(settings.tls_cert, settings.tls_key)
        root = settings.webnode_root
        self.server = await serve(
            self.handle,
            settings.ws_host,
            settings.ws_port,
            ssl=tls,
            max_size=settings.max_frame_bytes,
            ping_interval=settings.heartbeat_s,
            ping_timeout=settings.heartbeat_timeout_s,
            # A peer that misses a ping rarely completes a closing handshake: don't wait 10 s for it.
            close_timeout=settings.heartbeat_timeout_s,
            process_request=lambda _connection, request: static_response(root, request),
            compression=None,  # activations barely compress; deflate would cost more than it saves
        )
        self.port = next(iter(self.server.sockets)).getsockname()[1]
        scheme = "wss" if tls else "ws"
        log.info("ws_serving", extra={"url": f"{scheme}://{settings.ws_host}:{self.port}{WS_PATH}"})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handle(self, websocket: ServerConnection) -> None:
        try:
            hello = await self._hello(websocket)
        except (InvalidArgument, TimeoutError, ConnectionClosed) as error:
            await _refuse(websocket, str(error))
            return
        refusal = await self.hub.refusal(hello.node_id)
        if refusal is not None:
            log.warning("node_refused", extra={"node": hello.node_id, "why": refusal})
            await _refuse(websocket, f"node {hello.node_id} is {refusal}")
            return
        record = record_for(hello, self.hub.gateway_id, self.hub.address)
        connection = NodeConnection(websocket, record, self.settings.max_frame_bytes)
        await self.hub.joined(connection)
        why = "connection closed"
        try:
            await websocket.send(
                control.dump(control.Welcome(gateway_id=self.hub.gateway_id, heartbeat_s=self.settings.heartbeat_s))
            )
            why = await self._serve(connection)
        except ConnectionClosed as error:
            why = f"connection closed ({error.rcvd.code if error.rcvd else 'no close frame'})"
        except (InvalidArgument, syn1.FrameError) as error:
            metrics.FRAMES_REJECTED.labels("frame" if isinstance(error, syn1.FrameError) else "control").inc()
            why = f"malformed message: {error}"
            log.warning("node_message_rejected", extra={"node": connection.node_id, "error": str(error)})
            await _refuse(websocket, why)
        finally:
            await self.hub.left(connection, why)

    async def _hello(self, websocket: ServerConnection) -> control.Hello:
        try:
            first = await asyncio.wait_for(websocket.recv(), HELLO_TIMEOUT_S)
        except TimeoutError:
            raise InvalidArgument(f"no hello within {HELLO_TIMEOUT_S:g} s of connecting") from None
        if isinstance(first, bytes):
            raise InvalidArgument("the first message must be a JSON hello, got binary")
        message = control.parse_node_message(first)
        if not isinstance(message, control.Hello):
            raise InvalidArgument(f"the first message must be hello, got {message.kind}")
        if message.protocol != control.PROTOCOL_VERSION:
            raise InvalidArgument(
                f"protocol {message.protocol} not supported; this gateway speaks {control.PROTOCOL_VERSION}"
            )
        return message

    async def _serve(self, connection: NodeConnection) -> str:
        async for data in connection.websocket:
            if isinstance(data, bytes):
                connection.on_binary(data)
                continue
            message = control.parse_node_message(data)
            if isinstance(message, control.Ready):
                await self.hub.update(
                    connection, state="ready", layers=tuple(message.layers), shard_id=message.shard_id
                )
                log.info("node_ready", extra={"node": connection.node_id, "layers": list(message.layers)})
            elif isinstance(message, control.StepFailed):
                connection.on_step_failed(message.message)
            elif isinstance(message, control.Progress):
                log.debug("node_progress", extra={"node": connection.node_id, "done": message.done_bytes})
            elif isinstance(message, control.Error):
                log.warning("node_error", extra={"node": connection.node_id, "error": message.message})
                if message.fatal:
                    return f"node reported a fatal error: {message.message}"
            elif isinstance(message, control.Bye):
                return f"node left: {message.reason or 'bye'}"
            elif isinstance(message, control.Hello):
                raise InvalidArgument("hello sent twice")
        return "connection closed"


async def _refuse(websocket: ServerConnection, why: str) -> None:
    try:
        await websocket.send(control.dump(control.GatewayError(message=why[:4000], fatal=True)))
        await websocket.close(CLOSE_POLICY, why[:120])
    except ConnectionClosed:
        pass
