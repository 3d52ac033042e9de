"""Capped exponential backoff with jitter, and a logger that speaks once per state change.

An etcd outage must not flood the log with one line per retry: `OutageLog` prints the first
failure of a kind, stays quiet while the same failure repeats, and prints one line when
things recover.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re

_DETAIL = re.compile(r"\s*\(.*\)|:\s*\S+:\d+.*$")


class Backoff:
    """Delays that double from `initial` up to `cap`, with +-20% jitter."""

    def __init__(
        self, initial: float = 0.2, cap: float = 10.0, rng: random.Random | None = None
    ) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * self._rng.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.initial

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())


class OutageLog:
    """Logs a failure when it starts or changes, and once when it ends."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self.failing: str | None = None
        self.failures = 0

    def fail(self, reason: str, level: int = logging.WARNING) -> None:
        """Record a failure; log it only if it differs from the one already logged.

        Details in parentheses (addresses, errno text) are ignored when comparing, as
        they vary from one attempt to the next while the state stays the same.
        """
        self.failures += 1
        key = _DETAIL.sub("", reason)
        if key != self.failing:
            self._log.log(level, "%s: %s (retrying with backoff)", self._what, reason)
            self.failing = key

    def ok(self) -> None:
        if self.failing is not None:
            self._log.info("%s: recovered after %d failed attempts", self._what, self.failures)
        self.failing = None
        self.failures = 0
