"""`synapse node --gateway URL`: run a native compute node."""

from __future__ import annotations

import argparse

HELP = "Run a native node (PyTorch on CPU or CUDA) that joins a gateway and serves the layers it is given."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        help="gateway WebSocket URL, e.g. ws://host:8765/ws, or several comma-separated to fail over to in turn "
        "(or SYNAPSE_NODE_GATEWAY_URL)",
    )
    parser.add_argument("--node-id", help="stable node id (default host-pid)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute")
    parser.add_argument("--memory", type=int, help="memory budget in bytes")
    parser.add_argument(
        "--join-token",
        help="join token from `synapse token` (better SYNAPSE_NODE_JOIN_TOKEN: a command line shows in ps)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from services.node.__main__ import main
    from services.node.settings import NodeSettings

    overrides = {
        "gateway_url": args.gateway,
        "node_id": args.node_id,
        "device": args.device,
        "memory_bytes": args.memory,
        "join_token": args.join_token,
    }
    settings = NodeSettings(**{key: value for key, value in overrides.items() if value is not None})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(settings))
    return 0
