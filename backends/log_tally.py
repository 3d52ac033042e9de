"""LogTally: counts of changes logged as one INFO line at most every few seconds.

Under churn every batch of lease changes is a small change of its own (100 lease changes a
second made 100 INFO lines a second). A LogTally logs the first batch's counts at once, then
adds up the counts of the batches that follow within `every` seconds and logs their sum as
one line when the period is over (a timer on the running loop, so the last of a burst is
not held back until the next change); each batch's own line is DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any


class LogTally:
    """Adds up counts per key; `render(counts, batches)` makes the INFO line."""

    def __init__(
        self,
        log: logging.Logger,
        render: Callable[[Mapping[Any, int], int], str],
        every: float,
        clock: Callable[[], float],
    ) -> None:
        self.log = log
        self.render = render
        self.every = every
        self.clock = clock
        self._counts: dict[Any, int] = {}
        self._batches = 0
        self._logged_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, counts: Mapping[Any, int]) -> None:
        """One batch's counts: logged now if the last line is `every` seconds old, else
        at DEBUG now and in the sum at the end of the period."""
        for key, n in counts.items():
            if n:
                self._counts[key] = self._counts.get(key, 0) + n
        self._batches += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= self.every:
            self.flush()
            return
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s", self.render(counts, 1))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self._logged_at + self.every - now, self.flush)

    def flush(self) -> None:
        """Log the counts not logged yet, as one INFO line."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        self.log.info("%s", self.render(self._counts, self._batches))
        self._counts = {}
        self._batches = 0
        self._logged_at = self.clock()
