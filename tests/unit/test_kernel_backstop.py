"""Unit tests for the backstop resync's full read without a second copy of the kernel's
tables: `diff_entries` (no per-key lists) finds exactly the changes the diff over every
key found before; a full read through KernelView and KernelSync repairs any drift exactly
as the plain diff of the dumped lists would, while the cache ends up holding the desired
entries themselves; and `Rtnl.dump` passes each part of a dump through `known` before it
reads the next."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.kernel.diff import Diff, diff_entries, diff_keys
from backends.kernel.fake import FakeNetlink
from backends.kernel.monitor import Desired
from backends.kernel.netlink import IPRouteNetlink
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Entry, Fdb, KernelError, Neigh, Route
from backends.kernel.view import KernelView
from tests.support.fake_rtnl import FakeRtnlSocket

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
DEV, EXT = 7, 2
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def reference_diff(desired: Mapping[Any, T], actual: Iterable[T], key: Callable[[T], Any],
                   owned: Callable[[T], bool]) -> Diff[T]:
    """diff_entries as it was: a list per key, the diff over every key of either side."""
    have: dict[Any, list[T]] = {}
    for item in actual:
        have.setdefault(key(item), []).append(item)
    return diff_keys(desired, desired.keys() | have.keys(), lambda k: have.get(k, []), owned)


# Small universes, so that keys collide, entries differ under one key and repeat.
nets = st.sampled_from([NET(f"10.5.{i}.0/24") for i in range(6)] + [NET("10.5.0.0/16")])
ips = st.sampled_from([IP(f"10.5.{i}.0") for i in range(6)])
macs = st.sampled_from([f"0a:00:00:00:00:{i:02x}" for i in range(6)])
routes = st.builds(Route, nets, st.one_of(st.none(), ips), st.sampled_from([DEV, EXT]),
                   st.booleans())
neighs = st.builds(Neigh, ips, macs, st.just(DEV))
fdbs = st.builds(Fdb, macs, ips, st.just(DEV))


def copy(e: T) -> T:
    """An equal entry that is not the same object (as a dump decodes it)."""
    return replace(e)  # type: ignore[type-var]


@given(st.lists(routes, max_size=8), st.lists(routes, max_size=12),
       st.sets(st.sampled_from([DEV, EXT])))
def test_diff_entries_equals_the_diff_over_every_key_for_routes(
        want: list[Route], actual: list[Route], owned_oifs: set[int]) -> None:
    desired = {r.dst: r for r in want}
    actual = actual + [copy(r) for r in want[::2]]  # some equal to the desired ones

    def owned(r: Route) -> bool:
        return r.oif in owned_oifs

    key: Callable[[Route], NET] = lambda r: r.dst  # noqa: E731
    assert diff_entries(desired, actual, key, owned) == reference_diff(
        desired, actual, key, owned)


@given(st.lists(neighs, max_size=8), st.lists(neighs, max_size=12),
       st.lists(fdbs, max_size=8), st.lists(fdbs, max_size=12), st.booleans())
def test_diff_entries_equals_the_diff_over_every_key_for_neighbours_and_fdb(
        want_n: list[Neigh], have_n: list[Neigh], want_f: list[Fdb], have_f: list[Fdb],
        own: bool) -> None:
    dn = {n.ip: n for n in want_n}
    df = {f.mac: f for f in want_f}

    def owned(e: object) -> bool:
        return own

    nkey: Callable[[Neigh], IP] = lambda n: n.ip  # noqa: E731
    fkey: Callable[[Fdb], str] = lambda f: f.mac  # noqa: E731
    assert diff_entries(dn, have_n, nkey, owned) == reference_diff(dn, have_n, nkey, owned)
    assert diff_entries(df, have_f, fkey, owned) == reference_diff(df, have_f, fkey, owned)


def test_diff_entries_sorts_changes_by_key_and_keeps_a_keys_entries_in_order() -> None:
    a, b = Route(NET("10.5.2.0/24"), IP("10.5.2.1"), DEV), Route(NET("10.5.2.0/24"), None, DEV)
    c = Route(NET("10.5.10.0/24"), None, DEV)
    d = diff_entries({c.dst: c}, [b, c, a], lambda r: r.dst, lambda r: True)
    # 10.5.2.0 before 10.5.10.0 (as numbers, not as text); b before a, as dumped.
    assert d == Diff((), (b, a))
    d = diff_entries({a.dst: a, NET("10.5.1.0/24"): c}, [b, a], lambda r: r.dst,
                     lambda r: True)
    assert d == Diff((c, a), (b,))


# -- a full read through KernelView and KernelSync ----------------------------------------
def owned_route(r: Route) -> bool:
    return r.oif == DEV


def full_plan(sync_: Callable[[], KernelSync], want: dict[str, dict[Any, Any]]
              ) -> Callable[[], Any]:
    """The routed backends' full plan (backends/routed.py): desired tables set, then the
    view's reads of both route devices, the neighbours and the FDB, diffed in full."""
    async def plan() -> ChangeSet:
        ks = sync_()
        ks.desired = Desired(want["route"], owned_route, DEV, want["neigh"], want["fdb"],
                             {DEV: "flannel.1", EXT: "eth0"})
        view = ks.view
        actual = await view.routes(DEV) + await view.routes(EXT)
        rd = diff_entries(want["route"], actual, lambda r: r.dst, owned_route)
        nd = diff_entries(want["neigh"], await view.neighbours(DEV), lambda n: n.ip,
                          lambda n: True)
        fd = diff_entries(want["fdb"], await view.fdb_entries(DEV), lambda f: f.mac,
                          lambda f: True)
        return ChangeSet(list(rd.replace), list(rd.delete), list(nd.replace),
                         list(nd.delete), list(fd.replace), list(fd.delete))
    return plan


