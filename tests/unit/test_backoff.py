"""Unit tests for agent.backoff: capped jittered backoff and the once-per-state outage log."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from agent.backoff import Backoff, OutageLog

LOGGER = "tests.unit.backoff"


def test_backoff_doubles_and_caps_within_jitter() -> None:
    b = Backoff(initial=0.2, cap=3.0, rng=random.Random(5))
    nominal = [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0]
    for want in nominal:
        got = b.next_delay()
        assert want * 0.8 <= got <= want * 1.2, (want, got)


def test_backoff_jitter_varies() -> None:
    b = Backoff(initial=1.0, cap=1.0, rng=random.Random(9))
    delays = {b.next_delay() for _ in range(20)}
    assert len(delays) > 10
    assert all(0.8 <= d <= 1.2 for d in delays)


def test_backoff_same_seed_same_delays() -> None:
    a = Backoff(rng=random.Random(3))
    b = Backoff(rng=random.Random(3))
    assert [a.next_delay() for _ in range(6)] == [b.next_delay() for _ in range(6)]


def test_backoff_never_exceeds_cap_plus_jitter() -> None:
    b = Backoff(initial=0.5, cap=10.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(50)]
    assert max(delays) <= 12.0
    assert min(delays[10:]) >= 8.0  # long since capped


def test_backoff_reset() -> None:
    b = Backoff(initial=0.2, cap=10.0, rng=random.Random(2))
    for _ in range(6):
        b.next_delay()
    assert b.next_delay() > 5
    b.reset()
    assert 0.16 <= b.next_delay() <= 0.24
    assert 0.32 <= b.next_delay() <= 0.48


async def test_backoff_wait_sleeps_next_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    b = Backoff(initial=1.0, cap=2.0, rng=random.Random(4))
    await b.wait()
    await b.wait()
    await b.wait()
    assert len(slept) == 3
    assert 0.8 <= slept[0] <= 1.2
    assert 1.6 <= slept[1] <= 2.4
    assert 1.6 <= slept[2] <= 2.4


# -- OutageLog -----------------------------------------------------------------------------


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def outage(caplog: pytest.LogCaptureFixture) -> OutageLog:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return OutageLog(logging.getLogger(LOGGER), "talking to etcd")


def test_repeated_identical_failures_log_once(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        outage.fail("connection refused")
    recs = records(caplog)
    assert len(recs) == 1
    assert recs[0].levelno == logging.WARNING
    assert "talking to etcd" in recs[0].getMessage()
    assert "connection refused" in recs[0].getMessage()
    assert outage.failures == 5


def test_failures_differing_in_parenthesised_details_log_once(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.fail("cannot connect (errno 111, 10.0.0.1:2379)")
    outage.fail("cannot connect (errno 113, 10.0.0.2:2379)")
    outage.fail("cannot connect (timeout after 5 s)")
    assert len(records(caplog)) == 1


def test_different_failure_logs_again(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.fail("connection refused")
    outage.fail("connection refused")
    outage.fail("permission denied")
    outage.fail("permission denied")
    recs = records(caplog)
    assert len(recs) == 2
    assert "permission denied" in recs[1].getMessage()


def test_failure_level_is_used(outage: OutageLog, caplog: pytest.LogCaptureFixture) -> None:
    outage.fail("out of subnets", logging.ERROR)
    assert [r.levelno for r in records(caplog)] == [logging.ERROR]


def test_ok_after_failures_logs_recovered_once(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.fail("connection refused")
    outage.fail("connection refused")
    outage.fail("connection refused")
    caplog.clear()
    outage.ok()
    outage.ok()
    recs = records(caplog)
    assert len(recs) == 1
    assert recs[0].levelno == logging.INFO
    assert "recovered" in recs[0].getMessage()
    assert "3" in recs[0].getMessage()
    assert outage.failing is None
    assert outage.failures == 0


def test_ok_when_not_failing_logs_nothing(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.ok()
    outage.ok()
    assert records(caplog) == []


def test_fail_after_recovery_logs_again(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.fail("connection refused")
    outage.ok()
    outage.fail("connection refused")
    msgs = [r.getMessage() for r in records(caplog)]
    assert len(msgs) == 3
    assert "recovered" in msgs[1]
    assert "connection refused" in msgs[2]


def test_failures_differing_in_trailing_address_log_once(
    outage: OutageLog, caplog: pytest.LogCaptureFixture
) -> None:
    outage.fail("etcd unavailable: 10.0.0.1:2379 connection refused")
    outage.fail("etcd unavailable: 10.0.0.2:2379 deadline exceeded")
    assert len(records(caplog)) == 1
