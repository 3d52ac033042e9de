"""Unit tests for backends.kernel.view.KernelView on FakeNetlink: after any sequence of
applies and invalidations the cached reads equal the fake's real state (a route moved
between devices, a refused change, a delete of something already gone), and KernelSync
dumps the kernel only on the first sync, on drift, lost notifications, the backstop period
and errors."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

import pytest

from backends.kernel.diff import diff_entries, diff_routes
from backends.kernel.fake import FakeNetlink
from backends.kernel.monitor import Desired, KernelEvent
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Fdb, Neigh, Route
from backends.kernel.view import KernelView
from tests.support.wait import until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
DEV, EXT = 7, 2


class CountingFake(FakeNetlink):
    """FakeNetlink that counts the real reads (dumps) made of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def routes(self, oif: int | None = None) -> list[Route]:
        self.reads += 1
        return await super().routes(oif)

    async def neighbours(self, index: int) -> list[Neigh]:
        self.reads += 1
        return await super().neighbours(index)

    async def fdb_entries(self, index: int) -> list[Fdb]:
        self.reads += 1
        return await super().fdb_entries(index)


def route(n: int, oif: int = DEV) -> Route:
    return Route(NET(f"10.5.{n}.0/24"), IP(f"10.5.{n}.0"), oif, onlink=True)


def neigh(n: int, mac: int | None = None) -> Neigh:
    return Neigh(IP(f"10.5.{n}.0"), f"0a:00:00:00:00:{mac if mac is not None else n:02x}", DEV)


def fdb(n: int, dst: int | None = None) -> Fdb:
    return Fdb(f"0a:00:00:00:00:{n:02x}", IP(f"192.168.100.{dst or n}"), DEV)


async def same(view: KernelView, fake: FakeNetlink) -> None:
    """The view's reads (cached or not) equal the fake's real state, device by device."""
    real = FakeNetlink  # the fake's own reads: not counted
    for oif in (DEV, EXT):
        assert sorted(await view.routes(oif)) == sorted(await real.routes(fake, oif))
    assert sorted(await view.neighbours(DEV)) == await real.neighbours(fake, DEV)
    assert sorted(await view.fdb_entries(DEV)) == await real.fdb_entries(fake, DEV)


async def step(view: KernelView, fake: FakeNetlink, cs: ChangeSet) -> None:
    view.applied(cs, await fake.apply(cs))
    await same(view, fake)


async def test_applies_keep_the_cache_equal_to_the_kernel() -> None:
    fake = CountingFake()
    view = KernelView(fake, enabled=True)
    await step(view, fake, ChangeSet(
        route_replace=[route(1), route(2), route(3, EXT)], neigh_replace=[neigh(1), neigh(2)],
        fdb_replace=[fdb(1), fdb(2)]))
    reads = fake.reads
    # A route moved to the other device (replace keys on the destination), a neighbour and
    # an FDB entry changed in place, a delete of something already gone.
    await step(view, fake, ChangeSet(
        route_replace=[route(1, EXT), route(3)], neigh_replace=[neigh(2, mac=9)],
        fdb_replace=[fdb(2, dst=9)], route_delete=[route(8)], neigh_delete=[neigh(8)],
        fdb_delete=[fdb(8)]))
    await step(view, fake, ChangeSet(
        route_delete=[route(2)], neigh_delete=[neigh(1)], fdb_delete=[fdb(1)]))
    assert fake.reads == reads  # all of it from the cache
    assert view.hits > 0 and sorted(fake.table) == [route(1).dst, route(3).dst]
    assert fake.table[route(1).dst].oif == EXT


async def test_a_refused_change_drops_that_device_only() -> None:
    fake = CountingFake()
    view = KernelView(fake, enabled=True)
    await step(view, fake, ChangeSet(route_replace=[route(1), route(2, EXT)],
                                     neigh_replace=[neigh(1)], fdb_replace=[fdb(1)]))
    fake.fail = lambda op, item: "EPERM (1): no" if item == route(3) else None
    reads = fake.reads
    await step(view, fake, ChangeSet(route_replace=[route(3)], neigh_replace=[neigh(3)]))
    assert fake.reads == reads + 1  # the routes of DEV were read again, nothing else
    assert route(3) not in await view.routes(DEV)


