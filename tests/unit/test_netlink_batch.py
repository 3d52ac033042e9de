"""Unit tests for the batching layer (backends.kernel.netlink.Rtnl over
backends.kernel.wire) against a fake kernel socket (tests/support/fake_rtnl.py): many
requests per send, acks matched by sequence number, a refusal in the middle of a batch,
lost acks, dumps filtered and decoded; and the requests equal to what pyroute2 encodes."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest
from pyroute2.iproute.linux import IPBatch
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from backends.kernel import wire
from backends.kernel.netlink import BATCH, RESENDS, IPRouteNetlink
from backends.kernel.types import ChangeSet, Entry, Fdb, KernelError, Neigh, Route
from tests.support.fake_rtnl import FakeRtnlSocket, Request, neigh_msg, route_msg

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
VX = 7


def peers(n: int, first: int = 0) -> ChangeSet:
    """What the vxlan backend asks for `n` peers: route, neighbour and FDB entry each."""
    cs = ChangeSet()
    for i in range(first, first + n):
        base = (10 << 24) | ((i + 1) << 8)
        mac = f"0a:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
        cs.route_replace.append(Route(NET((base, 24)), IP(base), VX, onlink=True))
        cs.neigh_replace.append(Neigh(IP(base), mac, VX))
        cs.fdb_replace.append(Fdb(mac, IP((192 << 24) | (168 << 16) | i + 1), VX))
    return cs


async def with_kernel(sock: FakeRtnlSocket, cs: ChangeSet
                      ) -> tuple[list[KernelError], list[Route], list[Neigh], list[Fdb]]:
    nl = IPRouteNetlink(lambda: sock)
    try:
        errors = await nl.apply(cs)
        return (errors, await nl.routes(VX), await nl.neighbours(VX),
                await nl.fdb_entries(VX))
    finally:
        await nl.close()


async def test_many_entries_in_few_sends_equal_the_dump() -> None:
    sock = FakeRtnlSocket()
    cs = peers(1000)
    errors, routes, neigh, fdb = await with_kernel(sock, cs)
    assert errors == []
    assert sorted(routes) == sorted(cs.route_replace)
    assert sorted(neigh) == sorted(cs.neigh_replace)
    assert sorted(fdb) == sorted(cs.fdb_replace)
    assert sock.sends == -(-3000 // BATCH) + 3  # the batches, then three dumps
    assert len({r.seq for r in sock.requests}) == len(sock.requests)
    assert sock.closed


async def test_a_refusal_in_the_middle_of_a_batch_is_that_entry_only() -> None:
    cs = peers(100)
    bad = cs.neigh_replace[37]

    def refuse(req: Request) -> tuple[int, str]:
        if req.type == 28 and req.attrs.get("NDA_DST") == str(bad.ip):
            return errno.ENODEV, "Device not found"
        return 0, ""

    sock = FakeRtnlSocket(refuse=refuse)
    errors, routes, neigh, fdb = await with_kernel(sock, cs)
    assert errors == [KernelError("neigh", "replace", bad,
                                  "ENODEV (19): No such device (Device not found)")]
    # 300 requests in two sends (the refused one in the middle of the first), three dumps.
    assert sock.sends == 2 + 3
    assert sorted(neigh) == sorted(set(cs.neigh_replace) - {bad})
    assert sorted(routes) == sorted(cs.route_replace)  # its route too: as before batching
    assert sorted(fdb) == sorted(cs.fdb_replace)


async def test_deleting_what_is_gone_is_no_error_and_order_is_kept() -> None:
    sock = FakeRtnlSocket()
    have = peers(3)
    await with_kernel(sock, have)
    cs = ChangeSet(route_delete=[*have.route_replace, Route(NET("10.9.0.0/24"), None, VX)],
                   neigh_delete=have.neigh_replace, fdb_delete=have.fdb_replace,
                   route_replace=peers(1, first=50).route_replace)
    sock.requests.clear()
    errors, routes, neigh, fdb = await with_kernel(sock, cs)
    assert errors == []
    assert routes == cs.route_replace and neigh == [] and fdb == []
    assert [r.type for r in sock.requests[:11]] == [25] * 4 + [29] * 6 + [24]


async def test_lost_acks_are_sent_again() -> None:
    sock = FakeRtnlSocket(ack_room=100)  # two thirds of each batch's acks are dropped
    cs = peers(200)
    errors, routes, neigh, fdb = await with_kernel(sock, cs)
    assert errors == []
    assert (len(routes), len(neigh), len(fdb)) == (200, 200, 200)
    assert len([r for r in sock.requests if r.type == 28]) > 400  # some sent again


async def test_no_answer_is_an_error_per_entry_after_the_resends() -> None:
    sock = FakeRtnlSocket(mute=True)
    cs = peers(2)
    nl = IPRouteNetlink(lambda: sock)
    errors = await nl.apply(cs)
    await nl.close()
    assert [(e.what, e.item) for e in errors] == [
        (what, item) for what, _, items in cs.steps() for item in items]
    assert {e.error for e in errors} == {
        "no answer from the kernel (ENOBUFS or timeout); retried later"}
    assert sock.sends == RESENDS + 1


async def test_a_bad_mac_is_that_entry_only() -> None:
    sock = FakeRtnlSocket()
    cs = peers(2)
    cs.fdb_replace[0] = Fdb("0a:00", IP("192.168.1.1"), VX)
    errors, _, _, fdb = await with_kernel(sock, cs)
    assert errors == [KernelError("fdb", "replace", cs.fdb_replace[0],
                                  "EINVAL: not a MAC address: '0a:00'")]
    assert fdb == [cs.fdb_replace[1]]


async def test_dumps_keep_only_what_tweed_may_own() -> None:
    sock = FakeRtnlSocket()
    sock.extra_dump = [
        route_msg("10.1.0.0", 24, VX, None, 0, 0, table=255),  # local table
        route_msg("10.2.0.0", 24, VX, None, 0, 0, rtype=2),  # RTN_LOCAL
        route_msg("10.3.0.0", 24, VX + 1, None, 0, 0),  # another device
        neigh_msg(2, VX, 0x02, "10.4.0.1", "0a:00:00:00:00:04", 0),  # NUD_REACHABLE
        neigh_msg(2, VX + 1, 0x80, "10.4.0.2", "0a:00:00:00:00:05", 0),  # another device
        neigh_msg(7, VX, 0x80, "fd00::1", "0a:00:00:00:00:06", 0),  # an IPv6 VTEP
    ]
    sock.interrupt_dumps = 1  # the first dump is inconsistent: read again
    nl = IPRouteNetlink(lambda: sock)
    dev = Route(NET("10.6.0.0/16"), None, VX)
    assert await nl.apply(ChangeSet(route_replace=[dev])) == []
    assert await nl.routes(VX) == [dev]
    assert await nl.neighbours(VX) == []
    assert await nl.fdb_entries(VX) == []
    assert [r.attrs for r in sock.requests if r.type in (26, 30)] == [
        {"RTA_TABLE": 254, "RTA_OIF": VX}, {"RTA_TABLE": 254, "RTA_OIF": VX},
        {"NDA_IFINDEX": VX}, {"NDA_IFINDEX": VX}]
    await nl.close()


def test_dump_error_and_missing_device() -> None:
    out: list[Entry] = []
    gone = struct.pack("=IHHII", 36, 2, 0x100, 9, 0) + struct.pack("=i", -19) + bytes(16)
    assert wire.decode_dump(gone, len(gone), 9, "route", 3, out).error == errno.ENODEV
    done = struct.pack("=IHHIIi", 20, 3, 2, 9, 0, -errno.EINVAL)
    state = wire.decode_dump(done, len(done), 9, "neigh", 3, out)
    assert state.done and state.error == errno.EINVAL and out == []


SAMPLES: list[tuple[str, str, Entry]] = [
    ("route", "replace", Route(NET("10.5.3.0/24"), IP("10.5.3.0"), 7, onlink=True)),
    ("route", "delete", Route(NET("10.5.2.0/24"), IP("192.168.100.2"), 2)),
    ("route", "replace", Route(NET("10.5.0.0/16"), None, 9)),
    ("route", "delete", Route(NET("10.5.0.0/16"), None, 9)),
    ("neigh", "replace", Neigh(IP("10.5.3.0"), "0a:00:00:00:00:03", 7)),
    ("neigh", "delete", Neigh(IP("10.5.3.0"), "0a:00:00:00:00:03", 7)),
    ("fdb", "replace", Fdb("0a:00:00:00:00:03", IP("192.168.100.3"), 7)),
    ("fdb", "delete", Fdb("0a:00:00:00:00:03", IP("192.168.100.3"), 7)),
]


def pyroute2_request(what: str, op: str, item: Entry) -> bytes:
    """What pyroute2's IPRoute sent for this entry before batching (its IPBatch compiles
    the same request without sending it), with the arguments tweed gave it."""
    ipb = IPBatch()
    verb = "del" if op == "delete" else "replace"
    if isinstance(item, Route):
        kw: dict[str, object] = {"dst": str(item.dst.network_address),
                                 "dst_len": item.dst.prefixlen, "oif": item.oif,
                                 "table": 254, "proto": 3}
        if item.gateway is not None:
            kw["gateway"] = str(item.gateway)
        else:
            kw["scope"] = 253
        if item.onlink:
            kw["flags"] = 4
        ipb.route(verb, **kw)
    elif isinstance(item, Neigh):
        ipb.neigh(verb, dst=str(item.ip), lladdr=item.mac, ifindex=item.index, state=0x80,
                  family=2)
    else:
        ipb.fdb(verb, lladdr=item.mac, dst=str(item.dst), ifindex=item.index, state=0x80,
                flags=2)
    data = bytes(ipb.asyncore.batch)
    ipb.close()
    return data


def decoded(data: bytes, what: str) -> tuple[object, ...]:
    m = (rtmsg if what == "route" else ndmsg)(data)
    m.decode()
    fields = {f[0]: m[f[0]] for f in m.fields if not f[0].startswith("__")}
    attrs = [(k, v) for k, v in m["attrs"]]
    return m["header"]["type"], m["header"]["flags"], fields, attrs


@pytest.mark.parametrize(("what", "op", "item"), SAMPLES)
def test_each_request_is_what_pyroute2_sent(what: str, op: str, item: Entry) -> None:
    ours = decoded(wire.encode(what, op, item, 1), what)
    theirs = decoded(pyroute2_request(what, op, item), what)
    if what == "fdb" and op == "delete":
        # pyroute2 added NUD_NOARP to the state of an FDB delete; the kernel ignores the
        # state of a delete, and we send the state tweed asked for.
        fields = dict(theirs[2])  # type: ignore[call-overload]
        assert fields["state"] == 0xC0
        fields["state"] = 0x80
        theirs = (theirs[0], theirs[1], fields, theirs[3])
    assert ours == theirs
