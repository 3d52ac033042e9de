"""Unit tests for backends.kernel.sync.KernelSync on FakeNetlink: the order changes are
applied in, the log line per change and per refused change (word for word), the counters."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from backends.kernel.fake import FakeNetlink
from backends.kernel.sync import KernelSync, describe
from backends.kernel.types import ChangeSet, Fdb, Neigh, Route

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


async def test_sync_applies_in_order_logs_each_change_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    cs = everything()

    async def plan() -> ChangeSet:
        return cs

    sync = KernelSync(fake, plan, 10.0)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
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
    ]
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

    sync = KernelSync(fake, plan, 10.0)
    with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
        await sync.sync()
        await sync.sync()
    assert caplog.messages == [
        "set route 10.5.2.0/24 via 192.168.100.2 oif 2",
        "cannot replace neigh 10.5.3.0 lladdr 0a:00:00:00:00:03 dev 7: EPERM (1): no",
        "set route 10.5.2.0/24 via 192.168.100.2 oif 2",
    ]
    assert sync.errors == 2
    assert sync.ops[("neigh", "replace", "error")] == 2
    assert sync.ops[("route", "replace", "ok")] == 2
    assert sync.ready() is False
