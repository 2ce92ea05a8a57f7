"""The native node's link to a gateway: connect, hello and welcome, and reconnect with backoff after a drop."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from services.common.errors import SynapseError
from services.node.settings import NodeSettings
from services.wire import control

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
Session = Callable[[ClientConnection, control.Welcome], Awaitable[None]]


def ssl_context(settings: NodeSettings) -> ssl.SSLContext | None:
    """TLS for wss:// gateways, trusting settings.tls_ca (a self-signed certificate) besides the system's CAs."""
    if not settings.gateway_url.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if settings.tls_ca:
        context.load_verify_locations(settings.tls_ca)
    return context


async def handshake(websocket: ClientConnection, hello: control.Hello) -> control.Welcome:
    """Send hello; the gateway's welcome, or SynapseError carrying its refusal."""
    await websocket.send(control.dump(hello))
    reply = control.parse_gateway_message(await asyncio.wait_for(websocket.recv(), HANDSHAKE_TIMEOUT_S))
    if isinstance(reply, control.GatewayError):
        raise SynapseError(f"gateway refused this node: {reply.message}")
    if not isinstance(reply, control.Welcome):
        raise SynapseError(f"gateway answered hello with {reply.kind!r}, expected 'welcome'")
    return reply


async def stay_connected(settings: NodeSettings, hello: control.Hello, session: Session) -> None:
    """Connect, shake hands and run `session` until the link drops; then retry with exponential backoff and
    jitter, forever. A refused hello is retried the same way (the gateway may be restarting)."""
    tls = ssl_context(settings)
    delay = settings.reconnect_min_s
    while True:
        try:
            async with connect(
                settings.gateway_url, ssl=tls, max_size=None, compression=None, open_timeout=HANDSHAKE_TIMEOUT_S
            ) as websocket:
                welcome = await handshake(websocket, hello)
                delay = settings.reconnect_min_s
                log.info("gateway_joined", extra={"gateway": welcome.gateway_id, "node": hello.node_id})
                await session(websocket, welcome)
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, SynapseError) as error:
            log.warning(
                "gateway_unreachable",
                extra={"url": settings.gateway_url, "error": str(error), "retry_s": round(delay, 2)},
            )
        except InvalidURI as error:
            raise SynapseError(f"bad gateway URL: {error}") from None
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, settings.reconnect_max_s)
