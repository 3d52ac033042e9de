"""Unit tests for backends.kernel.sync.KernelSync on FakeNetlink: the order changes are
applied in, the one INFO line per sync and the DEBUG line per change and the ERROR line per
refused change (word for word), the counters, a refused change retried."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from backends.kernel.fake import FakeNetlink
from backends.kernel.sync import KernelSync, describe, summary
from backends.kernel.types import ChangeSet, Fdb, Neigh, Route
from tests.support.wait import until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
ROUTE_GW = Route(NET("10.5.2.0/24"), IP("192.168.100.2"), 2)
ROUTE_ONLINK = Route(NET("10.5.3.0/24"), IP("10.5.3.0"), 7, onlink=True)
ROUTE_DEV = Route(NET("10.5.0.0/16"), None, 9)
NEIGH = Neigh(IP("10.5.3.0"), "0a:00:00:00:00:03", 7)
FDB = Fdb("0a:00:00:00:00:03", IP("192.168.100.3"), 7)


def test_describe_each_kind() -> None:
    assert describe(ROUTE_GW) == "route 10.5.2.0/24 via 192.168.100.2 oif 2"
    assert describe(ROUTE_ONLINK) == "route 10.5.3.0/24 via 10.5.3.0 oif 7 onlink"
    assert describe(ROUTE_DEV) == "route 10.5.0.0/16 oif 9"
    assert describe(NEIGH) == "neigh 10.5.3.0 lladdr 0a:00:00:00:00:03 dev 7"
    assert describe(FDB) == "fdb 0a:00:00:00:00:03 dst 192.168.100.3 dev 7"


def everything() -> ChangeSet:
    return ChangeSet(
        route_replace=[ROUTE_ONLINK], route_delete=[ROUTE_GW], neigh_replace=[NEIGH],
        neigh_delete=[Neigh(IP("10.5.4.0"), "0a:00:00:00:00:04", 7)],
        fdb_replace=[FDB], fdb_delete=[Fdb("0a:00:00:00:00:04", IP("192.168.100.4"), 7)],
    )


def test_steps_order_routes_deleted_first_and_added_last() -> None:
    assert [(what, op) for what, op, _ in everything().steps()] == [
        ("route", "delete"), ("neigh", "delete"), ("fdb", "delete"),
        ("fdb", "replace"), ("neigh", "replace"), ("route", "replace"),
    ]
    assert [list(items) for _, _, items in ChangeSet().steps()] == [[]] * 6


def test_summary_counts_each_kind_and_op() -> None:
    assert summary({("route", "replace"): 5000, ("neigh", "replace"): 5000,
                    ("fdb", "replace"): 5000}) == (
        "kernel: set 5000 routes, 5000 neighbours, 5000 fdb entries; removed 0")
    assert summary({("route", "replace"): 1, ("neigh", "delete"): 2,
                    ("fdb", "delete"): 1}) == (
        "kernel: set 1 route; removed 2 neighbours, 1 fdb entry")
    assert summary({}) == "kernel: set 0; removed 0"


async def test_sync_applies_in_order_logs_each_change_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    cs = everything()

    async def plan() -> ChangeSet:
        return cs

    sync = KernelSync(fake, plan, 10.0, log_every=0.0)
    with caplog.at_level(logging.DEBUG, logger="backends.kernel.sync"):
        assert await sync.sync() is True
    assert [item for _, item in fake.calls] == [
        ROUTE_GW, cs.neigh_delete[0], cs.fdb_delete[0], FDB, NEIGH, ROUTE_ONLINK]
    assert [op for op, _ in fake.calls] == ["delete"] * 3 + ["replace"] * 3
    assert caplog.messages == [
        "removed route 10.5.2.0/24 via 192.168.100.2 oif 2",
        "removed neigh 10.5.4.0 lladdr 0a:00:00:00:00:04 dev 7",
        "removed fdb 0a:00:00:00:00:04 dst 192.168.100.4 dev 7",
        "set fdb 0a:00:00:00:00:03 dst 192.168.100.3 dev 7",
        "set neigh 10.5.3.0 lladdr 0a:00:00:00:00:03 dev 7",
        "set route 10.5.3.0/24 via 10.5.3.0 oif 7 onlink",
        "kernel: set 1 route, 1 neighbour, 1 fdb entry; removed 1 route, 1 neighbour, "
        "1 fdb entry",
    ]
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] * 6 + [logging.INFO]
    assert sync.ready() is True
    assert fake.table == {ROUTE_ONLINK.dst: ROUTE_ONLINK}
    assert fake.neigh == {NEIGH} and fake.fdb == {FDB}
    assert sum(sync.ops.values()) == 6
    assert all(sync.ops[(what, op, "ok")] == 1 for what, op, _ in cs.steps())


async def test_refused_change_logged_once_per_error_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    fake.fail = lambda op, item: "EPERM (1): no" if item == NEIGH else None

    async def plan() -> ChangeSet:
        return ChangeSet(neigh_replace=[NEIGH], route_replace=[ROUTE_GW])

    sync = KernelSync(fake, plan, 10.0, log_every=0.0)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
        await sync.sync()
        await sync.sync()
    assert caplog.messages == [
        "kernel: set 1 route; removed 0",
        "cannot replace neigh 10.5.3.0 lladdr 0a:00:00:00:00:03 dev 7: EPERM (1): no",
        "kernel: set 1 route; removed 0",
    ]
    assert sync.errors == 2
    assert sync.ops[("neigh", "replace", "error")] == 2
    assert sync.ops[("route", "replace", "ok")] == 2
    assert sync.ready() is False


async def test_a_start_logs_one_info_line_not_one_per_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    cs = ChangeSet(route_replace=[Route(NET((0x0A000000 + (i << 8), 24)), None, 7)
                                  for i in range(5000)])

    async def plan() -> ChangeSet:
        return cs

    sync = KernelSync(fake, plan, 10.0, log_every=0.0)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
        await sync.sync()
    assert caplog.messages == ["kernel: set 5000 routes; removed 0"]


async def test_refused_in_the_middle_logged_once_and_retried_by_a_later_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    neigh = [Neigh(IP(f"10.5.{i}.0"), f"0a:00:00:00:00:{i:02x}", 7) for i in range(1, 6)]
    bad = neigh[2]
    refusing = True
    fake.fail = lambda op, item: "ENODEV (19): no" if refusing and item == bad else None

    async def plan() -> ChangeSet:  # what the backends do: diff against the kernel
        return ChangeSet(neigh_replace=[n for n in neigh if n not in fake.neigh])

    sync = KernelSync(fake, plan, 10.0, log_every=0.0)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
        assert await sync.sync() is True
        assert fake.neigh == set(neigh) - {bad}  # the others around it applied
        assert await sync.sync() is True  # tried again, refused again: not logged again
        refusing = False
        assert await sync.sync() is True
        assert await sync.sync() is False
    assert fake.neigh == set(neigh)
    assert [item for op, item in fake.calls] == [*neigh, bad, bad]
    assert caplog.messages == [
        "kernel: set 4 neighbours; removed 0",
        "cannot replace neigh 10.5.3.0 lladdr 0a:00:00:00:00:03 dev 7: ENODEV (19): no",
        "kernel: set 1 neighbour; removed 0",
    ]
    assert sync.errors == 2 and sync.ready() is True


async def test_changes_under_churn_are_one_info_line_per_period(caplog) -> None:
    """100 one-route syncs within a period are one INFO line now and one with the rest
    when the period ends (each sync's own line is DEBUG), not 100 lines."""
    fake = FakeNetlink()
    routes = [Route(ipaddress.IPv4Network(f"10.5.{i}.0/24"), IP("192.168.100.2"), 2)
              for i in range(100)]
    want: list[Route] = []

    async def plan() -> ChangeSet:
        return ChangeSet(route_replace=[r for r in want if r.dst not in fake.table])

    now = [0.0]
    sync = KernelSync(fake, plan, 10.0, clock=lambda: now[0], log_every=0.2)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
        for r in routes:
            want.append(r)
            assert await sync.sync() is True
            now[0] += 0.001
        assert caplog.messages == ["kernel: set 1 route; removed 0"]
        await until(lambda: len(caplog.messages) == 2, 5.0)
    assert caplog.messages[1] == "kernel: set 99 routes; removed 0 (in 99 syncs)"
    assert len(fake.table) == 100
