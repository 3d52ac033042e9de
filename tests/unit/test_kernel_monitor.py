"""Unit tests for backends.kernel.monitor and KernelSync's reaction to notifications, without
root: messages encoded by pyroute2's own message classes (an independent encoder of the
kernel's format), a socketpair standing in for the netlink socket, FakeNetlink as the
kernel. Debounce, echo suppression, lost notifications (ENOBUFS) and deleted devices."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwNetwork
from backends.kernel.fake import FakeNetlink
from backends.kernel.monitor import Desired, KernelEvent, KernelMonitor, drifted, parse
from backends.kernel.types import Fdb, Neigh, Route, VxlanDevice, VxlanSpec
from backends.vxlan import VxlanNetwork, VxlanOptions
from tests.support.wait import until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
MAC = "0a:00:00:00:00:03"
ROUTE = Route(NET("10.5.3.0/24"), IP("10.5.3.0"), 4, onlink=True)
NEIGH = Neigh(IP("10.5.3.0"), MAC, 4)
FDB = Fdb(MAC, IP("192.168.100.3"), 4)


def route_msg(kind: int, dst: str, dst_len: int, oif: int, gw: str | None = None,
              onlink: bool = False, table: int = 254, rtype: int = 1) -> bytes:
    m = rtmsg()
    m["family"], m["dst_len"], m["table"], m["type"] = socket.AF_INET, dst_len, table, rtype
    m["flags"] = 4 if onlink else 0
    m["attrs"] = [("RTA_TABLE", table), ("RTA_DST", dst), ("RTA_OIF", oif)]
    if gw is not None:
        m["attrs"].append(("RTA_GATEWAY", gw))
    m["header"]["type"] = kind
    m.encode()
    return bytes(m.data)


def neigh_msg(kind: int, family: int, index: int, dst: str | None, mac: str | None,
              state: int = 0x80) -> bytes:
    m = ndmsg()
    m["family"], m["ifindex"], m["state"] = family, index, state
    m["attrs"] = [(k, v) for k, v in (("NDA_DST", dst), ("NDA_LLADDR", mac)) if v is not None]
    m["header"]["type"] = kind
    m.encode()
    return bytes(m.data)


def link_msg(kind: int, index: int, name: str) -> bytes:
    m = ifinfmsg()
    m["index"] = index
    m["attrs"] = [("IFLA_IFNAME", name)]
    m["header"]["type"] = kind
    m.encode()
    return bytes(m.data)


def addr_msg(kind: int, family: int, index: int, address: str, prefixlen: int) -> bytes:
    m = ifaddrmsg()
    m["family"] = family
    m["index"] = index
    m["prefixlen"] = prefixlen
    m["attrs"] = [("IFA_ADDRESS", address), ("IFA_LOCAL", address)]
    m["header"]["type"] = kind
    m.encode()
    return bytes(m.data)


# -- parsing -------------------------------------------------------------------------------


def test_parse_routes_as_the_backends_desire_them() -> None:
    assert parse(route_msg(24, "10.5.3.0", 24, 4, "10.5.3.0", onlink=True)) == [
        KernelEvent("new", ROUTE)]
    assert parse(route_msg(25, "10.5.2.0", 24, 2, "192.168.100.2")) == [
        KernelEvent("del", Route(NET("10.5.2.0/24"), IP("192.168.100.2"), 2))]
    assert parse(route_msg(24, "10.5.0.0", 16, 9)) == [
        KernelEvent("new", Route(NET("10.5.0.0/16"), None, 9))]


def test_parse_skips_what_tweed_never_writes() -> None:
    assert parse(route_msg(24, "10.5.3.0", 24, 4, table=255)) == []  # the local table
    assert parse(route_msg(24, "10.5.3.255", 32, 4, rtype=3)) == []  # broadcast
    assert parse(neigh_msg(28, socket.AF_INET6, 4, "fe80::1", MAC)) == []
    assert parse(neigh_msg(28, 7, 4, None, MAC)) == []  # an FDB entry without a VTEP
    assert parse(neigh_msg(28, 7, 4, "fd00::3", MAC)) == []  # an IPv6 VTEP


def test_parse_neighbours_fdb_and_links() -> None:
    assert parse(neigh_msg(28, socket.AF_INET, 4, "10.5.3.0", MAC)) == [
        KernelEvent("new", NEIGH)]
    # `ip neigh del` reports the entry FAILED, without its address.
    assert parse(neigh_msg(29, socket.AF_INET, 4, "10.5.3.0", None, state=0x20)) == [
        KernelEvent("del", Neigh(IP("10.5.3.0"), "", 4), permanent=False)]
    assert parse(neigh_msg(29, 7, 4, "192.168.100.3", MAC)) == [KernelEvent("del", FDB)]
    assert parse(link_msg(17, 4, "flannel.1")) == [KernelEvent("del", link=(4, "flannel.1"))]
    assert parse(link_msg(16, 2, "eth0")) == [KernelEvent("new", link=(2, "eth0"))]


def test_parse_addresses() -> None:
    assert parse(addr_msg(21, socket.AF_INET, 2, "192.168.100.1", 24)) == [
        KernelEvent("del", address=2)]
    assert parse(addr_msg(20, socket.AF_INET, 4, "10.5.1.0", 32)) == [
        KernelEvent("new", address=4)]
    assert parse(addr_msg(20, socket.AF_INET6, 2, "fd00::1", 64)) == []  # not IPv4


def test_parse_several_messages_and_stops_at_a_truncated_one() -> None:
    one, two = route_msg(24, "10.5.3.0", 24, 4, "10.5.3.0", True), link_msg(17, 4, "x")
    assert [e.op for e in parse(one + two)] == ["new", "del"]
    assert parse(one + two[:-3]) == [KernelEvent("new", ROUTE)]
    assert parse(b"\x01\x02") == []


# -- drift ---------------------------------------------------------------------------------


def owned(r: Route) -> bool:
    return r.gateway is not None and r.dst.subnet_of(NET("10.5.0.0/16"))


WANT = Desired({ROUTE.dst: ROUTE}, owned, 4, {NEIGH.ip: NEIGH}, {MAC: FDB}, {4: "flannel.1"})


@pytest.mark.parametrize(("event", "expected"), [
    (KernelEvent("new", ROUTE), False),  # the echo of our own write
    (KernelEvent("del", ROUTE), True),  # ours deleted
    (KernelEvent("new", Route(ROUTE.dst, IP("10.5.3.9"), 4, True)), True),  # changed
    (KernelEvent("new", Route(NET("10.5.9.0/24"), IP("10.5.9.0"), 4, True)), True),  # to remove
    (KernelEvent("del", Route(NET("10.5.9.0/24"), IP("10.5.9.0"), 4, True)), False),  # removed
    (KernelEvent("new", Route(NET("172.17.0.0/16"), None, 5)), False),  # someone else's
    (KernelEvent("new", NEIGH), False),
    (KernelEvent("del", Neigh(NEIGH.ip, "", 4), permanent=False), True),
    (KernelEvent("new", Neigh(NEIGH.ip, "", 4), permanent=False), True),
    (KernelEvent("new", Neigh(NEIGH.ip, "0a:00:00:00:00:09", 4)), True),
    (KernelEvent("new", Neigh(IP("10.5.9.0"), MAC, 4)), True),  # a stray permanent one
    (KernelEvent("new", Neigh(IP("10.5.9.0"), "", 4), permanent=False), False),
    (KernelEvent("del", Neigh(IP("10.5.9.0"), MAC, 4)), False),
    (KernelEvent("new", Neigh(NEIGH.ip, MAC, 2)), False),  # another device
    (KernelEvent("new", FDB), False),
    (KernelEvent("del", FDB), True),
    (KernelEvent("new", Fdb(MAC, IP("192.168.100.9"), 4)), True),
    (KernelEvent("new", Fdb("0a:00:00:00:00:09", IP("192.168.100.9"), 4)), True),
    (KernelEvent("del", Fdb("0a:00:00:00:00:09", IP("192.168.100.9"), 4)), False),
    (KernelEvent("new", link=(4, "flannel.1")), True),
    (KernelEvent("new", link=(7, "docker0")), False),
    (KernelEvent("del", address=4), True),  # its routes were flushed, unannounced
    (KernelEvent("new", address=4), True),  # refused routes can be written now
    (KernelEvent("del", address=7), False),  # not a device of ours
])
def test_drifted(event: KernelEvent, expected: bool) -> None:
    assert drifted(event, WANT) is expected


# -- the socket ----------------------------------------------------------------------------


async def test_monitor_reads_datagrams_on_the_loop() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    got: list[list[KernelEvent]] = []
    arrived = asyncio.Event()

    def on_events(events: list[KernelEvent]) -> None:
        got.append(events)
        arrived.set()

    monitor = KernelMonitor(on_events, lambda: None, sock=ours)
    monitor.start()
    try:
        kernel.send(route_msg(25, "10.5.3.0", 24, 4, "10.5.3.0", True))
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [[KernelEvent("del", ROUTE)]]
    finally:
        monitor.close()
        kernel.close()


class OverflowingSocket:
    """A datagram socket whose first reads are scripted: datagrams, or OSError(ENOBUFS) as
    the kernel reports dropped notifications; then the real socket."""

    def __init__(self, real: socket.socket, script: list[bytes | OSError]) -> None:
        self.real, self.script = real, script

    def fileno(self) -> int:
        return self.real.fileno()

    def recv_into(self, buf: bytearray) -> int:
        if not self.script:
            return self.real.recv_into(buf)
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self) -> None:
        self.real.close()


async def test_enobufs_is_reported_and_reading_goes_on() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    events: list[KernelEvent] = []
    lost: list[bool] = []
    sock: Any = OverflowingSocket(ours, [link_msg(16, 4, "flannel.1"),
                                         OSError(errno.ENOBUFS, "No buffer space"),
                                         link_msg(17, 4, "flannel.1")])
    monitor = KernelMonitor(events.extend, lambda: lost.append(True), sock=sock)
    monitor.start()
    try:
        kernel.send(b"")  # wakes the reader: the script, then this empty datagram
        await until(lambda: lost, 5.0, what="the loss reported")
        assert [e.op for e in events] == ["new", "del"] and lost == [True]
        # The reader was armed again (uvloop drops an fd that reported an error).
        kernel.send(route_msg(25, "10.5.3.0", 24, 4, "10.5.3.0", True))
        await until(lambda: len(events) == 3, 5.0, what="a notification after the loss")
        assert events[-1] == KernelEvent("del", ROUTE) and lost == [True]
    finally:
        monitor.close()
        kernel.close()


# -- KernelSync's reaction -----------------------------------------------------------------

CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))


class FakeMonitor:
    """What `KernelSync.watch` is handed: keeps the callbacks so a test can notify."""

    def __init__(self, on_events: Callable[[list[KernelEvent]], None],
                 on_lost: Callable[[], None]) -> None:
        self.on_events, self.on_lost = on_events, on_lost
        self.started = self.closed = False
        made.append(self)

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


made: list[FakeMonitor] = []


def peer(n: int) -> PeerEvent:
    attrs = LeaseAttrs(IP(f"192.168.100.{n}"), None, "host-gw", None)
    return PeerEvent(PeerEventKind.ADDED, PeerLease(NET(f"10.5.{n}.0/24"), attrs))


def via(n: int) -> Route:
    return Route(NET(f"10.5.{n}.0/24"), IP(f"192.168.100.{n}"), 2)


class Rig:
    """A host-gw network on FakeNetlink with a 3600 s backstop, its run() task and the fake
    monitor it started; counts the plans (each one a full read of the kernel)."""

    def __init__(self) -> None:
        self.fake = FakeNetlink()
        self.network = HostGwNetwork(self.fake, EXT, CONFIG, resync=3600.0)
        self.kernel = self.network.kernel
        self.kernel.debounce = 0.02
        self.kernel.watch(FakeMonitor)
        self.plans = 0
        plan = self.kernel.plan

        async def counting() -> Any:
            self.plans += 1
            return await plan()

        self.kernel.plan = counting
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        made.clear()
        await self.network.setup(Lease(NET("10.5.1.0/24"), "10.5.1.0-24",
                                       self.network.lease_attrs, 5, None))
        await self.network.apply([peer(n) for n in range(2, 7)])
        self.task = asyncio.create_task(self.network.run())
        await asyncio.sleep(0)
        self.monitor = made[-1]
        self.plans = 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.monitor.closed

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        await until(cond, 5.0, step=0.005, what=what)


async def test_a_deleted_route_is_repaired_once_per_burst() -> None:
    async with Rig() as rig:
        assert rig.monitor.started
        gone = [rig.fake.table.pop(via(n).dst) for n in (2, 3, 4)]
        for r in gone:  # three notifications, spread over less than the debounce
            rig.monitor.on_events([KernelEvent("del", r)])
            await asyncio.sleep(0.002)
        await rig.until(lambda: all(r.dst in rig.fake.table for r in gone), "the repair")
        await asyncio.sleep(0.1)
        assert rig.plans == 1
        assert rig.kernel.resyncs[("event", "repaired")] == 1
        assert rig.kernel.events == {"drift": 3, "ignored": 0}


async def test_echoes_of_our_own_writes_start_no_sync() -> None:
    async with Rig() as rig:
        # What the kernel says after our own writes: the routes we want, a deletion of one
        # we no longer want, and the entries of others.
        rig.monitor.on_events([KernelEvent("new", via(n)) for n in range(2, 7)] + [
            KernelEvent("del", via(9)),
            KernelEvent("new", Route(NET("172.17.0.0/16"), None, 5)),
            KernelEvent("new", Neigh(IP("192.168.100.7"), "", 2), permanent=False),
        ])
        await asyncio.sleep(0.1)
        assert rig.plans == 0
        assert rig.kernel.events == {"drift": 0, "ignored": 8}
        assert sum(rig.kernel.resyncs.values()) == 0


async def test_an_echo_read_after_a_later_plan_starts_no_sync() -> None:
    async with Rig() as rig:
        await rig.network.apply([peer(8)])  # written: via(8)
        # A later plan no longer wants it (the peer left at once), before its echo is read.
        want = rig.kernel.desired
        assert want is not None
        rig.kernel.desired = Desired({k: v for k, v in want.routes.items() if k != via(8).dst},
                                     want.route_owned, links=want.links)
        rig.monitor.on_events([KernelEvent("new", via(8))])
        # A route of that shape we did not write is drift all the same.
        rig.monitor.on_events([KernelEvent("new", Route(via(8).dst, IP("192.168.100.88"), 2))])
        await rig.until(lambda: rig.kernel.events["drift"] == 1, "one drift")
        assert rig.kernel.events["ignored"] == 1


async def test_a_changed_route_is_put_back() -> None:
    async with Rig() as rig:
        changed = Route(via(5).dst, IP("192.168.100.99"), 2)
        rig.fake.table[changed.dst] = changed
        rig.monitor.on_events([KernelEvent("new", changed)])
        await rig.until(lambda: rig.fake.table[changed.dst] == via(5), "the route put back")


async def test_lost_notifications_mean_a_full_reread_at_once_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Rig() as rig:
        rig.kernel.debounce = 60.0  # a lost-notification resync must not wait for it
        del rig.fake.table[via(6).dst]  # a change whose notification was dropped
        with caplog.at_level(logging.WARNING, logger="backends.kernel.sync"):
            rig.monitor.on_lost()
            await rig.until(lambda: via(6).dst in rig.fake.table, "the re-read")
        assert rig.kernel.lost == 1
        assert rig.kernel.resyncs[("lost", "repaired")] == 1
        assert [r.message for r in caplog.records] == [
            "kernel notifications were lost (ENOBUFS: the receive buffer overflowed); "
            "re-reading the kernel state"]
        rig.monitor.on_lost()
        await rig.until(lambda: rig.kernel.resyncs[("lost", "clean")] == 1, "a clean one")
        assert rig.kernel.lost == 2


async def test_a_deleted_device_is_logged_once_and_not_fought(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Rig() as rig:
        with caplog.at_level(logging.WARNING, logger="backends.kernel.sync"):
            for _ in range(2):
                rig.monitor.on_events([KernelEvent("del", via(2)),
                                       KernelEvent("del", link=(2, "eth0"))])
            await asyncio.sleep(0.1)
        assert caplog.messages == [
            "device eth0 (index 2) was deleted; its entries cannot be programmed until it "
            "exists again"]
        assert rig.plans == 0


async def test_without_a_monitor_the_period_still_repairs() -> None:
    fake = FakeNetlink()
    network = HostGwNetwork(fake, EXT, CONFIG, resync=0.05)
    await network.setup(Lease(NET("10.5.1.0/24"), "10.5.1.0-24", network.lease_attrs, 5,
                              None))
    await network.apply([peer(2)])
    task = asyncio.create_task(network.run())
    try:
        del fake.table[via(2).dst]
        await until(lambda: via(2).dst in fake.table, 5.0, what="the periodic repair")
        assert fake.table[via(2).dst] == via(2)
        assert network.kernel.resyncs[("period", "repaired")] == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_vxlan_desired_tables_judge_neighbours_and_fdb() -> None:
    fake = FakeNetlink()
    config = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    network = VxlanNetwork(fake, EXT, config, VxlanOptions(), "0a:00:00:00:00:01", 3600.0)
    fake.vxlan["flannel.1"] = VxlanDevice(
        VxlanSpec("flannel.1", 1, IP("192.168.100.1"), 2, 8472), 4, "0a:00:00:00:00:01", 1450,
        True, ())
    await network.setup(Lease(NET("10.5.1.0/24"), "10.5.1.0-24", network.lease_attrs, 5, None))
    attrs = LeaseAttrs(IP("192.168.100.3"), None, "vxlan", {"VNI": 1, "VtepMAC": MAC})
    await network.apply([PeerEvent(PeerEventKind.ADDED, PeerLease(NET("10.5.3.0/24"), attrs))])
    want = network.kernel.desired
    assert want is not None and want.neigh_index == network.dev_index
    index = network.dev_index
    echo = [KernelEvent("new", Route(ROUTE.dst, ROUTE.gateway, index, True)),
            KernelEvent("new", Neigh(NEIGH.ip, MAC, index)),
            KernelEvent("new", Fdb(MAC, FDB.dst, index))]
    assert not any(drifted(e, want) for e in echo)
    assert all(drifted(KernelEvent("del", e.entry), want) for e in echo)
