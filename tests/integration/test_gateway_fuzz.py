"""A real gateway fuzzed over real WebSockets (tests/fuzz/gateway_fuzzer.py): it never crashes or hangs, every
fuzzed connection ends with a documented close code, and an honest node serves steps throughout."""

from __future__ import annotations

import logging

import pytest

from tests.fuzz.gateway_fuzzer import SETTINGS, ErrorLog, fuzz_gateway
from tests.integration.gateway_fixtures import FakeNode, head, running_gateway
from tests.polling import eventually


@pytest.mark.timeout(180)
async def test_fuzzed_connections_never_crash_or_hang_the_gateway() -> None:
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        async with running_gateway(**SETTINGS) as gateway:
            honest = await FakeNode.join(gateway.ws_url, "honest", compute=head)
            report = await fuzz_gateway(gateway, "honest", seed=11, connections=60, concurrency=8)
            await eventually(lambda: set(gateway.hub.connections) == {"honest"}, 10, "every fuzzed node gone")
            assert dict(gateway.endpoint.addresses.open) == {"127.0.0.1": 1}, "a connection slot leaked"
            newcomer = await FakeNode.join(gateway.ws_url, "newcomer")
            await newcomer.close()
            await honest.close()
    finally:
        logging.getLogger().removeHandler(errors)
    assert not report.crashes, report.crashes[:5]
    assert not errors.records, errors.records[:5]
    assert report.connections == 60 and report.messages > 500
    assert report.honest_steps > 20 and report.fuzz_steps > 0
    assert {1008, 4029} <= set(report.closes), report.closes  # refusals did happen
