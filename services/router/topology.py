"""Which ready nodes form complete pipelines: ordered stages whose layer ranges cover [0, n_layer) exactly."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.nodes import NodeRecord
from services.wire.steps import Stage


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[NodeRecord, ...]

    @property
    def key(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """Nodes and their layers: a re-plan that moves layers makes a new pipeline."""
        return tuple((stage.node_id, stage.layers) for stage in self.stages)

    @property
    def node_ids(self) -> list[str]:
        return [stage.node_id for stage in self.stages]

    def route(self, verifiers: list[tuple[str, ...]] | None = None) -> tuple[Stage, ...]:
        """The route a step over this pipeline follows, each stage with its verifiers if given."""
        checks = verifiers or [()] * len(self.stages)
        return tuple(
            Stage(node.node_id, node.layers or (0, 0), node.gateway_address, tuple(check))
            for node, check in zip(self.stages, checks, strict=True)
        )


def build_pipelines(nodes: list[NodeRecord], n_layer: int) -> list[Pipeline]:
    """Disjoint chains of ready nodes, each covering [0, n_layer); fastest first stage first, deterministic."""
    free = sorted((n for n in nodes if n.state == "ready" and n.layers), key=lambda n: (-n.speed, n.node_id))
    pipelines: list[Pipeline] = []
    while True:
        chain = _chain_from(0, free, n_layer)
        if chain is None:
            return pipelines
        pipelines.append(Pipeline(tuple(chain)))
        used = {node.node_id for node in chain}
        free = [node for node in free if node.node_id not in used]


def _chain_from(start: int, free: list[NodeRecord], n_layer: int) -> list[NodeRecord] | None:
    if start == n_layer:
        return []
    for node in free:
        assert node.layers is not None
        if node.layers[0] == start and node.layers[1] > start:
            rest = _chain_from(node.layers[1], [n for n in free if n is not node], n_layer)
            if rest is not None:
                return [node, *rest]
    return None


def missing_ranges(nodes: list[NodeRecord], n_layer: int) -> list[tuple[int, int]]:
    """Layer ranges no ready node holds, merged: [(6, 12)] means layers 6..11 are missing."""
    covered = [False] * n_layer
    for node in nodes:
        if node.state == "ready" and node.layers:
            for layer in range(node.layers[0], min(node.layers[1], n_layer)):
                covered[layer] = True
    ranges: list[tuple[int, int]] = []
    for layer, held in enumerate(covered):
        if held:
            continue
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return ranges


def describe_missing(nodes: list[NodeRecord], n_layer: int) -> str:
    """An operator-readable reason no pipeline exists."""
    live = [node for node in nodes if node.state != "gone"]
    if not live:
        return "no nodes connected; start one with `synapse node --gateway ws://HOST:PORT/ws`"
    missing = missing_ranges(nodes, n_layer)
    held = ", ".join(f"layers [{a}, {b})" for a, b in missing)
    loading = sum(1 for node in live if node.state in ("joined", "loading"))
    return (
        f"no ready node holds {held}; {len(live)} node(s) connected, {loading} still loading"
        if missing
        else "ready nodes hold every layer but not as one chain; a re-plan is pending"
    )
