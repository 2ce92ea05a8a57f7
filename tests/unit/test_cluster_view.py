"""The router's view of the nodes: newest record wins, and a gateway's broken stream loses nothing for good."""

from __future__ import annotations

from dataclasses import replace

from services.common.gpt2.config import GPT2Config
from services.common.nodes import NodeRecord
from services.router.cluster import Cluster
from services.router.settings import RouterSettings

GATEWAY_A, GATEWAY_B = "10.0.0.1:50055", "10.0.0.2:50055"


def ready(node_id: str, layers: tuple[int, int], version: int = 1) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, kind="native", device="cpu", memory_bytes=1 << 30, speed=10.0, gateway_id="a",
        gateway_address=GATEWAY_A, state="ready", layers=layers, shard_id="s", version=version,
    )  # fmt: skip


async def cluster_with(*records: NodeRecord) -> Cluster:
    cluster = Cluster(RouterSettings(gateways=[GATEWAY_A]))
    cluster.config = GPT2Config(n_layer=4, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    for record in records:
        await cluster._apply(record, GATEWAY_A)
    return cluster


async def test_a_broken_stream_presumes_nodes_gone_and_their_own_gateway_revives_them() -> None:
    first, last = ready("first", (0, 2)), ready("last", (2, 4))
    cluster = await cluster_with(first, last)
    assert len(cluster.pipelines) == 1
    await cluster._forget_gateway(GATEWAY_A)
    assert cluster.pipelines == [] and {n.state for n in cluster.nodes.values()} == {"gone"}
    # A copy of the same records from another gateway (an orphan not reaped yet) does not revive them...
    await cluster._apply(first, GATEWAY_B)
    assert cluster.nodes["first"].state == "gone"
    # ...the snapshot of their own gateway's reopened stream does.
    await cluster._apply(first, GATEWAY_A)
    await cluster._apply(last, GATEWAY_A)
    assert len(cluster.pipelines) == 1


async def test_newest_version_wins_from_any_gateway() -> None:
    node = ready("solo", (0, 4), version=5)
    cluster = await cluster_with(node)
    await cluster._apply(replace(node, state="gone", version=4), GATEWAY_B)
    assert cluster.nodes["solo"].state == "ready"  # older: ignored
    await cluster._apply(replace(node, state="gone", version=6), GATEWAY_B)
    assert cluster.nodes["solo"].state == "gone"
    await cluster._apply(node, GATEWAY_A)  # the old record, even from its own gateway: stale
    assert cluster.nodes["solo"].state == "gone"


async def test_route_around_a_gone_node_until_a_gateway_reports_it() -> None:
    node = ready("solo", (0, 4))
    cluster = await cluster_with(node)
    await cluster.route_around("solo")
    assert cluster.pipelines == []
    await cluster._apply(replace(node, version=2), GATEWAY_B)  # moved to another gateway, newer
    assert len(cluster.pipelines) == 1
