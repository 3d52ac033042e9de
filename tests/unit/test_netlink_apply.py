"""Unit tests for IPRouteNetlink.apply against a fake kernel socket: the requests sent for
each kind of change (decoded by pyroute2: the same fields and attributes pyroute2's IPRoute
sent for them), their order, and which failures come back."""

from __future__ import annotations

import errno
import ipaddress

from backends.kernel.netlink import IPRouteNetlink
from backends.kernel.types import ChangeSet, Fdb, KernelError, Neigh, Route
from tests.support.fake_rtnl import FakeRtnlSocket, Request

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network

GW = Route(NET("10.5.2.0/24"), IP("192.168.100.2"), 2)
ONLINK = Route(NET("10.5.3.0/24"), IP("10.5.3.0"), 7, onlink=True)
DEV = Route(NET("10.5.0.0/16"), None, 9)
NEIGH = Neigh(IP("10.5.3.0"), "0a:00:00:00:00:03", 7)
FDB = Fdb("0a:00:00:00:00:03", IP("192.168.100.3"), 7)

NEW, DEL = 0x505, 0x005  # REQUEST|ACK|REPLACE|CREATE, REQUEST|ACK


async def run(sock: FakeRtnlSocket, cs: ChangeSet) -> list[KernelError]:
    nl = IPRouteNetlink(lambda: sock)
    try:
        return await nl.apply(cs)
    finally:
        await nl.close()


def shape(req: Request) -> tuple[int, int, dict[str, object], dict[str, object]]:
    return req.type, req.flags, req.fields, req.attrs


def route_fields(dst_len: int, scope: int, rtype: int, flags: int = 0) -> dict[str, object]:
    return {"family": 2, "dst_len": dst_len, "src_len": 0, "tos": 0, "table": 254,
            "proto": 3, "scope": scope, "type": rtype, "flags": flags}


async def test_requests_in_order_with_their_attributes() -> None:
    sock = FakeRtnlSocket()
    cs = ChangeSet(route_replace=[ONLINK, DEV], route_delete=[GW], neigh_replace=[NEIGH],
                   neigh_delete=[NEIGH], fdb_replace=[FDB], fdb_delete=[FDB])
    sock.routes[("10.5.2.0", 24)] = {}  # so that the deletes find something
    sock.neigh[(7, "10.5.3.0")] = sock.fdb[(7, "0a:00:00:00:00:03")] = {}
    assert await run(sock, cs) == []
    neigh_fields = {"family": 2, "ifindex": 7, "state": 0x80, "flags": 0, "ndm_type": 0}
    neigh_attrs = {"NDA_DST": "10.5.3.0", "NDA_LLADDR": "0a:00:00:00:00:03"}
    fdb_fields = {"family": 7, "ifindex": 7, "state": 0x80, "flags": 2, "ndm_type": 0}
    fdb_attrs = {"NDA_LLADDR": "0a:00:00:00:00:03", "NDA_DST": "192.168.100.3"}
    assert [shape(r) for r in sock.requests] == [
        (25, DEL, route_fields(24, 0, 0), {"RTA_DST": "10.5.2.0", "RTA_OIF": 2,
                                           "RTA_TABLE": 254, "RTA_GATEWAY": "192.168.100.2"}),
        (29, DEL, neigh_fields, neigh_attrs),
        (29, DEL, fdb_fields, fdb_attrs),
        (28, NEW, fdb_fields, fdb_attrs),
        (28, NEW, neigh_fields, neigh_attrs),
        (24, NEW, route_fields(24, 0, 1, flags=4), {
            "RTA_DST": "10.5.3.0", "RTA_OIF": 7, "RTA_TABLE": 254,
            "RTA_GATEWAY": "10.5.3.0"}),
        (24, NEW, route_fields(16, 253, 1), {"RTA_DST": "10.5.0.0", "RTA_OIF": 9,
                                             "RTA_TABLE": 254}),
    ]
    assert sock.sends == 1  # seven changes, one send
    assert len({r.seq for r in sock.requests}) == 7


async def test_failures_come_back_and_the_rest_still_runs() -> None:
    refusals = {
        25: (errno.ESRCH, ""), 29: (errno.ENOENT, ""),
        24: (errno.ENETUNREACH, "Nexthop has invalid gateway"),
    }

    def refuse(req: Request) -> tuple[int, str]:
        if req.type == 29 and req.fields["family"] == 7:
            return errno.EPERM, ""
        return refusals.get(req.type, (0, ""))

    sock = FakeRtnlSocket(refuse=refuse)
    cs = ChangeSet(route_replace=[ONLINK], route_delete=[GW], neigh_replace=[NEIGH],
                   neigh_delete=[NEIGH], fdb_delete=[FDB])
    errors = await run(sock, cs)
    # A delete of what is already gone is what was wanted: not an error.
    assert errors == [
        KernelError("fdb", "delete", FDB, "EPERM (1): Operation not permitted"),
        KernelError("route", "replace", ONLINK,
                    "ENETUNREACH (101): Network is unreachable "
                    "(Nexthop has invalid gateway)"),
    ]
    assert [(r.type, r.fields["family"]) for r in sock.requests] == [
        (25, 2), (29, 2), (29, 7), (28, 2), (24, 2)]
    assert sock.neigh == {(7, "10.5.3.0"): sock.neigh[(7, "10.5.3.0")]}


async def test_empty_change_set_sends_nothing() -> None:
    sock = FakeRtnlSocket()
    assert await run(sock, ChangeSet()) == []
    assert sock.requests == [] and sock.sends == 0
