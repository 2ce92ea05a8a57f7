"""Run the gateway: settings -> logging -> metrics -> registry -> WebSocket endpoint + gRPC."""

from __future__ import annotations

import asyncio
import os
import socket

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.pb import gateway_pb2, gateway_pb2_grpc
from services.common.server import GrpcServer, run_until_signal
from services.gateway.hub import Hub
from services.gateway.registry import MemoryRegistry, Registry
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.websocket_server import NodeEndpoint


def make_registry(settings: GatewaySettings) -> Registry:
    if settings.redis_url:
        from services.gateway.redis_registry import RedisRegistry

        return RedisRegistry(settings.redis_url)
    return MemoryRegistry()


def advertised_address(host: str, port: int) -> str:
    """host:port others reach this gateway's gRPC at. Bound to every interface (0.0.0.0, as in a container),
    that is the address this machine's hostname resolves to: on a compose network, the container's own."""
    if host not in ("0.0.0.0", "::", ""):
        return f"{host}:{port}"
    try:
        return f"{socket.gethostbyname(socket.gethostname())}:{port}"
    except OSError:
        return f"127.0.0.1:{port}"


async def start_gateway(settings: GatewaySettings) -> tuple[GrpcServer, NodeEndpoint, Hub]:
    """Start every part; returns them so tests can run a gateway in-process."""
    name = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
    server = GrpcServer("gateway", [name], host=settings.host, port=settings.port, grace_s=settings.shutdown_grace_s)
    address = settings.advertise_address or advertised_address(settings.host, server.port)
    gateway_id = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{server.port}"
    registry = make_registry(settings)
    await registry.start(gateway_id, address)
    hub = Hub(
        gateway_id,
        address,
        registry,
        settings.step_timeout_s,
        quarantine_s=(settings.quarantine_s, settings.quarantine_max_s),
    )
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(hub), server.server)
    endpoint = NodeEndpoint(hub, settings)
    await endpoint.start()
    await server.start()
    return server, endpoint, hub


async def stop_gateway(server: GrpcServer, endpoint: NodeEndpoint, hub: Hub) -> None:
    await server.stop()
    await endpoint.stop()
    await hub.peers.close()
    await hub.registry.close()


async def main() -> None:
    settings = GatewaySettings()
    setup_logging("gateway", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    server, endpoint, hub = await start_gateway(settings)
    await run_until_signal(server, endpoint.stop, hub.peers.close, hub.registry.close)


if __name__ == "__main__":
    asyncio.run(main())
