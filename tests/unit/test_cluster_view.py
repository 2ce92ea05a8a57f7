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


def test_a_node_late_to_load_is_excluded_but_never_the_last_one(monkeypatch) -> None:
    from services.router import planner

    clock = [100.0]
    monkeypatch.setattr(planner.time, "monotonic", lambda: clock[0])
    watch = planner.LoadWatch(deadline_s=10.0, exclude_s=60.0)
    slow, quick = ready("slow", (0, 2)), ready("quick", (2, 4))
    watch.assigned("slow", "s1")
    watch.assigned("quick", "s2")
    watch.seen(replace(quick, shard_id="s2"))  # ready with its shard: no longer watched
    clock[0] = 115.0
    assert watch.overdue([slow, quick]) == ["slow"]
    assert [n.node_id for n in watch.eligible([slow, quick])] == ["quick"]
    clock[0] = 200.0
    assert watch.expired() == ["slow"] and len(watch.eligible([slow, quick])) == 2
    watch.assigned("slow", "s1")
    clock[0] = 215.0
    assert watch.overdue([slow]) == []  # alone: waiting is better than planning nobody


def test_speed_claims_are_capped_by_the_others_and_replicas_deal_round_robin() -> None:
    from services.router.planner import SPEED_TRUST, capped, replica_groups

    nodes = [replace(ready(f"n{i}", (0, 4)), speed=s) for i, s in enumerate((1e7, 100.0, 120.0, 90.0))]
    speeds = {n.node_id: n.speed for n in capped(nodes)}
    assert speeds["n0"] == SPEED_TRUST * 100.0 and speeds["n1"] == 100.0
    groups = replica_groups(capped(nodes), 2)
    assert [[n.node_id for n in group] for group in groups] == [["n0", "n1"], ["n2", "n3"]]
