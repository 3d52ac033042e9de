"""Kernel state that heals, without root: FakeNetlink as the kernel and a fake monitor.

A deleted vxlan device is made again (same VtepMAC, address, MTU, up) with every entry on
it, counted and logged once, and a device that keeps being deleted is not fought; routes
refused while the external interface was down come back when it is up, from its
notification or, without one, from the retry; a refused burst is one log line; no
exception of a resync (pyroute2's NetlinkError is no OSError) ends KernelSync.run; a
deleted peer lease's entries stay for a grace, so a lease deleted and leased again at once
never removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from agent.backoff import Backoff
from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwNetwork
from backends.kernel.fake import FakeNetlink, FakeNetlinkError
from backends.kernel.monitor import KernelEvent
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Fdb, Neigh, Route
from backends.routed import RoutedNetwork
from backends.vxlan import VxlanNetwork, VxlanOptions
from tests.support.wait import until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))
HOSTGW = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
VXLAN = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
OWN_MAC = "0a:00:00:00:00:01"
LOG = "backends.kernel.sync"


class FakeMonitor:
    """What `KernelSync.watch` is handed: keeps the callbacks so a test can notify."""

    made: list[FakeMonitor] = []

    def __init__(self, on_events: Callable[[list[KernelEvent]], None],
                 on_lost: Callable[[], None]) -> None:
        self.on_events, self.on_lost = on_events, on_lost
        FakeMonitor.made.append(self)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def mac(n: int) -> str:
    return f"0a:00:00:00:00:{n:02x}"


def peer(n: int, btype: str = "host-gw", kind: str = "added", public: int | None = None
         ) -> PeerEvent:
    data = {"VNI": 1, "VtepMAC": mac(n)} if btype == "vxlan" else None
    attrs = LeaseAttrs(IP(f"192.168.100.{public or n}"), None, btype, data)
    return PeerEvent(PeerEventKind(kind), PeerLease(NET(f"10.5.{n}.0/24"), attrs))


def via(n: int, public: int | None = None) -> Route:
    return Route(NET(f"10.5.{n}.0/24"), IP(f"192.168.100.{public or n}"), 2)


def vxlan_entries(n: int, dev: int) -> tuple[Route, Neigh, Fdb]:
    gw = IP(f"10.5.{n}.0")
    return (Route(NET(f"10.5.{n}.0/24"), gw, dev, onlink=True), Neigh(gw, mac(n), dev),
            Fdb(mac(n), IP(f"192.168.100.{n}"), dev))


def on_kernel(fake: FakeNetlink) -> set[Any]:
    return {*fake.table.values(), *fake.neigh, *fake.fdb}


class Rig:
    """A network on FakeNetlink with a 3600 s backstop, fast retries, its run() task and
    the fake monitor it started."""

    def __init__(self, network: RoutedNetwork, fake: FakeNetlink, peers: list[PeerEvent]
                 ) -> None:
        self.network, self.fake, self.peers = network, fake, peers
        self.kernel = network.kernel
        self.kernel.debounce = 0.01
        self.kernel.retry_backoff = Backoff(0.05, 0.1)
        self.kernel.remake_backoff = Backoff(0.3, 0.6)
        self.kernel.watch(FakeMonitor)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        await self.network.setup(Lease(NET("10.5.1.0/24"), "10.5.1.0-24",
                                       self.network.lease_attrs, 5, None))
        await self.network.apply(self.peers)
        self.task = asyncio.create_task(self.network.run())
        await asyncio.sleep(0)
        self.monitor = FakeMonitor.made[-1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        assert not self.task.done(), "KernelSync.run ended"
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def vxlan_rig() -> Rig:
    fake = FakeNetlink()
    network = VxlanNetwork(fake, EXT, VXLAN, VxlanOptions(), OWN_MAC, 3600.0)
    return Rig(network, fake, [peer(n, "vxlan") for n in (2, 3)])


def hostgw_rig(grace: float = 0.0) -> Rig:
    fake = FakeNetlink()
    network = HostGwNetwork(fake, EXT, HOSTGW, 3600.0)
    network.removal_grace = grace
    return Rig(network, fake, [peer(n) for n in range(2, 7)])


# -- a deleted device ----------------------------------------------------------------------
async def test_a_deleted_vxlan_device_is_made_again_with_every_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with vxlan_rig() as rig:
        vx = rig.network
        assert isinstance(vx, VxlanNetwork)
        old = vx.dev_index
        assert on_kernel(rig.fake) == {*vxlan_entries(2, old), *vxlan_entries(3, old)}
        with caplog.at_level(logging.INFO):
            gone = rig.fake.delete_link("flannel.1")
            assert on_kernel(rig.fake) == set()
            rig.monitor.on_events([KernelEvent("del", link=(gone, "flannel.1"))])
            await until(lambda: "flannel.1" in rig.fake.vxlan and on_kernel(rig.fake) == {
                *vxlan_entries(2, vx.dev_index), *vxlan_entries(3, vx.dev_index)}, 5.0,
                what="the device and its entries back")
        dev = rig.fake.vxlan["flannel.1"]
        assert dev.index == vx.dev_index != old
        assert (dev.spec.vni, dev.mac, dev.mtu, dev.up) == (1, OWN_MAC, 1450, True)
        assert dev.addresses == (ipaddress.IPv4Interface("10.5.1.0/32"),)
        assert rig.kernel.recreated == {("flannel.1", "ok"): 1}
        assert rig.kernel.resyncs[("device", "repaired")] == 1
        assert vx.ready()
        warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [f"device flannel.1 (index {old}) was deleted; making it again now"]
        assert any(r.message.startswith(f"vxlan device flannel.1 (index {dev.index}")
                   for r in caplog.records)


async def test_a_device_deleted_again_at_once_is_made_again_only_after_a_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with vxlan_rig() as rig:
        vx = rig.network
        for i in (1, 2):
            gone = rig.fake.delete_link("flannel.1")
            with caplog.at_level(logging.WARNING, logger=LOG):
                rig.monitor.on_events([KernelEvent("del", link=(gone, "flannel.1"))])
            if i == 2:  # deleted again 0 s after it was made: not fought at once
                assert re.search(r"making it again in \d+\.\d s \(it was deleted \d+\.\d s "
                                 r"after it was made", caplog.messages[-1])
                await asyncio.sleep(0.15)
                assert "flannel.1" not in rig.fake.vxlan and not vx.ready()
            await until(lambda: rig.kernel.recreated.get(("flannel.1", "ok")) == i  # noqa: B023
                        and vx.ready(), 5.0, what=f"made again ({i})")
        assert len(caplog.messages) == 2


async def test_a_device_that_cannot_be_made_is_tried_again_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with vxlan_rig() as rig:
        rig.fake.link_error = "(17, 'File exists')"
        gone = rig.fake.delete_link("flannel.1")
        with caplog.at_level(logging.ERROR, logger=LOG):
            rig.monitor.on_events([KernelEvent("del", link=(gone, "flannel.1"))])
            await until(lambda: rig.kernel.recreated.get(("flannel.1", "failed"), 0) >= 2,
                        5.0, what="two failed attempts")
        assert caplog.messages == [
            "cannot make device flannel.1 again: cannot set up vxlan device flannel.1: "
            "(17, 'File exists'); trying again with backoff (next in "
            + caplog.messages[0].rsplit("next in ", 1)[1]]
        rig.fake.link_error = None
        await until(lambda: "flannel.1" in rig.fake.vxlan and len(on_kernel(rig.fake)) == 6,
                    5.0, what="made at last, with its entries")
        assert rig.kernel.recreated[("flannel.1", "ok")] == 1


async def test_a_device_whose_deletion_went_unheard_is_made_again_after_enodev() -> None:
    """The deletion among notifications the kernel dropped: the full re-read that follows
    finds no such device (ENODEV), and the idempotent maker puts it back."""
    async with vxlan_rig() as rig:
        fake = rig.fake
        dumps = fake.neighbours

        async def neighbours(index: int) -> list[Neigh]:
            if all(d.index != index for d in fake.vxlan.values()):
                raise OSError(errno.ENODEV, "ENODEV (19): No such device")
            return await dumps(index)

        fake.neighbours = neighbours  # type: ignore[method-assign]
        fake.delete_link("flannel.1")
        rig.monitor.on_lost()
        await until(lambda: "flannel.1" in fake.vxlan and len(on_kernel(fake)) == 6, 5.0,
                    what="the device and its entries back")
        assert rig.kernel.resyncs[("lost", "failed")] == 1
        assert rig.kernel.recreated == {("flannel.1", "ok"): 1}


async def test_the_external_interface_deleted_is_not_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostgw_rig() as rig:
        with caplog.at_level(logging.WARNING, logger=LOG):
            rig.monitor.on_events([KernelEvent("del", link=(2, "eth0"))])
            await asyncio.sleep(0.1)
        assert caplog.messages == ["device eth0 (index 2) was deleted; its entries cannot be "
                                   "programmed until it exists again"]
        assert rig.kernel.recreated == {} and not rig.network.ready()


# -- the external interface down and up ----------------------------------------------------
def link_down(fake: FakeNetlink) -> None:
    """What `ip link set eth0 down` does to host-gw: its routes flushed without a word,
    new ones refused until it is up."""
    fake.table = {k: r for k, r in fake.table.items() if r.oif != 2}
    fake.fail = lambda op, item: ("ENETDOWN (100): Network is down"
                                  if op == "replace" and isinstance(item, Route) else None)


@pytest.mark.parametrize("notified", [True, False])
async def test_routes_refused_while_the_link_was_down_come_back_when_it_is_up(
    caplog: pytest.LogCaptureFixture, notified: bool,
) -> None:
    async with hostgw_rig() as rig:
        want = {via(n) for n in range(2, 7)}
        assert set(rig.fake.table.values()) == want
        with caplog.at_level(logging.ERROR, logger=LOG):
            link_down(rig.fake)
            rig.monitor.on_events([KernelEvent("new", link=(2, "eth0"))])
            await until(lambda: rig.kernel.resyncs[("event", "failed")] == 1, 5.0,
                        what="the sync while down failed")
            await until(lambda: rig.kernel.resyncs[("retry", "failed")] >= 1, 5.0,
                        what="retried while down")
        # 5 routes, one error: one line, the first route named.
        assert caplog.messages == ["cannot replace route 10.5.2.0/24 via 192.168.100.2 oif 2: "
                                   "ENETDOWN (100): Network is down (and 4 more with the "
                                   "same error)"]
        rig.fake.fail = lambda op, item: None  # up
        if notified:
            rig.monitor.on_events([KernelEvent("new", link=(2, "eth0"))])
        await until(lambda: set(rig.fake.table.values()) == want, 5.0, what="routes back")
        await until(lambda: rig.network.ready(), 5.0, what="ready")
        k = rig.kernel
        repaired = k.resyncs[("event", "repaired")] + k.resyncs[("retry", "repaired")]
        assert repaired == 1
        if not notified:
            assert k.resyncs[("retry", "repaired")] == 1
        retries = k.resyncs[("retry", "failed")] + k.resyncs[("retry", "clean")]
        await asyncio.sleep(0.3)  # no retry once it succeeded
        assert k.resyncs[("retry", "failed")] + k.resyncs[("retry", "clean")] == retries


# -- no exception ends run() ---------------------------------------------------------------
async def test_an_exception_of_a_resync_is_one_line_a_count_and_a_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNetlink()
    failures = [FakeNetlinkError("(19, 'No such device')")] * 3

    async def plan() -> ChangeSet:
        if failures:
            raise failures.pop()
        return ChangeSet()

    sync = KernelSync(fake, plan, 3600.0)
    sync.retry_backoff = Backoff(0.02, 0.04)
    task = asyncio.create_task(sync.run())
    try:
        with caplog.at_level(logging.INFO, logger=LOG):
            sync.overflow()  # a resync at once
            await until(lambda: sync.resyncs[("retry", "clean")] == 1, 5.0,
                        what="a retry that worked")
        assert not task.done()
        assert sync.resyncs[("lost", "failed")] == 1
        assert sync.resyncs[("retry", "failed")] == 2
        assert [m for m in caplog.messages if "ENOBUFS" not in m] == [
            "resync (lost) failed: FakeNetlinkError: (19, 'No such device'); retrying with "
            "backoff",
            "kernel sync works again"]
        assert sync.ready()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cancellation_still_ends_run() -> None:
    sync = KernelSync(FakeNetlink(), lambda: asyncio.sleep(3600, ChangeSet()), 0.0)
    task = asyncio.create_task(sync.run())
    await asyncio.sleep(0.05)  # in the plan
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- a deleted lease that comes back -------------------------------------------------------
async def test_a_lease_deleted_and_back_within_the_grace_leaves_the_route_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostgw_rig(grace=0.3) as rig:
        rig.fake.calls.clear()
        with caplog.at_level(logging.INFO, logger="backends.routed"):
            await rig.network.apply([peer(3, kind="removed")])
            assert via(3) in rig.fake.table.values()
            await rig.network.apply([peer(3)])
        await asyncio.sleep(0.5)  # past the grace: nothing falls due
        assert via(3) in rig.fake.table.values()
        assert not any(op == "delete" for op, _ in rig.fake.calls)
        assert caplog.messages == [
            "the lease of 10.5.3.0/24 came back unchanged; its entries stayed in place"]
        assert rig.network.leaving == {}


async def test_a_lease_deleted_for_good_goes_after_the_grace() -> None:
    async with hostgw_rig(grace=0.3) as rig:
        await rig.network.apply([peer(3, kind="removed"), peer(4, kind="removed")])
        await asyncio.sleep(0.1)
        assert {via(3), via(4)} <= set(rig.fake.table.values())
        await until(lambda: via(3).dst not in rig.fake.table
                    and via(4).dst not in rig.fake.table, 5.0, what="removed after the grace")
        assert set(rig.fake.table.values()) == {via(2), via(5), via(6)}
        assert rig.network.peers.keys() == {via(n).dst for n in (2, 5, 6)}


async def test_a_subnet_leased_by_another_host_meanwhile_is_rerouted_at_once() -> None:
    async with hostgw_rig(grace=30.0) as rig:
        await rig.network.apply([peer(3, kind="removed")])
        await rig.network.apply([peer(3, public=33)])
        assert rig.fake.table[via(3).dst] == via(3, public=33)
        # ... and a lease of another backend type for it: the route goes at once.
        await rig.network.apply([peer(4, kind="removed")])
        await rig.network.apply([peer(4, btype="vxlan")])
        assert via(4).dst not in rig.fake.table
        assert rig.network.leaving == {}
