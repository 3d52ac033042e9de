"""IPRouteNetlink's batched writes and filtered dumps against a real kernel, in a fresh lab
namespace with one vxlan device (and a second one left down, to be refused): thousands of
entries applied equal the kernel's own view (`ip -j`, `bridge -j`) and our dumps; a request
refused in the middle of a batch is exactly that entry's KernelError with every other entry
applied; KernelSync logs it once and a later sync puts it in."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
from collections.abc import Callable

import pytest

from backends.kernel.netlink import IPRouteNetlink, Rtnl, RtnlSocket, open_rtnl_socket
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Fdb, KernelError, Neigh, Route
from tests.support.netns import Lab, Namespace

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
CLONE_NEWNET = 0x40000000


def socket_in(ns: str) -> Callable[[], RtnlSocket]:
    """A factory of sockets in namespace `ns`: the calling thread (the netlink worker)
    enters it for the socket() call only; the socket stays in it."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    def factory() -> RtnlSocket:
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            setns(there)
            try:
                return open_rtnl_socket()
            finally:
                setns(here)
        finally:
            os.close(here)
            os.close(there)

    return factory


def make_ns(lab: Lab) -> tuple[Namespace, int, int]:
    """A namespace with vxlan device vx0 (up) and vx1 (down); their indexes."""
    ns = lab.add_netns("nl")
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "8472",
         "local", "192.168.100.1", "nolearning"],
        ["ip", "link", "add", "vx1", "type", "vxlan", "id", "2", "dstport", "8473",
         "nolearning"],
        ["ip", "link", "set", "vx0", "up"],
    ):
        ns.exec(cmd)
    links = {link["ifname"]: link["ifindex"]
             for link in json.loads(ns.exec(["ip", "-j", "link", "show"]).stdout)}
    return ns, links["vx0"], links["vx1"]


def peers(n: int, index: int) -> ChangeSet:
    """Route + neighbour + FDB entry for each of `n` vxlan peers, as the backend asks."""
    cs = ChangeSet()
    for i in range(n):
        base = (10 << 24) | ((i + 1) << 8)
        mac = f"0a:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
        cs.route_replace.append(Route(NET((base, 24)), IP(base), index, onlink=True))
        cs.neigh_replace.append(Neigh(IP(base), mac, index))
        cs.fdb_replace.append(Fdb(mac, IP((192 << 24) | (168 << 16) | (i + 1)), index))
    return cs


def kernel_view(ns: Namespace, dev: str) -> tuple[set[str], set[tuple[str, str]],
                                                   set[tuple[str, str]]]:
    """Routes (dst), neighbours (ip, mac) and FDB entries (mac, dst) of `dev` by iproute2."""
    def js(*cmd: str) -> list[dict[str, str]]:
        return json.loads(ns.exec(list(cmd)).stdout or "[]")  # type: ignore[no-any-return]

    routes = {r["dst"] for r in js("ip", "-j", "-4", "route", "show", "dev", dev)}
    neigh = {(n["dst"], n["lladdr"])
             for n in js("ip", "-j", "-4", "neigh", "show", "dev", dev)}
    fdb = {(f["mac"], f["dst"]) for f in js("bridge", "-j", "fdb", "show", "dev", dev)
           if f.get("dst")}
    return routes, neigh, fdb


async def test_thousands_of_entries_equal_the_kernel_dump(lab: Lab) -> None:
    ns, vx0, _ = make_ns(lab)
    nl = IPRouteNetlink(socket_in(ns.ns))
    cs = peers(2000, vx0)
    try:
        assert await nl.apply(cs) == []
        assert sorted(await nl.routes(vx0)) == sorted(cs.route_replace)
        assert sorted(await nl.neighbours(vx0)) == sorted(cs.neigh_replace)
        assert sorted(await nl.fdb_entries(vx0)) == sorted(cs.fdb_replace)
        routes, neigh, fdb = kernel_view(ns, "vx0")
        assert routes == {str(r.dst) for r in cs.route_replace}
        assert neigh == {(str(n.ip), n.mac) for n in cs.neigh_replace}
        assert fdb == {(f.mac, str(f.dst)) for f in cs.fdb_replace}
        # Deleting them all, and once more (already gone is no error), empties the device.
        gone = ChangeSet(route_delete=cs.route_replace, neigh_delete=cs.neigh_replace,
                         fdb_delete=cs.fdb_replace)
        assert await nl.apply(gone) == []
        assert await nl.apply(gone) == []
        assert kernel_view(ns, "vx0") == (set(), set(), set())
        assert await nl.routes(vx0) == [] and await nl.neighbours(vx0) == []
        assert await nl.fdb_entries(vx0) == []
        assert await nl.routes(99999) == []  # no such device: nothing through it
    finally:
        await nl.close()


async def test_a_refusal_in_the_middle_of_a_batch(
    lab: Lab, caplog: pytest.LogCaptureFixture,
) -> None:
    ns, vx0, vx1 = make_ns(lab)
    nl = IPRouteNetlink(socket_in(ns.ns))
    cs = peers(300, vx0)
    # A route via a gateway on a device that is down, amid the routes; a neighbour on a
    # device that does not exist, amid the neighbours.
    down = Route(NET("10.200.0.0/24"), IP("10.200.0.0"), vx1, onlink=True)
    nowhere = Neigh(IP("10.201.0.0"), "0a:00:00:00:ff:01", 99999)
    cs.route_replace.insert(150, down)
    cs.neigh_replace.insert(150, nowhere)
    try:
        errors = await nl.apply(cs)
        assert [(e.what, e.op, e.item) for e in errors] == [
            ("neigh", "replace", nowhere), ("route", "replace", down)]
        assert errors[0].error.startswith("ENODEV (19): ")
        assert errors[1] == KernelError("route", "replace", down,
                                        "ENETDOWN (100): Network is down "
                                        "(Nexthop device is not up)")
        routes, neigh, fdb = kernel_view(ns, "vx0")
        assert routes == {str(r.dst) for r in cs.route_replace if r is not down}
        assert len(neigh) == len(fdb) == 300

        # KernelSync on top, as a backend plans: what is missing from the kernel.
        async def plan() -> ChangeSet:
            have = set(await nl.routes(vx0)) | set(await nl.routes(vx1))
            return ChangeSet(route_replace=[r for r in cs.route_replace if r not in have])

        sync = KernelSync(nl, plan, 60.0)
        with caplog.at_level(logging.INFO, logger="backends.kernel.sync"):
            assert await sync.sync() is True
            assert await sync.sync() is True
            assert sync.ready() is False
            ns.exec(["ip", "link", "set", "vx1", "up"])
            assert await sync.sync() is True
            assert await sync.sync() is False
        assert sync.ready() is True
        assert caplog.messages == [
            f"cannot replace route 10.200.0.0/24 via 10.200.0.0 oif {vx1} onlink: ENETDOWN "
            "(100): Network is down (Nexthop device is not up)",
            "kernel: set 1 route; removed 0",
        ]
        assert down in await nl.routes(vx1)
    finally:
        await nl.close()


def test_the_socket_is_in_the_namespace_and_the_thread_back_home(lab: Lab) -> None:
    ns, vx0, _ = make_ns(lab)
    ns.exec(["ip", "route", "add", "10.250.0.0/24", "dev", "vx0"])
    here = os.readlink("/proc/thread-self/ns/net")
    sock = socket_in(ns.ns)()
    assert os.readlink("/proc/thread-self/ns/net") == here
    try:
        assert Route(NET("10.250.0.0/24"), None, vx0) in Rtnl(sock).dump("route", None)
    finally:
        sock.close()
