"""Run the topology-router: settings -> logging -> metrics -> cluster view -> engine -> public gRPC API."""

from __future__ import annotations

import asyncio

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.pb import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer, run_until_signal
from services.router.cluster import Cluster
from services.router.engine import Engine
from services.router.servicer import RouterServicer
from services.router.settings import RouterSettings
from services.tokenizer.tokenization import Tokenizer


async def start_router(settings: RouterSettings) -> tuple[GrpcServer, Cluster, Engine]:
    tokenizer = Tokenizer.from_cache(settings.vocab_cache_dir)
    cluster = Cluster(settings)
    await cluster.start()
    engine = Engine(settings, cluster)
    cluster.on_pipelines_changed = engine.pipelines_changed
    name = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
    tls = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    server = GrpcServer(
        "router",
        [name],
        host=settings.host,
        port=settings.port,
        grace_s=settings.shutdown_grace_s,
        tls=tls,
        api_tokens=settings.api_tokens,
    )
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(settings, cluster, engine, tokenizer), server.server
    )
    await server.start()
    return server, cluster, engine


async def main() -> None:
    settings = RouterSettings()
    setup_logging("router", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    server, cluster, engine = await start_router(settings)
    await run_until_signal(server, engine.close, cluster.close)


if __name__ == "__main__":
    asyncio.run(main())
