"""Placement: every rule of plan_placement, plus property tests against a brute-force optimum."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.gpt2.config import GPT2Config
from services.sharder.footprint import ModelFootprint, footprint, layer_parameter_count
from services.sharder.placement import Assignment, NodeCapacity, plan_placement, stage_seconds

GPT2_SMALL = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
GB = 10**9


def simple_footprint(n_layer: int = 12, *, layer: int = 10, first: int = 0, last: int = 0, head: float = 0):
    """Layers of `layer` bytes; `first` bytes of wpe only on the first stage, `last` of wte on first/last."""
    return ModelFootprint(
        n_layer=n_layer,
        layer_bytes=layer,
        kv_bytes_per_layer=0,
        token_embedding_bytes=last,
        position_embedding_bytes=first,
        final_norm_bytes=0,
        head_work_layers=head,
    )


def ranges(plan: list[Assignment]) -> list[tuple[str, int, int]]:
    return [(a.node_id, a.start, a.end) for a in plan]


def test_footprint_of_gpt2_small_counts_every_parameter() -> None:
    f16 = footprint(GPT2_SMALL, "float16")
    assert layer_parameter_count(768) == 7_087_872
    assert f16.layer_bytes == 7_087_872 * 2
    assert f16.token_embedding_bytes == 50257 * 768 * 2 == 77_194_752
    assert f16.total_bytes == 124_439_808 * 2  # GPT-2 124M, one wte copy
    assert footprint(GPT2_SMALL, "float32").total_bytes == 2 * f16.total_bytes
    assert f16.head_work_layers == pytest.approx(5.4, abs=0.1)
    kv = footprint(GPT2_SMALL, "float16", kv_cache_tokens=1024)
    assert kv.kv_bytes_per_layer == 2 * 1024 * 768 * 2
    # Split over two stages, wte is stored twice (first stage's embedding, last stage's LM head).
    assert f16.stage_bytes(0, 6) + f16.stage_bytes(6, 12) == f16.total_bytes + f16.token_embedding_bytes


def test_footprint_rejects_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        footprint(GPT2_SMALL, "int8")
    with pytest.raises(InvalidArgument, match="kv_cache_tokens"):
        footprint(GPT2_SMALL, kv_cache_tokens=-1)
    with pytest.raises(InvalidArgument, match="layer range"):
        footprint(GPT2_SMALL).stage_bytes(6, 13)


def test_no_nodes_is_a_failed_precondition_saying_how_to_start_one() -> None:
    with pytest.raises(FailedPrecondition, match="synapse node --gateway"):
        plan_placement(simple_footprint(), [])


@pytest.mark.parametrize(
    "node",
    [
        NodeCapacity("a", 100, 0.0),
        NodeCapacity("a", 100, -1.0),
        NodeCapacity("a", 100, float("nan")),
        NodeCapacity("a", 100, float("inf")),
        NodeCapacity("a", 0, 1.0),
        NodeCapacity("a", -5, 1.0),
        NodeCapacity("a", True, 1.0),
        NodeCapacity("", 100, 1.0),
    ],
)
def test_bad_node_capacity_is_invalid(node: NodeCapacity) -> None:
    with pytest.raises(InvalidArgument, match="node"):
        plan_placement(simple_footprint(), [NodeCapacity("ok", 1000, 1.0), node])


def test_duplicate_node_ids_are_invalid() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        plan_placement(simple_footprint(), [NodeCapacity("a", 1000, 1.0), NodeCapacity("a", 1000, 2.0)])


def test_equal_nodes_split_evenly_in_node_id_order() -> None:
    nodes = [NodeCapacity("b", 1000, 1.0), NodeCapacity("a", 1000, 1.0), NodeCapacity("c", 1000, 1.0)]
    assert ranges(plan_placement(simple_footprint(), nodes)) == [("a", 0, 4), ("b", 4, 8), ("c", 8, 12)]


def test_layers_follow_speed() -> None:
    nodes = [NodeCapacity("slow", 1000, 1.0), NodeCapacity("fast", 1000, 3.0)]
    assert ranges(plan_placement(simple_footprint(), nodes)) == [("fast", 0, 9), ("slow", 9, 12)]


def test_lm_head_work_moves_layers_off_the_last_stage() -> None:
    gpt2 = footprint(GPT2_SMALL)
    nodes = [NodeCapacity("a", 10 * GB, 1.0), NodeCapacity("b", 10 * GB, 1.0)]
    plan = plan_placement(gpt2, nodes)
    assert ranges(plan) == [("a", 0, 9), ("b", 9, 12)]  # 9 layers vs 3 layers + ~5.4 of LM head
    by_id = {node.node_id: node for node in nodes}
    assert max(stage_seconds(gpt2, by_id[a.node_id], a) for a in plan) == pytest.approx(9.0)


def test_memory_caps_a_fast_node() -> None:
    nodes = [NodeCapacity("fast", 30, 10.0), NodeCapacity("roomy", 1000, 1.0)]
    assert ranges(plan_placement(simple_footprint(), nodes)) == [("fast", 0, 3), ("roomy", 3, 12)]


def test_embeddings_go_to_the_nodes_that_can_hold_them() -> None:
    # "fast" ranks first but cannot hold the 50-byte embeddings; "big" takes both ends instead.
    nodes = [NodeCapacity("fast", 45, 4.0), NodeCapacity("big", 1000, 1.0), NodeCapacity("big2", 1000, 1.0)]
    plan = plan_placement(simple_footprint(first=50, last=50), nodes)
    assert [a.node_id for a in plan] == ["big", "fast", "big2"]
    assert plan[1].n_layers == 4  # memory-bound: 45 // 10


def test_more_nodes_than_layers_uses_the_fastest_one_layer_each() -> None:
    nodes = [NodeCapacity(f"n{i}", 1000, float(i)) for i in range(1, 7)]
    plan = plan_placement(simple_footprint(n_layer=4), nodes)
    assert ranges(plan) == [("n6", 0, 1), ("n5", 1, 2), ("n4", 2, 3), ("n3", 3, 4)]


def test_more_nodes_than_layers_skips_a_fast_node_that_cannot_hold_the_ends() -> None:
    nodes = [NodeCapacity("tiny-fast", 10, 9.0)] + [NodeCapacity(f"n{i}", 100, float(i)) for i in (1, 2, 3)]
    plan = plan_placement(simple_footprint(n_layer=2, first=20, last=20), nodes)
    assert ranges(plan) == [("n3", 0, 1), ("n2", 1, 2)]


def test_one_layer_model_goes_to_the_fastest_node_that_holds_it_all() -> None:
    nodes = [NodeCapacity("fast", 25, 5.0), NodeCapacity("slow", 100, 1.0)]
    assert ranges(plan_placement(simple_footprint(n_layer=1, first=10, last=10), nodes)) == [("slow", 0, 1)]


def test_a_node_too_small_for_one_layer_stays_idle() -> None:
    nodes = [NodeCapacity("phone", 9, 100.0), NodeCapacity("laptop", 1000, 1.0)]
    assert ranges(plan_placement(simple_footprint(), nodes)) == [("laptop", 0, 12)]


def test_whole_model_on_one_node_when_no_split_fits() -> None:
    # Only "big" can hold an end stage, so no two-node split exists; it takes everything.
    nodes = [NodeCapacity("big", 1000, 1.0), NodeCapacity("small", 30, 5.0)]
    assert ranges(plan_placement(simple_footprint(first=100, last=100), nodes)) == [("big", 0, 12)]


def test_not_enough_memory_reports_needed_and_available_bytes() -> None:
    gpt2 = footprint(GPT2_SMALL)
    nodes = [NodeCapacity("a", 60_000_000, 1.0), NodeCapacity("b", 60_000_000, 1.0)]
    with pytest.raises(ResourceExhausted, match=r"needs 326\.1 MB .* have 120\.0 MB"):
        plan_placement(gpt2, nodes)
    with pytest.raises(ResourceExhausted, match="first stage needs"):
        plan_placement(gpt2, [NodeCapacity("a", 10_000_000, 1.0)])


def test_stage_seconds_counts_the_lm_head_on_the_last_stage() -> None:
    fp = simple_footprint(head=2.0)
    node = NodeCapacity("a", 1000, 2.0)
    assert stage_seconds(fp, node, Assignment("a", 0, 4)) == 2.0
    assert stage_seconds(fp, node, Assignment("a", 8, 12)) == 3.0


# --- property tests -------------------------------------------------------------------------------


def bottleneck(fp: ModelFootprint, nodes: dict[str, NodeCapacity], order, counts) -> Fraction:
    head = Fraction(fp.head_work_layers)
    times = [Fraction(c) / Fraction(nodes[n].speed) for n, c in zip(order, counts, strict=True)]
    times[-1] += head / Fraction(nodes[order[-1]].speed)
    return max(times)


def fits(fp: ModelFootprint, nodes: dict[str, NodeCapacity], order, counts) -> bool:
    start = 0
    for node_id, count in zip(order, counts, strict=True):
        if fp.stage_bytes(start, start + count) > nodes[node_id].memory_bytes:
            return False
        start += count
    return True


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force_bottleneck(fp: ModelFootprint, nodes: list[NodeCapacity]) -> Fraction | None:
    """The policy of docs/placement.md, by enumeration: best bottleneck, or None when nothing fits."""
    by_id = {node.node_id: node for node in nodes}
    usable = [node.node_id for node in nodes if node.memory_bytes >= fp.per_layer_bytes]
    if not usable:
        return None
    if len(usable) <= fp.n_layer:
        candidates = [
            (order, counts)
            for order in itertools.permutations(usable)
            for counts in compositions(fp.n_layer, len(order))
        ]
    else:
        candidates = [(order, [1] * fp.n_layer) for order in itertools.permutations(usable, fp.n_layer)]
    best = [bottleneck(fp, by_id, o, c) for o, c in candidates if o and fits(fp, by_id, o, c)]
    if not best:
        best = [bottleneck(fp, by_id, [n], [fp.n_layer]) for n in usable if by_id[n].memory_bytes >= fp.total_bytes]
    return min(best, default=None)


footprints = st.builds(
    simple_footprint,
    n_layer=st.integers(1, 7),
    layer=st.just(10),
    first=st.integers(0, 30),
    last=st.integers(0, 30),
    head=st.sampled_from([0.0, 0.5, 2.0]),
)
node_lists = st.lists(
    st.builds(
        NodeCapacity,
        node_id=st.sampled_from("abcdefgh"),
        memory_bytes=st.integers(5, 120),
        speed=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda node: node.node_id,
)


@settings(max_examples=300, deadline=None)
@given(fp=footprints, nodes=node_lists, shuffle=st.randoms(use_true_random=False))
def test_plan_is_valid_optimal_and_independent_of_input_order(fp, nodes, shuffle) -> None:
    expected = brute_force_bottleneck(fp, nodes)
    if expected is None:
        with pytest.raises(ResourceExhausted):
            plan_placement(fp, nodes)
        return
    plan = plan_placement(fp, nodes)
    by_id = {node.node_id: node for node in nodes}
    # Contiguous, in pipeline order, covering [0, n_layer) exactly once, each node at most once.
    assert plan[0].start == 0 and plan[-1].end == fp.n_layer
    assert all(a.end == b.start for a, b in itertools.pairwise(plan))
    assert all(a.n_layers >= 1 for a in plan)
    assert len({a.node_id for a in plan}) == len(plan)
    # Within memory, and every node that can hold a layer is used while they are not more than layers.
    assert all(fp.stage_bytes(a.start, a.end) <= by_id[a.node_id].memory_bytes for a in plan)
    usable = [node for node in nodes if node.memory_bytes >= fp.per_layer_bytes]
    if len(plan) > 1:
        assert len(plan) == min(len(usable), fp.n_layer)
    # Optimal slowest stage.
    order, counts = [a.node_id for a in plan], [a.n_layers for a in plan]
    assert bottleneck(fp, by_id, order, counts) == expected
    # Deterministic, whatever order the nodes come in.
    shuffled = list(nodes)
    shuffle.shuffle(shuffled)
    assert plan_placement(fp, shuffled) == plan


@settings(max_examples=50, deadline=None)
@given(n_layer=st.integers(2, 48), speeds=st.lists(st.integers(1, 8), min_size=2, max_size=6))
def test_layers_are_proportional_to_speed_when_memory_is_plentiful(n_layer, speeds) -> None:
    nodes = [NodeCapacity(f"n{i}", 10**6, float(s)) for i, s in enumerate(speeds)]
    plan = plan_placement(simple_footprint(n_layer), nodes)
    speed = {node.node_id: node.speed for node in nodes}
    assert len(plan) == min(len(nodes), n_layer)
    # D'Hondt condition: no layer could move from one node to another and make it finish sooner.
    for a, b in itertools.permutations(plan, 2):
        if a.n_layers > 1:
            assert Fraction(a.n_layers) / Fraction(speed[a.node_id]) <= Fraction(b.n_layers + 1) / Fraction(
                speed[b.node_id]
            )
