"""What the gateways keep in a shared Redis, and how the router finds them there: key names and lookups.

Each gateway refreshes `synapse:gateway:<gateway_id>` = its gRPC address (a TTL key: a gateway that
dies drops out by itself); node records live in one hash and every change is published on a channel.
"""

from __future__ import annotations

import redis.asyncio as redis

NODES_KEY = "synapse:nodes"  # hash: node id -> NodeRecord JSON
EVENTS_CHANNEL = "synapse:node-events"  # pub/sub: NodeRecord JSON of every change
GATEWAY_KEY = "synapse:gateway:{}"  # gateway id -> its gRPC host:port, with a TTL
QUARANTINE_KEY = "synapse:quarantine:{}"  # node id -> why it is kept out, with the quarantine as TTL
OFFENSES_KEY = "synapse:offenses:{}"  # node id -> offenses in the last day (the quarantine doubles with each)
LIVENESS_TTL_S = 6  # seconds a gateway's key outlives its last refresh
LIVENESS_PERIOD_S = 2.0  # seconds between a gateway's refreshes of its key
_GATEWAY_PATTERN = GATEWAY_KEY.format("*")


async def live_gateways(client: redis.Redis) -> dict[str, str]:
    """gateway id -> gRPC address of every gateway whose liveness key has not expired."""
    keys = [key async for key in client.scan_iter(match=_GATEWAY_PATTERN, count=100)]
    if not keys:
        return {}
    addresses = await client.mget(keys)
    prefix = len(_GATEWAY_PATTERN) - 1
    return {_text(key)[prefix:]: _text(address) for key, address in zip(keys, addresses, strict=True) if address}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
