"""Fuzz a real in-process gateway over real WebSockets for as long as asked (tests/fuzz/gateway_fuzzer.py), with an
honest node serving steps throughout; prints what ran and every crash. Not collected by pytest.

    PYTHONPATH=. python tests/fuzz/fuzz_gateway.py --seconds 300 --concurrency 8

Exit status 1 when anything crashed, hung, or the honest node missed a step.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import sys
import time

from tests.fuzz.gateway_fuzzer import SETTINGS, ErrorLog, FuzzReport, fuzz_gateway
from tests.integration.gateway_fixtures import FakeNode, head, running_gateway
from tests.polling import eventually


async def run(seconds: float, concurrency: int, wave: int, seed: int) -> tuple[FuzzReport, list[str]]:
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    total = FuzzReport()
    deadline = time.monotonic() + seconds
    async with running_gateway(**SETTINGS) as gateway:
        honest = await FakeNode.join(gateway.ws_url, "honest", compute=head)
        while time.monotonic() < deadline:
            report = await fuzz_gateway(gateway, "honest", seed, wave, concurrency, first_index=total.connections)
            for name in ("connections", "messages", "honest_steps", "fuzz_steps"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            total.closes.update(report.closes)
            total.crashes += report.crashes
            seed += 1
            print(
                f"{total.connections} connections, {total.messages} messages, {len(total.crashes)} crashes", flush=True
            )
        await eventually(lambda: set(gateway.hub.connections) == {"honest"}, 10, "every fuzzed node gone")
        if dict(gateway.endpoint.addresses.open) != {"127.0.0.1": 1}:
            total.crashes.append(f"connection slots leaked: {dict(gateway.endpoint.addresses.open)}")
        await honest.close()
    logging.getLogger().removeHandler(errors)
    return total, errors.records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--wave", type=int, default=50, help="connections per wave (one report line each)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    report, errors = asyncio.run(run(args.seconds, args.concurrency, args.wave, args.seed))
    elapsed = time.monotonic() - started
    closes = dict(sorted(collections.Counter(report.closes).items(), key=lambda item: str(item[0])))
    print(f"\n{elapsed:.0f} s: {report.connections} fuzzed connections, {report.messages} messages sent")
    print(f"close codes: {closes} (None: still open after 3 s, closed by the fuzzer)")
    print(f"honest node: {report.honest_steps} steps; fuzzed nodes: {report.fuzz_steps} steps answered or failed")
    print(f"crashes: {len(report.crashes) + len(errors)}")
    for line in [*report.crashes, *errors][:20]:
        print(f"  {line}")
    return 1 if report.crashes or errors else 0


if __name__ == "__main__":
    sys.exit(main())
