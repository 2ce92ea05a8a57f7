"""Run the sharder: settings -> logging -> metrics -> load the model -> HTTP shard server + gRPC."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.pb import sharder_pb2, sharder_pb2_grpc
from services.common.server import GrpcServer, run_until_signal
from services.sharder.catalog import Catalog, load_model
from services.sharder.http_server import make_app, start_http
from services.sharder.servicer import ShardServicer
from services.sharder.settings import SharderSettings


async def start_sharder(settings: SharderSettings) -> tuple[GrpcServer, web.AppRunner, Catalog]:
    checkpoint = await asyncio.to_thread(load_model, settings.model, random_fallback=settings.random_fallback)
    catalog = Catalog(checkpoint, settings.shards_dir, settings.dtype)
    app = make_app(catalog, settings.http_max_bytes_per_s)
    runner, http_port = await start_http(app, settings.http_host, settings.http_port)
    public_url = settings.public_url or f"http://{settings.http_host}:{http_port}"
    name = sharder_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name
    server = GrpcServer("sharder", [name], host=settings.host, port=settings.port, grace_s=settings.shutdown_grace_s)
    sharder_pb2_grpc.add_ShardServiceServicer_to_server(ShardServicer(catalog, public_url), server.server)
    await server.start()
    return server, runner, catalog


async def main() -> None:
    settings = SharderSettings()
    setup_logging("sharder", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    server, runner, _catalog = await start_sharder(settings)
    await run_until_signal(server, runner.cleanup)


if __name__ == "__main__":
    asyncio.run(main())