def reference_changes(fake: FakeNetlink, want: dict[str, dict[Any, Any]]) -> ChangeSet:
    """What the plain diff of the fake's dumped lists asks for."""
    actual = [r for r in fake.table.values() if r.oif in (DEV, EXT)]
    rd = reference_diff(want["route"], actual, lambda r: r.dst, owned_route)
    nd = reference_diff(want["neigh"], [n for n in fake.neigh if n.index == DEV],
                        lambda n: n.ip, lambda n: True)
    fd = reference_diff(want["fdb"], [f for f in fake.fdb if f.index == DEV],
                        lambda f: f.mac, lambda f: True)
    return ChangeSet(list(rd.replace), list(rd.delete), list(nd.replace), list(nd.delete),
                     list(fd.replace), list(fd.delete))


class RecordingFake(FakeNetlink):
    def __init__(self) -> None:
        super().__init__()
        self.applied: list[ChangeSet] = []

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        self.applied.append(cs)
        return await super().apply(cs)


@st.composite
def drifted_kernels(draw: st.DrawFn) -> tuple[dict[str, dict[Any, Any]], list[Entry]]:
    """Desired tables, and what the kernel holds: for each desired entry an equal copy,
    nothing, or another entry under its key; plus entries of nobody's (owned or not)."""
    want: dict[str, dict[Any, Any]] = {"route": {}, "neigh": {}, "fdb": {}}
    kernel: list[Entry] = []
    for i in range(draw(st.integers(0, 12))):
        net = NET(f"10.6.{i}.0/24")
        mac = f"0a:00:00:00:01:{i:02x}"
        entries: list[Entry] = [Route(net, net.network_address, DEV, True),
                                Neigh(net.network_address, mac, DEV),
                                Fdb(mac, IP(f"192.168.100.{i + 1}"), DEV)]
        for e in entries:
            kind = "route" if isinstance(e, Route) else "neigh" if isinstance(e, Neigh) else "fdb"
            want[kind][e.dst if isinstance(e, Route) else e.ip if isinstance(e, Neigh)
                       else e.mac] = e
            fate = draw(st.sampled_from(["same", "same", "missing", "other"]))
            if fate == "same":
                kernel.append(copy(e))
            elif fate == "other":
                if isinstance(e, Route):
                    kernel.append(Route(e.dst, None, draw(st.sampled_from([DEV, EXT]))))
                elif isinstance(e, Neigh):
                    kernel.append(Neigh(e.ip, "0a:ff:00:00:00:01", DEV))
                else:
                    kernel.append(Fdb(e.mac, IP("192.168.100.250"), DEV))
    kernel += draw(st.lists(st.builds(Route, nets, st.just(None), st.sampled_from([DEV, EXT])),
                            max_size=4))
    kernel += draw(st.lists(neighs, max_size=3)) + draw(st.lists(fdbs, max_size=3))
    return want, kernel


