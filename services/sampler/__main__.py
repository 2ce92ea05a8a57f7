"""Run the sampler: settings -> logging -> metrics -> gRPC."""

from __future__ import annotations

import asyncio

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.pb import sampler_pb2, sampler_pb2_grpc
from services.common.server import GrpcServer, run_until_signal
from services.sampler.servicer import SamplerServicer
from services.sampler.settings import SamplerSettings

SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"].full_name


async def start_sampler(settings: SamplerSettings) -> GrpcServer:
    """Start the service; returns the running server so tests can run it in-process."""
    server = GrpcServer(
        "sampler", [SERVICE_NAME], host=settings.host, port=settings.port, grace_s=settings.shutdown_grace_s
    )
    servicer = SamplerServicer(settings.max_batch, settings.max_vocab)
    sampler_pb2_grpc.add_SamplerServiceServicer_to_server(servicer, server.server)
    await server.start()
    return server


async def main() -> None:
    settings = SamplerSettings()
    setup_logging("sampler", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    server = await start_sampler(settings)
    await run_until_signal(server)


if __name__ == "__main__":
    asyncio.run(main())
