"""The native node's link to a gateway: connect, hello and welcome, and reconnect with backoff after a drop,
to the next of its gateways in turn."""

from __future__ import annotations

import asyncio
import itertools
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
    """TLS for wss:// gateways, trusting settings.tls_ca (a self-signed certificate) besides the system's CAs;
    None when no gateway URL is wss://."""
    if not any(url.startswith("wss://") for url in settings.gateway_url):
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
    """Connect, shake hands and run `session` until the link drops; then retry, forever, with the next
    gateway URL each time (a gateway that just failed is tried again last). Between tries: the delay
    (with jitter), reset by a welcome and doubled after each full round of URLs that all failed. A refused
    hello counts as a failure (the gateway may be restarting)."""
    tls = ssl_context(settings)
    urls = settings.gateway_url
    delay, failed_in_round = settings.reconnect_min_s, 0
    for attempt in itertools.count():
        url = urls[attempt % len(urls)]
        try:
            async with connect(
                url,
                ssl=tls if url.startswith("wss://") else None,
                max_size=None,
                compression=None,
                open_timeout=HANDSHAKE_TIMEOUT_S,
            ) as websocket:
                welcome = await handshake(websocket, hello)
                delay, failed_in_round = settings.reconnect_min_s, 0
                log.info("gateway_joined", extra={"gateway": welcome.gateway_id, "url": url, "node": hello.node_id})
                await session(websocket, welcome)
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, SynapseError) as error:
            log.warning("gateway_unreachable", extra={"url": url, "error": str(error), "retry_s": round(delay, 2)})
        except InvalidURI as error:
            raise SynapseError(f"bad gateway URL: {error}") from None
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        failed_in_round += 1
        if failed_in_round >= len(urls):  # every gateway failed once since the last welcome: back off
            delay, failed_in_round = min(delay * 2, settings.reconnect_max_s), 0
