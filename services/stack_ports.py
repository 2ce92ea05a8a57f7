"""Where a local stack's ports go: every port derived from one base, so stacks with different bases never meet.

The layout (the README's `synapse up` section shows it too), for a base B:

| ports | what |
|---|---|
| B, B+1, B+2, B+3 | router (public Generate), tokenizer, sampler, sharder gRPC |
| B+4 | sharder's shard download HTTP server |
| B+10+2i, B+11+2i | gateway i's gRPC and node WebSocket (i < 20) |
| B+50, B+51, B+52, B+53 | /metrics of router, tokenizer, sampler, sharder |
| B+60+i | /metrics of gateway i |
| B+100+n | /metrics of the n-th node started (a restarted node keeps its port) |

So a stack of N nodes takes [B, B+100+N); two stacks side by side need bases 100+N apart (1000 is plenty).
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

SERVICES = ("router", "tokenizer", "sampler", "sharder", "sharder_http")
MAX_GATEWAYS = 20
NODE_METRICS_OFFSET = 100
MIN_BASE, MAX_PORT = 1024, 65535


def span(nodes: int) -> int:
    """Ports a stack of `nodes` nodes takes from its base (room for as many restarts under new names again)."""
    return NODE_METRICS_OFFSET + 2 * max(nodes, 1)


def check_base(base: int, gateways: int, nodes: int) -> None:
    if gateways > MAX_GATEWAYS:
        raise InvalidArgument(f"a stack on a port base has at most {MAX_GATEWAYS} gateways, not {gateways}")
    if not MIN_BASE <= base <= MAX_PORT - span(nodes):
        raise InvalidArgument(
            f"port base {base} out of range: it must lie in [{MIN_BASE}, {MAX_PORT - span(nodes)}] so that the "
            f"stack's {span(nodes)} ports fit below {MAX_PORT + 1}"
        )


def service_ports(base: int) -> dict[str, int]:
    """gRPC ports of router, tokenizer, sampler, sharder, and the sharder's HTTP port."""
    return {name: base + offset for offset, name in enumerate(SERVICES)}


def gateway_ports(base: int, index: int) -> tuple[int, int]:
    """(gRPC, WebSocket) of gateway `index`."""
    return base + 10 + 2 * index, base + 11 + 2 * index


def metrics_port(base: int, name: str, node_index: int | None = None) -> int:
    """/metrics of a service (`router`, `gateway-3`, …) or, with node_index, of the node started n-th."""
    if node_index is not None:
        return base + NODE_METRICS_OFFSET + node_index
    if name.startswith("gateway-"):
        return base + 60 + int(name.removeprefix("gateway-"))
    return base + 50 + SERVICES.index(name)
