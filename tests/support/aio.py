"""Waiting in async tests: poll a condition with a bound, run coroutines in the background."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

TIMEOUT = 10.0


async def until(pred: Callable[[], object], limit: float = TIMEOUT) -> object:
    """Wait until pred() is truthy; fail after `limit` seconds."""

    async def poll() -> object:
        while True:
            got = pred()
            if got:
                return got
            await asyncio.sleep(0.01)

    try:
        return await asyncio.wait_for(poll(), limit)
    except TimeoutError:
        raise AssertionError(f"condition not met within {limit} s") from None


@contextlib.asynccontextmanager
async def background(*coros):
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
