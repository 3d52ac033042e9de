"""Async tests: run coroutines in the background for the length of a block.

`until` (poll a condition with a bound) lives in tests.support.wait with its sync twin and
is re-exported here for the tests that import it from this module.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.wait import until

__all__ = ["background", "until"]


@contextlib.asynccontextmanager
async def background(*coros):
    """Run coros as tasks inside the block; cancel them after; re-raise one that failed."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for t in tasks:
            # A background task that died on its own is a test failure.
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
