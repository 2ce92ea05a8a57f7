"""Waiting for a condition in tests: poll until it holds or a deadline passes, then fail saying what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(check: Callable[[], object], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Await until check() is true; AssertionError naming `what` after timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def eventually_sync(check: Callable[[], object], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Block until check() is true (for tests that drive processes); AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        time.sleep(0.1)
