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
from services.common.join_tokens import JoinTokenRefused, JoinTokens
from services.common.nodes import NodeRecord
from services.gateway import metrics
from services.gateway.admission import (
    CLOSE_POLICY,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    AddressSlots,
    Refusal,
    TokenBucket,
)
from services.gateway.hub import Hub, record_for
from services.gateway.nodes import NodeConnection
from services.gateway.registry import RegistryUnavailable
from services.gateway.settings import GatewaySettings
from services.wire import control, syn1

log = logging.getLogger(__name__)

WS_PATH = "/ws"
HEALTH_PATH = "/healthz"  # the load balancer's health check: 200 while this endpoint serves
KEEPALIVE_TIMEOUT_REASON = "keepalive ping timeout"  # the close reason websockets gives a missed pong
__all__ = ["CLOSE_POLICY", "WS_PATH", "NodeEndpoint", "static_response"]
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
        self.addresses = AddressSlots(settings.max_connections_per_address)
        self.join_tokens = JoinTokens(settings.join_secrets, settings.join_secrets_file)

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
        if not self.join_tokens.enabled:
            log.warning(
                "join_tokens_off",
                extra={"why": "no SYNAPSE_GATEWAY_JOIN_SECRETS(_FILE): any node that reaches this endpoint may join"},
            )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handle(self, websocket: ServerConnection) -> None:
        """One connection, counted against its client address for as long as it is open."""
        address = client_address(websocket)
        try:
            self.addresses.acquire(address)
        except Refusal as refusal:
            await refuse(websocket, None, refusal)
            return
        try:
            await self._connection(websocket)
        finally:
            self.addresses.release(address)

    async def _connection(self, websocket: ServerConnection) -> None:
        limit = TokenBucket(self.settings.max_messages_per_s, self.settings.max_message_burst)
        try:
            hello = await self._hello(websocket, limit)
        except Refusal as refusal:
            await refuse(websocket, None, refusal)
            return
        except ConnectionClosed as closed:
            _report_closed(websocket, None, closed)
            return
        try:
            quarantined = await self.hub.refusal(hello.node_id)
        except RegistryUnavailable as error:
            why = f"registry unavailable, try again later: {error}"  # the close reason keeps the first 123 bytes
            await refuse(websocket, hello.node_id, Refusal("registry_unavailable", why, CLOSE_TRY_AGAIN_LATER))
            return
        if quarantined is not None:
            log.warning("node_refused", extra={"node": hello.node_id, "why": quarantined})
            await refuse(websocket, hello.node_id, Refusal("quarantined", f"node {hello.node_id} is {quarantined}"))
            return
        connection = NodeConnection(
            websocket, record_for(hello, self.hub.gateway_id, self.hub.address), self.settings.max_frame_bytes
        )
        await self.hub.joined(connection)
        why = "connection closed"
        try:
            await websocket.send(
                control.dump(control.Welcome(gateway_id=self.hub.gateway_id, heartbeat_s=self.settings.heartbeat_s))
            )
            why = await self._serve(connection, limit)
        except ConnectionClosed as closed:
            why = self._closed_why(closed)
            _report_closed(websocket, connection.node_id, closed)
        except Refusal as refusal:
            why = refusal.message
            await refuse(websocket, connection.node_id, refusal)
        finally:
            await self.hub.left(connection, why)

    def _closed_why(self, closed: ConnectionClosed) -> str:
        """Why a node's connection ended, in words: a lost heartbeat (the node stopped answering pings: hung,
        suspended, or its network silently gone) or what the close frames said."""
        if closed.sent is not None and closed.sent.reason == KEEPALIVE_TIMEOUT_REASON:
            settings = self.settings
            return (
                f"heartbeat lost: no pong within {settings.heartbeat_timeout_s:g} s of a ping "
                "(SYNAPSE_GATEWAY_HEARTBEAT_TIMEOUT_S)"
            )
        return f"connection closed ({closed.rcvd.code if closed.rcvd else 'no close frame'})"

    async def _hello(self, websocket: ServerConnection, limit: TokenBucket) -> control.Hello:
        timeout_s = self.settings.hello_timeout_s
        try:
            first = await asyncio.wait_for(websocket.recv(), timeout_s)
        except TimeoutError:
            raise Refusal("hello_timeout", f"no hello within {timeout_s:g} s of connecting") from None
        limit.take()
        if isinstance(first, bytes):
            raise Refusal("bad_hello", "the first message must be a JSON hello, got binary")
        try:
            message = control.parse_node_message(first)
        except InvalidArgument as error:
            raise Refusal("bad_hello", str(error)) from None
        if not isinstance(message, control.Hello):
            raise Refusal("bad_hello", f"the first message must be hello, got {message.kind}")
        if message.protocol != control.PROTOCOL_VERSION:
            raise Refusal(
                "bad_hello",
                f"protocol {message.protocol} not supported; this gateway speaks {control.PROTOCOL_VERSION}",
            )
        if self.join_tokens.enabled:
            try:
                self.join_tokens.verify(message.join_token, message.node_id)
            except JoinTokenRefused as error:
                raise Refusal("join_token", f"node {message.node_id} refused: {error}", CLOSE_UNAUTHORIZED) from None
        return message

    async def _serve(self, connection: NodeConnection, limit: TokenBucket) -> str:
        """Every message until the node leaves (the reason it left) or is refused (Refusal)."""
        settings = self.settings
        async for data in connection.websocket:
            if not limit.take():
                raise Refusal(
                    "rate_limited",
                    f"more than {settings.max_messages_per_s:g} messages/s (bursts of {settings.max_message_burst}): "
                    "SYNAPSE_GATEWAY_MAX_MESSAGES_PER_S",
                    CLOSE_RATE_LIMITED,
                )
            try:
                left = await self._message(connection, data)
            except Refusal as refusal:
                if refusal.close_code is not None:
                    raise
                await refuse(connection.websocket, connection.node_id, refusal)  # told, and kept
                continue
            except syn1.FrameError as error:
                raise Refusal("frame", f"malformed message: {error}") from None
            except InvalidArgument as error:
                raise Refusal("control", f"malformed message: {error}") from None
            if left is not None:
                return left
        return "connection closed"

    async def _message(self, connection: NodeConnection, data: str | bytes) -> str | None:
        """Act on one message; the reason the node left when it did."""
        if isinstance(data, bytes):
            connection.on_binary(data)
            return None
        message = control.parse_node_message(data)
        if isinstance(message, control.Ready):
            _check_assigned(connection.record, message)
            if connection.record.state != "ready":
                await self.hub.update(connection, state="ready", layers=message.layers, shard_id=message.shard_id)
                log.info("node_ready", extra={"node": connection.node_id, "layers": list(message.layers)})
        elif isinstance(message, control.Progress):
            _check_assigned(connection.record, message)
            log.debug("node_progress", extra={"node": connection.node_id, "done": message.done_bytes})
        elif isinstance(message, control.StepFailed):
            connection.on_step_failed(message.message)
        elif isinstance(message, control.Error):
            log.warning("node_error", extra={"node": connection.node_id, "error": message.message})
            if message.fatal:
                return f"node reported a fatal error: {message.message}"
        elif isinstance(message, control.Bye):
            return f"node left: {message.reason or 'bye'}"
        elif isinstance(message, control.Hello):
            raise InvalidArgument("hello sent twice")
        return None