async def test_invalidate_forgets_and_a_disabled_view_never_keeps() -> None:
    fake = CountingFake()
    view = KernelView(fake, enabled=True)
    await same(view, fake)
    reads = fake.reads
    fake.table[route(5).dst] = route(5)  # behind the cache's back (drift)
    view.invalidate()
    await same(view, fake)
    assert fake.reads == 2 * reads
    off = KernelView(fake)
    await same(off, fake)
    await same(off, fake)
    assert fake.reads == 4 * reads and off.hits == 0 and view.hits == 0


async def test_a_dump_overtaken_by_an_invalidation_is_not_kept() -> None:
    fake = CountingFake()
    view = KernelView(fake, enabled=True)
    real = fake.routes

    async def slow(oif: int | None = None) -> list[Route]:
        got = await real(oif)
        view.invalidate()  # drift reported while the dump was under way
        return got

    fake.routes = slow  # type: ignore[method-assign]
    await view.routes(DEV)
    fake.routes = real  # type: ignore[method-assign]
    reads = fake.reads
    await view.routes(DEV)
    assert fake.reads == reads + 1


def planner(fake: FakeNetlink, want: dict[int, Route]) -> Callable[[KernelSync], object]:
    """A vxlan-like plan over `sync.view`: routes, neighbours and FDB entries of DEV."""

    def make(sync: KernelSync) -> object:
        async def plan() -> ChangeSet:
            routes = {r.dst: r for r in want.values()}
            neighs = {IP(f"10.5.{n}.0"): neigh(n) for n in want}
            fdbs = {fdb(n).mac: fdb(n) for n in want}
            sync.desired = Desired(routes, lambda r: r.oif == DEV, DEV, neighs, fdbs,
                                   {DEV: "flannel.1"})
            rd = diff_routes(routes, await sync.view.routes(DEV), lambda r: r.oif == DEV)
            nd = diff_entries(neighs, await sync.view.neighbours(DEV), lambda n: n.ip,
                              lambda n: True)
            fd = diff_entries(fdbs, await sync.view.fdb_entries(DEV), lambda f: f.mac,
                              lambda f: True)
            return ChangeSet(list(rd.replace), list(rd.delete), list(nd.replace),
                             list(nd.delete), list(fd.replace), list(fd.delete))
        return plan
    return make


class QuietMonitor:
    def start(self) -> None:
        return None

    def close(self) -> None:
        return None


async def running(fake: CountingFake, want: dict[int, Route], resync: float = 3600.0,
                  ) -> tuple[KernelSync, asyncio.Task[None]]:
    sync = KernelSync(fake, lambda: asyncio.sleep(0, ChangeSet()), resync, debounce=0.0)
    sync.plan = planner(fake, want)(sync)  # type: ignore[assignment]
    await sync.sync()  # the start, before the monitor: a real read
    sync.watch(lambda on_events, on_lost: QuietMonitor())
    task = asyncio.create_task(sync.run())
    await asyncio.sleep(0)
    assert sync.view.enabled
    return sync, task


async def resynced(sync: KernelSync, before: int) -> None:
    await until(lambda: sum(sync.resyncs.values()) != before, what="a resync")