def load(fake: FakeNetlink, kernel: list[Entry]) -> None:
    for e in kernel:
        if isinstance(e, Route):
            fake.table[e.dst] = e
        elif isinstance(e, Neigh):
            fake.neigh = {n for n in fake.neigh if (n.ip, n.index) != (e.ip, e.index)} | {e}
        else:
            fake.fdb = {f for f in fake.fdb if (f.mac, f.index) != (e.mac, e.index)} | {e}


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(drifted_kernels())
async def test_a_full_read_repairs_drift_exactly_as_the_plain_diff_and_keeps_no_copy(
        case: tuple[dict[str, dict[Any, Any]], list[Entry]]) -> None:
    want, kernel = case
    fake = RecordingFake()
    load(fake, kernel)
    expected = reference_changes(fake, want)
    foreign_routes = {r for r in fake.table.values() if r.oif == EXT
                      and r.dst not in want["route"]}
    ks: KernelSync | None = None
    ks = KernelSync(fake, full_plan(lambda: ks, want), 3600.0)  # type: ignore[arg-type]
    ks.view.enabled = True  # as while the monitor runs: the read is kept
    changed = await ks.sync()
    assert changed == bool(expected)
    assert fake.applied == ([expected] if expected else [])
    # The kernel now holds what is desired, and of the rest only routes tweed does not own.
    assert set(fake.table.values()) == set(want["route"].values()) | foreign_routes
    assert fake.neigh == set(want["neigh"].values())
    assert fake.fdb == set(want["fdb"].values())
    # The cache holds the desired entries themselves, not the copies the dump returned.
    for dst, r in want["route"].items():
        got = ks.view.cached_routes(DEV, dst)
        assert got is not None and [x for x in got if x == r] in ([], [r])
        assert all(x is r for x in got if x == r)
    for ip, n in want["neigh"].items():
        cached_n = ks.view.cached_neighbours(DEV, ip)
        assert cached_n is not None and len(cached_n) == 1 and cached_n[0] is n
    for mac, f in want["fdb"].items():
        cached_f = ks.view.cached_fdb(DEV, mac)
        assert cached_f is not None and len(cached_f) == 1 and cached_f[0] is f
    # A second full read (the backstop) finds nothing to do.
    ks.view.invalidate()
    assert await ks.sync() is False


async def test_without_a_desired_table_the_read_keeps_what_was_dumped() -> None:
    fake = FakeNetlink()
    r = Route(NET("10.6.1.0/24"), None, DEV)
    fake.table[r.dst] = r
    view = KernelView(fake, enabled=True)
    view.known = lambda e: e
    assert await view.routes(DEV) == [r]
    ks = KernelSync(fake, lambda: None, 1.0)  # type: ignore[arg-type,return-value]
    assert ks.view.known is not None and ks.view.known(r) is r  # no desired tables yet


