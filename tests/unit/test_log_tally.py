"""backends.log_tally.LogTally: the first batch logged at once, the batches of the next
`every` seconds added up into one INFO line when the period ends; and the udp backend's
peer line through it."""

from __future__ import annotations

import logging

from backends.log_tally import LogTally
from tests.support.wait import until

log = logging.getLogger("tests.log_tally")


def line(counts, batches: int) -> str:
    return f"set {counts.get('set', 0)}" + ("" if batches == 1 else f" ({batches} batches)")


async def test_batches_within_a_period_are_one_line(caplog) -> None:
    now = [0.0]
    tally = LogTally(log, line, 0.2, lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.log_tally"):
        for _ in range(50):
            tally.add({"set": 2, "removed": 0})
            now[0] += 0.001
        assert caplog.messages == ["set 2"]
        await until(lambda: len(caplog.messages) == 2, 5.0)
        assert caplog.messages[1] == "set 98 (49 batches)"
        now[0] += 1.0  # a batch after a quiet period is logged at once again
        tally.add({"set": 1})
        assert caplog.messages[2] == "set 1"


async def test_nothing_to_flush_logs_nothing(caplog) -> None:
    tally = LogTally(log, line, 10.0, lambda: 0.0)
    with caplog.at_level(logging.DEBUG, logger="tests.log_tally"):
        tally.flush()
    assert caplog.messages == []