async def test_batch_syncs_read_the_kernel_once_then_only_on_drift_lost_and_errors() -> None:
    fake = CountingFake()
    want = {n: route(n) for n in range(1, 4)}
    sync, task = await running(fake, want)
    try:
        await sync.sync()  # the first with the monitor running: a real read, then kept
        reads = fake.reads
        for n in range(4, 8):  # batches of peer changes: no dump
            want[n] = route(n)
            assert await sync.sync() is True
        del want[1]
        assert await sync.sync() is True
        assert fake.reads == reads
        assert sorted(fake.table) == sorted(r.dst for r in want.values())

        # Drift: a desired route deleted by hand; the resync reads and repairs it.
        fake.table.pop(route(2).dst)
        before = sum(sync.resyncs.values())
        sync.notify([KernelEvent("del", route(2))])
        await resynced(sync, before)
        assert fake.reads == reads + 3 and route(2).dst in fake.table
        # An echo of our own write is no drift: no read.
        sync.notify([KernelEvent("new", route(2))])
        assert await sync.sync() is False and fake.reads == reads + 3

        # Lost notifications: a real read.
        before = sum(sync.resyncs.values())
        sync.overflow()
        await resynced(sync, before)
        assert fake.reads == reads + 6

        # An exception from the kernel: the next sync reads again.
        async def broken(cs: ChangeSet) -> list[object]:
            raise OSError(105, "ENOBUFS")

        real = fake.apply
        fake.apply = broken  # type: ignore[assignment,method-assign]
        want[9] = route(9)
        with pytest.raises(OSError):
            await sync.sync()
        fake.apply = real  # type: ignore[method-assign]
        assert await sync.sync() is True and fake.reads == reads + 9
        assert sync.ready()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not sync.view.enabled


async def test_the_backstop_period_reads_the_kernel() -> None:
    fake = CountingFake()
    sync, task = await running(fake, {1: route(1)}, resync=0.05)
    try:
        await sync.sync()
        reads = fake.reads
        fake.neigh.clear()  # drift nobody was told of: only the backstop can find it
        await resynced(sync, sum(sync.resyncs.values()))
        assert fake.reads > reads and fake.neigh == {neigh(1)}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_monitor_every_sync_reads() -> None:
    fake = CountingFake()
    sync = KernelSync(fake, lambda: asyncio.sleep(0, ChangeSet()), 3600.0)
    sync.plan = planner(fake, {1: route(1)})(sync)  # type: ignore[assignment]
    await sync.sync()
    reads = fake.reads
    await sync.sync()
    assert fake.reads == 2 * reads


async def test_several_entries_under_one_key_are_kept_and_removed_one_by_one() -> None:
    """The real kernel can hold two routes to one destination on a device (other metrics)
    and two FDB entries for one MAC (other VTEPs); the cache keeps both, drops them one at
    a time, and a replace leaves only the new one."""
    two_routes = [route(1), Route(NET("10.5.1.0/24"), IP("10.5.1.9"), DEV, onlink=True)]
    two_fdb = [fdb(1, 11), fdb(1, 12)]

    class Doubled(FakeNetlink):
        async def routes(self, oif: int | None = None) -> list[Route]:
            return list(two_routes) if oif == DEV else []

        async def fdb_entries(self, index: int) -> list[Fdb]:
            return list(two_fdb)

    view = KernelView(Doubled(), enabled=True)
    assert await view.routes(DEV) == two_routes and view.dumps["route"] == 1
    assert await view.fdb_entries(DEV) == two_fdb
    assert view.cached_routes(DEV, NET("10.5.1.0/24")) == two_routes
    assert view.cached_fdb(DEV, fdb(1).mac) == two_fdb
    view.applied(ChangeSet(route_delete=[two_routes[0]], fdb_delete=[two_fdb[1]]), [])
    assert await view.routes(DEV) == [two_routes[1]] and view.dumps["route"] == 1
    assert await view.fdb_entries(DEV) == [two_fdb[0]]
    view.applied(ChangeSet(route_delete=[two_routes[1]]), [])
    assert view.cached_routes(DEV, NET("10.5.1.0/24")) == []
    view.applied(ChangeSet(fdb_replace=[fdb(1, 13)]), [])
    assert view.cached_fdb(DEV, fdb(1).mac) == [fdb(1, 13)]
    assert view.cached_routes(EXT, NET("10.5.1.0/24")) is None  # never read: not cached
