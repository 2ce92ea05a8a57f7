"""What the router plans with: which nodes may take layers (not excluded, claims capped), replicas of the
sharder's plan over disjoint groups of nodes, and nodes that never finish loading. Pure."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from services.common.nodes import NodeRecord

# A node may claim at most this many times the median speed of the others: a claim the cluster cannot
# check yet must not win it every layer (a node claiming 1e7 layer-steps/s would otherwise).
SPEED_TRUST = 8.0


def capped(nodes: Sequence[NodeRecord]) -> list[NodeRecord]:
    """The nodes with each speed claim capped at SPEED_TRUST x the median of the others' (two or more)."""
    if len(nodes) < 2:
        return list(nodes)
    result = []
    for node in nodes:
        others = statistics.median(n.speed for n in nodes if n.node_id != node.node_id)
        result.append(replace(node, speed=min(node.speed, SPEED_TRUST * others)))
    return result


def replica_groups(nodes: Sequence[NodeRecord], replicas: int) -> list[list[NodeRecord]]:
    """Disjoint groups, one per replica, dealt round-robin from fastest to slowest (so each group is alike);
    group 0 is planned by the sharder, the others copy its layer ranges."""
    ranked = sorted(nodes, key=lambda n: (-n.speed, n.node_id))
    return [ranked[index::replicas] for index in range(max(1, min(replicas, len(ranked))))]


@dataclass
class LoadWatch:
    """Assignments a node has not finished loading: past `deadline_s` it is left out of plans for
    `exclude_s`, so one node that never says ready cannot keep its layers from being served."""

    deadline_s: float
    exclude_s: float
    loading: dict[str, tuple[str, float]] = field(default_factory=dict)  # node id -> (shard id, since)
    excluded: dict[str, float] = field(default_factory=dict)  # node id -> monotonic time it may return

    def assigned(self, node_id: str, shard_id: str) -> None:
        self.loading[node_id] = (shard_id, time.monotonic())

    def seen(self, node: NodeRecord) -> None:
        """A node's new record: ready with its shard (or gone) ends the watch on it."""
        entry = self.loading.get(node.node_id)
        if entry is not None and (not node.live or (node.state == "ready" and node.shard_id == entry[0])):
            del self.loading[node.node_id]

    def overdue(self, nodes: Sequence[NodeRecord]) -> list[str]:
        """Nodes past their deadline, now excluded (and no longer watched). Never every node: with nobody
        left to take the layers, waiting for a slow node is the better bet."""
        now = time.monotonic()
        late = [node_id for node_id, (_, since) in self.loading.items() if now - since > self.deadline_s]
        if not [node for node in self.eligible(nodes) if node.node_id not in late]:
            return []
        for node_id in late:
            del self.loading[node_id]
            self.excluded[node_id] = now + self.exclude_s
        return late

    def expired(self) -> list[str]:
        """Nodes whose exclusion ran out: they may take layers again."""
        now = time.monotonic()
        done = [node_id for node_id, until in self.excluded.items() if until <= now]
        for node_id in done:
            del self.excluded[node_id]
        return done

    def eligible(self, nodes: Sequence[NodeRecord]) -> list[NodeRecord]:
        """Live nodes that are not excluded now."""
        return [node for node in nodes if node.live and node.node_id not in self.excluded]