# -- the real adapter: part by part -------------------------------------------------------
async def test_rtnl_dump_passes_each_part_through_known_before_reading_the_next() -> None:
    sock = FakeRtnlSocket(recv_chunk=2048)
    nl = IPRouteNetlink(lambda: sock)
    want = {}
    cs = ChangeSet()
    for i in range(300):
        net = NET(((10 << 24) | (7 << 16) | (i << 8), 24)) if i < 256 else NET(
            ((10 << 24) | (8 << 16) | ((i - 256) << 8), 24))
        r = Route(net, net.network_address, DEV, True)
        want[net] = r
        cs.route_replace.append(copy(r))
    odd = Route(NET("10.9.0.0/24"), None, DEV)
    cs.route_replace.append(odd)
    try:
        assert await nl.apply(cs) == []
        events: list[str] = []
        recv = sock.recv_into

        def counted_recv(buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
            events.append("recv")
            return recv(buffer, nbytes, flags)

        sock.recv_into = counted_recv  # type: ignore[method-assign]

        def known(e: Entry) -> Entry:
            events.append("known")
            w = want.get(e.dst) if isinstance(e, Route) else None
            return w if w is not None and w == e else e

        got = await nl.dump("route", DEV, known)
    finally:
        await nl.close()
    assert sorted(got) == sorted([*want.values(), odd])
    assert all(r is want[r.dst] for r in got if r.dst in want)
    assert events.count("known") == 301
    # Several parts, and entries of the first handed to `known` before the last was read.
    assert events.count("recv") > 2
    assert events.index("known") < len(events) - 1 - events[::-1].index("recv")


async def test_the_view_reads_through_the_adapters_shared_dump() -> None:
    sock = FakeRtnlSocket()
    nl = IPRouteNetlink(lambda: sock)
    r = Route(NET("10.7.1.0/24"), IP("10.7.1.0"), DEV, True)
    n = Neigh(IP("10.7.1.0"), "0a:00:00:00:02:01", DEV)
    f = Fdb(n.mac, IP("192.168.100.2"), DEV)
    try:
        await nl.apply(ChangeSet([copy(r)], [], [copy(n)], [], [copy(f)], []))
        view = KernelView(nl, enabled=True)
        mine: dict[object, Entry] = {r.dst: r, n.ip: n, f.mac: f}
        view.known = lambda e: mine.get(
            e.dst if isinstance(e, Route) else e.ip if isinstance(e, Neigh) else e.mac, e)
        assert [x is r for x in await view.routes(DEV)] == [True]
        assert [x is n for x in await view.neighbours(DEV)] == [True]
        assert [x is f for x in await view.fdb_entries(DEV)] == [True]
        assert view.dumps == {"route": 1, "neigh": 1, "fdb": 1}
    finally:
        await nl.close()


# -- between full reads: the cache takes the plan's entries as the plan looks them up ----
async def test_a_lookup_hands_the_cache_the_plans_own_entry_and_key() -> None:
    """A peer that left and came back (or changed) has new entries in the plan's tables,
    equal to the kernel's: the lookup of its key makes the cache keep the plan's entry and
    key, so no copy of a churned peer stays alive until the next full read."""
    old_r = Route(NET("10.6.1.0/24"), IP("10.6.1.0"), DEV, True)
    old_n = Neigh(IP("10.6.1.0"), "0a:00:00:00:01:01", DEV)
    old_f = Fdb("0a:00:00:00:01:01", IP("192.168.100.2"), DEV)
    fake = FakeNetlink()
    load(fake, [old_r, old_n, old_f])
    view = KernelView(fake, enabled=True)
    mine: dict[object, Entry] = {}

    def known(e: Entry) -> Entry:  # as KernelSync's: the plan's entry only when equal
        w = mine.get(e.dst if isinstance(e, Route) else e.ip if isinstance(e, Neigh) else e.mac)
        return w if w is not None and w == e else e

    view.known = known
    assert await view.routes(DEV) == [old_r] and await view.neighbours(DEV) == [old_n]
    assert await view.fdb_entries(DEV) == [old_f]
    mac = "".join(list(old_f.mac))  # equal, and another object (as a new lease's)
    assert mac is not old_f.mac
    new_r, new_n, new_f = (Route(NET("10.6.1.0/24"), IP("10.6.1.0"), DEV, True),
                           Neigh(IP("10.6.1.0"), mac, DEV), Fdb(mac, IP("192.168.100.2"), DEV))
    mine.update({new_r.dst: new_r, new_n.ip: new_n, new_f.mac: new_f})
    got_r = view.cached_routes(DEV, old_r.dst)
    got_n = view.cached_neighbours(DEV, old_n.ip)
    got_f = view.cached_fdb(DEV, old_f.mac)
    assert got_r is not None and len(got_r) == 1 and got_r[0] is new_r
    assert got_n is not None and len(got_n) == 1 and got_n[0] is new_n
    assert got_f is not None and len(got_f) == 1 and got_f[0] is new_f
    # The keys are the plan's too (an assignment to a present key keeps the old key).
    assert [k is new_r.dst for k in view._routes[DEV]] == [True]
    assert [k is new_n.ip for k in view._neigh[DEV]] == [True]
    assert [k is new_f.mac for k in view._fdb[DEV]] == [True]
    assert view.dumps == {"route": 1, "neigh": 1, "fdb": 1}  # lookups, not reads
    # A different entry is left as the kernel holds it: only equal ones are shared.
    mine[new_n.ip] = Neigh(new_n.ip, "0a:00:00:00:09:09", DEV)
    assert view.cached_neighbours(DEV, new_n.ip) == [new_n]


def test_an_applied_replace_keeps_the_new_entrys_key() -> None:
    view = KernelView(FakeNetlink(), enabled=True)
    a = Neigh(IP("10.6.2.0"), "0a:00:00:00:02:01", DEV)
    b = Neigh(IP("10.6.2.0"), "0a:00:00:00:02:02", DEV)
    f1 = Fdb("0a:00:00:00:02:01", IP("192.168.100.2"), DEV)
    f2 = Fdb("".join(list(f1.mac)), IP("192.168.100.3"), DEV)
    view._neigh[DEV] = {a.ip: a}
    view._fdb[DEV] = {f1.mac: f1}
    view.applied(ChangeSet(neigh_replace=[b], fdb_replace=[f2]), [])
    assert [k is b.ip for k in view._neigh[DEV]] == [True]
    assert [k is f2.mac for k in view._fdb[DEV]] == [True]
    assert view.cached_neighbours(DEV, a.ip) == [b] and view.cached_fdb(DEV, f1.mac) == [f2]
