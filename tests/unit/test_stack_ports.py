"""A stack's ports all derive from its base: distinct within a stack, disjoint between stacks a span apart."""

from __future__ import annotations

import pytest

from services import stack_ports
from services.common.errors import InvalidArgument


def every_port(base: int, gateways: int, nodes: int) -> list[int]:
    ports = list(stack_ports.service_ports(base).values())
    for index in range(gateways):
        ports += [*stack_ports.gateway_ports(base, index), stack_ports.metrics_port(base, f"gateway-{index}")]
    ports += [stack_ports.metrics_port(base, name) for name in ("router", "tokenizer", "sampler", "sharder")]
    ports += [stack_ports.metrics_port(base, "node", node_index=n) for n in range(stack_ports.span(nodes) - 100)]
    return ports


def test_ports_are_distinct_and_inside_the_span() -> None:
    ports = every_port(40000, stack_ports.MAX_GATEWAYS, 3)
    assert len(set(ports)) == len(ports)
    assert min(ports) == 40000 and max(ports) < 40000 + stack_ports.span(3)
    assert stack_ports.service_ports(40000)["router"] == 40000


def test_stacks_a_span_apart_share_no_port() -> None:
    first, second = 30000, 30000 + stack_ports.span(2)
    assert not set(every_port(first, 2, 2)) & set(every_port(second, 2, 2))


@pytest.mark.parametrize(("base", "gateways"), [(80, 1), (65500, 1), (40000, stack_ports.MAX_GATEWAYS + 1)])
def test_a_base_whose_ports_do_not_fit_is_refused(base: int, gateways: int) -> None:
    with pytest.raises(InvalidArgument):
        stack_ports.check_base(base, gateways, 2)
