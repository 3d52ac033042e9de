"""Planning only what changed (backends.kernel.desired, diff_keys, RoutedNetwork._plan):
after any sequence of peer batches, drift and refused changes, a network whose plans diff
only the keys a batch touched leaves the kernel exactly as one that diffs everything on
every sync; shared keys (two peers with one VtepMAC) resolve as a rebuild does; and the
cheap plans are really the ones used while the kernel is trusted."""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs
from backends.base import BackendContext
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwNetwork
from backends.kernel.desired import DesiredTables, PeerEntries
from backends.kernel.diff import diff_entries, diff_keys, sorted_keys
from backends.kernel.fake import FakeNetlink
from backends.kernel.types import Fdb, Neigh, Route
from backends.routed import RoutedNetwork
from backends.vxlan import VxlanBackend, desired_state


@pytest.fixture(autouse=True)
def _no_removal_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals at once, as these tests expect; the grace has tests of its own
    (tests/unit/test_heal.py)."""
    monkeypatch.setattr("backends.routed.REMOVAL_GRACE", 0.0)

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
SEGMENT = NET("192.168.100.0/24")
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"), SEGMENT)
OWN = NET("10.5.1.0/24")


def route(n: int, gw: int = 9, oif: int = 7) -> Route:
    return Route(NET(f"10.5.{n}.0/24"), IP(f"192.168.100.{gw}"), oif)


# -- DesiredTables ----------------------------------------------------------------------


def entries(n: int, mac: int, pub: int = 9) -> PeerEntries:
    s = NET(f"10.5.{n}.0/24")
    m = f"0a:00:00:00:00:{mac:02x}"
    return PeerEntries(Route(s, s.network_address, 7, onlink=True),
                       Neigh(s.network_address, m, 7), Fdb(m, IP(f"192.168.100.{pub}"), 7))


def test_put_and_drop_mark_only_their_keys() -> None:
    t = DesiredTables()
    t.load([entries(2, 2), entries(3, 3)])
    t.take_dirty()
    t.put(entries(4, 4))
    t.drop(entries(2, 2))
    d = t.take_dirty()
    assert d.routes == {NET("10.5.4.0/24"), NET("10.5.2.0/24")}
    assert d.neigh == {IP("10.5.4.0"), IP("10.5.2.0")}
    assert d.fdb == {"0a:00:00:00:00:04", "0a:00:00:00:00:02"}
    assert set(t.routes) == {NET("10.5.3.0/24"), NET("10.5.4.0/24")}
    assert not t.stale
    assert t.take_dirty().routes == set()


def test_a_shared_key_makes_the_tables_stale_until_a_rebuild() -> None:
    t = DesiredTables()
    t.put(entries(2, 9, pub=2))
    t.put(entries(3, 9, pub=3))  # the same VtepMAC
    assert t.stale
    t.load([entries(2, 9, pub=2), entries(3, 9, pub=3)])
    assert not t.stale and t.fdb["0a:00:00:00:00:09"].dst == IP("192.168.100.3")
    # One of the two leaves: which one stays is a rebuild's call, not the order's.
    t.drop(entries(3, 9, pub=3))
    assert t.stale
    t.load([entries(2, 9, pub=2)])
    assert t.fdb["0a:00:00:00:00:09"].dst == IP("192.168.100.2")
    t.drop(entries(2, 9, pub=2))  # no longer shared: an ordinary drop
    assert not t.stale and t.fdb == {}


# -- diff_keys is diff_entries over the keys given --------------------------------------

routes_st = st.lists(st.builds(route, st.integers(0, 6), st.integers(1, 3),
                               st.sampled_from([2, 7])), max_size=12)


@given(want=routes_st, have=routes_st)
def test_diff_keys_over_every_key_is_diff_entries(want: list[Route], have: list[Route]) -> None:
    desired = {r.dst: r for r in want}
    owned = lambda r: r.oif == 7  # noqa: E731
    full = diff_entries(desired, have, lambda r: r.dst, owned)
    by_key: dict[NET, list[Route]] = {}
    for r in have:
        by_key.setdefault(r.dst, []).append(r)
    keys = desired.keys() | by_key.keys()
    assert diff_keys(desired, keys, lambda k: by_key.get(k, []), owned) == full


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32))))
def test_sorted_keys_is_the_natural_order(pairs: list[tuple[int, int]]) -> None:
    nets = [NET((addr >> (32 - n) << (32 - n) if n else 0, n)) for addr, n in pairs]
    assert sorted_keys(nets) == sorted(nets)
    addrs = [IP(addr) for addr, _ in pairs]
    assert sorted_keys(addrs) == sorted(addrs)
    macs = [f"{addr:012x}" for addr, _ in pairs]
    assert sorted_keys(macs) == sorted(macs)


# -- the networks: incremental against full, step by step -------------------------------

MACS = [f"0a:00:00:00:00:{n:02x}" for n in range(1, 7)] + ["bad mac"]


def event(kind: str, n: int, pub: int, mac: int, btype: str) -> PeerEvent:
    data = {"VNI": 1, "VtepMAC": MACS[mac]}
    attrs = LeaseAttrs(IP(f"192.168.100.{pub}"), None, btype, data)
    return PeerEvent(PeerEventKind(kind), PeerLease(NET(f"10.5.{n}.0/24"), attrs))


events_st = st.builds(event, st.sampled_from(["added", "added", "removed"]),
                      st.integers(1, 12), st.integers(2, 5), st.integers(0, len(MACS) - 1),
                      st.sampled_from(["vxlan", "vxlan", "vxlan", "host-gw"]))
#: One step: a batch of peer events, or a hand edit of the kernel (a deleted entry, a
#: foreign one), or a batch during which the kernel refuses one kind of change.
step_st = st.one_of(
    st.tuples(st.just("batch"), st.lists(events_st, min_size=1, max_size=6)),
    st.tuples(st.just("drift"), st.integers(0, 3)),
    st.tuples(st.just("refuse"), st.lists(events_st, min_size=1, max_size=3)),
)


def config(btype: str, direct: bool) -> Any:
    backend: dict[str, Any] = {"Type": btype}
    if direct:
        backend["DirectRouting"] = True
    return parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": backend}))


async def network(fake: FakeNetlink, tmp: Path, btype: str, direct: bool) -> RoutedNetwork:
    cfg = config(btype, direct)
    net: RoutedNetwork
    if btype == "vxlan":
        ctx = BackendContext(fake, EXT, 10.0, tmp, "subnet.env")
        net = await VxlanBackend(ctx, rng=random.Random(1)).register_network(cfg)
    else:
        net = HostGwNetwork(fake, EXT, cfg, 10.0)
    await net.setup(Lease(OWN, "10.5.1.0-24", net.lease_attrs, 5, None))
    return net


def kernel(fake: FakeNetlink) -> tuple[set[Route], set[Neigh], set[Fdb]]:
    return set(fake.table.values()), set(fake.neigh), set(fake.fdb)


def drift(fake: FakeNetlink, net: RoutedNetwork, how: int) -> None:
    """Edit the kernel behind the network's back, then report it as the monitor would
    (a notification of drift invalidates the view)."""
    if how == 0 and fake.table:
        del fake.table[sorted(fake.table)[0]]
    elif how == 1 and fake.fdb:
        fake.fdb.discard(sorted(fake.fdb)[0])
    elif how == 2:
        dst = NET("10.5.200.0/24")  # a stray peer-sized route on our device
        fake.table[dst] = Route(dst, IP("10.5.200.0"), net._route_oifs()[0], onlink=True)
    elif how == 3 and fake.neigh:
        fake.neigh.discard(sorted(fake.neigh)[0])
    net.kernel.view.invalidate()


@pytest.mark.parametrize(("btype", "direct"), [("vxlan", False), ("vxlan", True),
                                               ("host-gw", False)])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step_st, min_size=1, max_size=12))
async def test_planning_what_changed_leaves_the_kernel_as_planning_everything(
    tmp_path: Path, btype: str, direct: bool, steps: list[tuple[str, Any]]
) -> None:
    inc_fake, ref_fake = FakeNetlink(), FakeNetlink()
    inc = await network(inc_fake, tmp_path / "inc", btype, direct)
    ref = await network(ref_fake, tmp_path / "ref", btype, direct)
    inc.kernel.view.enabled = True  # as while its monitor runs: reads cached, plans trusted
    for kind, arg in steps:
        if kind == "drift":
            drift(inc_fake, inc, arg)
            drift(ref_fake, ref, arg)
            await inc.sync()
            await ref.sync()
        elif kind == "refuse":
            inc_fake.fail = lambda op, item: "refused" if isinstance(item, Route) else None
            await inc.apply(list(arg))
            inc_fake.fail = lambda op, item: None
            await ref.apply(list(arg))
            await inc.sync()  # as the resync after a refused change would
        else:
            await inc.apply(list(arg))
            await ref.apply(list(arg))
        assert kernel(inc_fake) == kernel(ref_fake)
        assert inc.peers == ref.peers


async def test_batches_while_trusted_are_planned_from_their_keys(tmp_path: Path) -> None:
    fake = FakeNetlink()
    vx = await network(fake, tmp_path, "vxlan", False)
    vx.kernel.view.enabled = True
    await vx.apply([event("added", n, 2 + n % 3, n % 6, "vxlan") for n in range(2, 8)])
    full = vx.kernel.plans["full"]
    await vx.apply([event("removed", 2, 4, 2, "vxlan")])
    await vx.apply([event("added", 9, 3, 2, "vxlan")])  # the VtepMAC 2 had, now free
    assert vx.kernel.plans["full"] == full and vx.kernel.plans["changed"] >= 2
    routes, neigh, fdb = desired_state(vx.peers, vx.dev_index, EXT, False)
    assert kernel(fake) == (set(routes.values()), set(neigh.values()), set(fdb.values()))
    # Drift makes the next plan a full one again.
    vx.kernel.view.invalidate()
    await vx.apply([event("added", 10, 3, 1, "vxlan")])
    assert vx.kernel.plans["full"] == full + 1


async def test_a_full_read_keeps_one_copy_of_each_entry(tmp_path: Path) -> None:
    """After a backstop's dump the cache holds the desired entries themselves, not equal
    copies parsed from the kernel (a second copy of everything, per backstop)."""
    fake = FakeNetlink()
    vx = await network(fake, tmp_path, "vxlan", False)
    vx.kernel.view.enabled = True
    await vx.apply([event("added", n, 2 + n % 3, n % 6, "vxlan") for n in range(2, 8)])
    # The fake returns its own objects; make them equal copies, as a dump parses anew.
    fake.table = {k: Route(r.dst, r.gateway, r.oif, r.onlink) for k, r in fake.table.items()}
    fake.neigh = {Neigh(n.ip, n.mac, n.index) for n in fake.neigh}
    fake.fdb = {Fdb(f.mac, f.dst, f.index) for f in fake.fdb}
    vx.kernel.view.invalidate()
    assert await vx.sync() is False
    view, t, dev = vx.kernel.view, vx.tables, vx.dev_index
    assert t.routes and all(view.cached_routes(dev, d) == [r] and view.cached_routes(dev, d)[0] is r
                            for d, r in t.routes.items())
    assert all(view.cached_neighbours(dev, ip)[0] is n for ip, n in t.neigh.items())
    assert all(view.cached_fdb(dev, mac)[0] is f for mac, f in t.fdb.items())
