"""Waiting in tests: poll a condition until it holds or a deadline passes, sync and async.

The one deadline loop of the suite. `poll` returns the condition's last value (falsy at the
deadline) for callers that decide themselves what a timeout means; `wait_for` and `until`
fail with `WaitTimeout` (an AssertionError), whose message names what was waited for, the
bound and the last value seen, so a red test says which condition did not come true.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Default bounds: lab conditions involve processes and etcd; async ones usually not.
SYNC_TIMEOUT = 20.0
ASYNC_TIMEOUT = 10.0


class WaitTimeout(AssertionError):
    """A waited-for condition did not hold within its bound."""


def poll(pred: Callable[[], T], timeout: float, step: float = 0.05) -> T:
    """Call pred() every `step` s until it returns a truthy value or `timeout` s pass.

    Returns that value, or the last falsy one at the deadline. pred() is always called at
    least once, and once more after the deadline, so a slow pred cannot lose its last look.
    """
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


def wait_for(pred: Callable[[], T], timeout: float = SYNC_TIMEOUT, step: float = 0.05,
             what: str | None = None, detail: Callable[[], str] | None = None) -> T:
    """pred()'s first truthy value; WaitTimeout naming `what` after `timeout` s.

    `detail`, when given, is called at the timeout and its text (a log tail, say) is
    appended to the message.
    """
    value = poll(pred, timeout, step)
    if not value:
        raise WaitTimeout(_message(pred, what, timeout, value, detail))
    return value


async def until(pred: Callable[[], Any], limit: float = ASYNC_TIMEOUT, step: float = 0.01,
                what: str | None = None, detail: Callable[[], str] | None = None) -> Any:
    """Async wait_for: pred() may return a value or an awaitable; `limit` bounds the whole
    wait, including a pred that itself hangs (it is cancelled)."""
    last: list[Any] = [None]

    async def loop() -> Any:
        while True:
            got = pred()
            if inspect.isawaitable(got):
                got = await got
            last[0] = got
            if got:
                return got
            await asyncio.sleep(step)

    try:
        return await asyncio.wait_for(loop(), limit)
    except TimeoutError:
        raise WaitTimeout(_message(pred, what, limit, last[0], detail)) from None


def _message(pred: Callable[[], object], what: str | None, bound: float, last: object,
             detail: Callable[[], str] | None) -> str:
    msg = f"{what or describe(pred)}: not met within {bound} s"
    if last is not None and last is not False:
        msg += f" (last value {_short(repr(last))})"
    if detail is not None:
        msg += "\n" + detail()
    return msg


def describe(pred: Callable[..., object] | Callable[..., Awaitable[object]]) -> str:
    """A predicate's name and where it is written (`test_x.<locals>.<lambda> at f.py:12`)."""
    name = getattr(pred, "__qualname__", None) or repr(pred)
    code = getattr(pred, "__code__", None)
    if code is None:
        return name
    path = Path(code.co_filename)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{name} at {path}:{code.co_firstlineno}"


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
