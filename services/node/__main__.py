"""Run a native node: settings -> logging -> device and speed benchmark -> join the gateway, forever."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import torch

from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.node.agent import NodeAgent
from services.node.benchmark import measure_speed
from services.node.settings import NodeSettings

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(settings: NodeSettings) -> tuple[torch.device, torch.dtype]:
    wanted = settings.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(wanted)
    if settings.compute_dtype != "auto":
        return device, _DTYPES[settings.compute_dtype]
    return device, torch.float16 if device.type == "cuda" else torch.float32


def default_memory_bytes(device: torch.device) -> int:
    """Half of what is free now: room for weights and KV caches without starving the machine."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * page_size // 2


def build_agent(settings: NodeSettings) -> NodeAgent:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device, dtype = pick_device(settings)
    speed = settings.speed or measure_speed(device, dtype)
    node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
    memory = settings.memory_bytes or default_memory_bytes(device)
    log.info(
        "node_starting",
        extra={
            "node": node_id,
            "device": str(device),
            "dtype": str(dtype).split(".")[-1],
            "speed": round(speed, 1),
            "memory_mib": memory >> 20,
        },
    )
    return NodeAgent(settings, node_id=node_id, device=device, dtype=dtype, memory_bytes=memory, speed=speed)


async def main(settings: NodeSettings | None = None) -> None:
    settings = settings or NodeSettings()
    setup_logging("node", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    await build_agent(settings).run_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