def _check_assigned(record: NodeRecord, message: control.Ready | control.Progress) -> None:
    """A node reports only on the shard it was assigned: a `ready` for anything else would put layers in
    the plan that the router never placed there (refused, the record unchanged; the node stays)."""
    assigned = record.state in ("loading", "ready") and record.shard_id == message.shard_id
    if isinstance(message, control.Ready):
        assigned = assigned and record.layers == message.layers
    if assigned:
        return
    what = f"layers {list(message.layers)} of " if isinstance(message, control.Ready) else ""
    holding = (
        f"{record.shard_id!r} layers {list(record.layers)} ({record.state})" if record.layers is not None else "nothing"
    )
    raise Refusal(
        "unasked_state",
        f"{message.kind} for {what}shard {message.shard_id!r} refused: this gateway assigned this node {holding}",
        close_code=None,
    )


def client_address(websocket: ServerConnection) -> str:
    """The peer's IP address (a proxy's, behind one)."""
    remote = websocket.remote_address
    return str(remote[0]) if remote else "unknown"


async def refuse(websocket: ServerConnection, node_id: str | None, refusal: Refusal) -> None:
    """The one place a refusal happens: logged, counted by reason, told to the node, and (usually) closed."""
    _record(websocket, node_id, refusal)
    message = control.GatewayError(message=refusal.message[:4000], fatal=refusal.close_code is not None)
    try:
        await websocket.send(control.dump(message))
        if refusal.close_code is not None:
            await websocket.close(refusal.close_code, close_reason(refusal.message))
    except ConnectionClosed:
        pass


def _report_closed(websocket: ServerConnection, node_id: str | None, closed: ConnectionClosed) -> None:
    """websockets itself refused an oversized message (and closed with 1009): count it like any refusal."""
    if closed.sent is not None and closed.sent.code == CLOSE_TOO_BIG:
        reason = f"{closed.sent.reason} (SYNAPSE_GATEWAY_MAX_FRAME_BYTES)"
        _record(websocket, node_id, Refusal("too_big", reason, CLOSE_TOO_BIG))
    elif node_id is None:
        log.debug("connection_closed_before_hello", extra={"address": client_address(websocket)})


def _record(websocket: ServerConnection, node_id: str | None, refusal: Refusal) -> None:
    metrics.REJECTED.labels(refusal.reason).inc()
    log.warning(
        "node_message_rejected",
        extra={
            "node": node_id or "-",
            "address": client_address(websocket),
            "reason": refusal.reason,
            "error": refusal.message[:500],
        },
    )


def close_reason(text: str) -> str:
    """At most 123 bytes of UTF-8, as a close frame allows (the text may quote a node's own input)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")
