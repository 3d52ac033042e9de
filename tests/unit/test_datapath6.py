"""The datapath behaviour suite for IPv6 (issue 14): v6 inner packets over a v4 and a v6
underlay, v4 inner packets over a v6 underlay, the router rules (hop limit, ICMPv6 errors
with their checksums verified, when not to answer, the destinations not forwarded, the
rate limit), the 128-bit LPM through the datapath (/0, /64, /128), UDP GSO/GRO on the v6
socket, and run() reading both sockets.

Every test runs against both datapaths (the `kind` fixture). The rig is
test_datapath.py's (a stand-in TUN, loopback UDP) with a second, AF_INET6 socket on ::1
for the datapath and one peer there (the root namespace has a single v6 loopback address,
and tests add none).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from backends.udp.c_datapath import CDatapath
from backends.udp.python_datapath import PythonDatapath
from tests.support.packets import hopped, parse_icmp, sized_packet
from tests.unit.packets6 import a6, hopped6, icmp6, parse_icmp6, sized6

MTU = 1400
BUF = 1 << 20
OWN4 = ipaddress.IPv4Network("10.5.1.0/24")
OWN6 = ipaddress.IPv6Network("fd00:5:1::/64")
NET6_A = ipaddress.IPv6Network("fd00:5:2::/64")  # behind peer A, at a v4 underlay address
NET6_V = ipaddress.IPv6Network("fd00:5:3::/64")  # behind peer V, at ::1 (a v6 underlay)
NET4_V = ipaddress.IPv4Network("10.5.3.0/24")    # a v4 subnet behind the v6 peer
NET4_A = ipaddress.IPv4Network("10.5.2.0/24")
NET6_B = ipaddress.IPv6Network("fd00:5:4::/64")  # behind peer B, at a v4 underlay address
PEER_A = ipaddress.IPv4Address("127.0.0.2")
PEER_B = ipaddress.IPv4Address("127.0.0.3")
PEER_V = ipaddress.IPv6Address("::1")
LOCAL6 = "fd00:5:1::10"  # a container on this host
LOCAL4 = "10.5.1.10"


@dataclass
class Rig6:
    dp: PythonDatapath | CDatapath
    tun: socket.socket
    dp_addr: tuple[str, int]
    dp_addr6: tuple[str, int]
    peer_a: socket.socket  # 127.0.0.2, the datapath's port
    peer_b: socket.socket  # 127.0.0.3, the datapath's port
    peer_v: socket.socket  # ::1, the datapath's port (python datapath only)
    from_tun: Callable[[], None]
    from_udp: Callable[[], None]
    from_udp6: Callable[[], None]

    def counters(self) -> dict[str, int]:
        return self.dp.counters()

    def to_tun(self, *pkts: bytes) -> None:
        for p in pkts:
            self.tun.send(p)
        self.from_tun()

    def tun_writes(self) -> list[bytes]:
        out = []
        self.tun.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.tun.recv(BUF))
        return out


def recv(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple]:
    sock.settimeout(timeout)
    return sock.recvfrom(BUF)


def nothing_on(sock: socket.socket, timeout: float = 0.05) -> bool:
    sock.settimeout(timeout)
    try:
        sock.recv(BUF)
    except TimeoutError:
        return True
    return False


def _bound(family: socket.AddressFamily, address: str, port: int = 0) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    s.bind((address, port))
    return s


@pytest.fixture(params=["python", "c"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_rig6(kind: str) -> Iterator[Callable[..., Rig6]]:
    """Rigs of the datapath under test."""
    yield from _rigs(kind)


def _rigs(kind: str) -> Iterator[Callable[..., Rig6]]:
    socks: list[socket.socket] = []
    dps: list[PythonDatapath | CDatapath] = []

    def make(*, gso: bool = False, gro: bool = False, check_source: bool = True,
             own6: ipaddress.IPv6Network | None = OWN6, icmp_ratelimit_ms: int = 60_000,
             routes: bool = True) -> Rig6:
        dp_end, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (dp_end, tun):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        sock = _bound(socket.AF_INET, "127.0.0.1")
        sock6 = _bound(socket.AF_INET6, "::1")
        peer_a = _bound(socket.AF_INET, str(PEER_A))
        port = peer_a.getsockname()[1]
        peer_b = _bound(socket.AF_INET, str(PEER_B), port)
        peer_v = _bound(socket.AF_INET6, str(PEER_V), port)
        socks.extend((dp_end, tun, sock, sock6, peer_a, peer_b, peer_v))
        os.set_blocking(dp_end.fileno(), False)
        sock.setblocking(False)
        sock6.setblocking(False)
        dp: PythonDatapath | CDatapath
        if kind == "python":
            dp = PythonDatapath(dp_end.fileno(), sock, port=port, mtu=MTU,
                                check_source=check_source, gso=gso, gro=gro,
                                icmp_ratelimit_ms=icmp_ratelimit_ms, sock6=sock6)
        else:
            dp = CDatapath(dp_end.fileno(), sock, port=port, mtu=MTU,
                           check_source=check_source, gso=gso, gro=gro,
                           icmp_ratelimit_ms=icmp_ratelimit_ms, sock6=sock6)
        dps.append(dp)
        dp.set_subnet(OWN4)
        if own6 is not None:
            dp.set_subnet(own6)
        if routes:
            dp.set_route(NET6_A, PEER_A)
            dp.set_route(NET6_B, PEER_B)
            dp.set_route(NET4_A, PEER_A)
            dp.set_route(NET6_V, PEER_V)
            dp.set_route(NET4_V, PEER_V)
        if isinstance(dp, PythonDatapath):
            from_tun, from_udp, from_udp6 = dp._from_tun(), dp._from_udp(), dp._from_udp(sock6)
        else:
            from_tun, from_udp = dp._core.drain_tun, dp._core.drain_udp
            from_udp6 = dp._core.drain_udp6
        return Rig6(dp, tun, sock.getsockname(), sock6.getsockname()[:2], peer_a, peer_b,
                    peer_v, from_tun, from_udp, from_udp6)

    yield make
    for dp in dps:
        dp.stop()
    for s in socks:
        s.close()


# -- TUN -> UDP ------------------------------------------------------------------------
def test_v6_inner_over_a_v4_underlay(make_rig6):
    rig = make_rig6()
    pkt = sized6(LOCAL6, "fd00:5:2::7", 300)
    rig.to_tun(pkt)
    data, src = recv(rig.peer_a)
    assert data == hopped6(pkt) and data[7] == 63
    assert src == rig.dp_addr
    assert nothing_on(rig.peer_v)
    c = rig.counters()
    assert (c["tx_packets"], c["tx_bytes"]) == (1, 300)


def test_v6_inner_over_a_v6_underlay(make_rig6):
    rig = make_rig6()
    pkt = sized6(LOCAL6, "fd00:5:3::7", 500)
    rig.to_tun(pkt)
    data, src = recv(rig.peer_v)
    assert data == hopped6(pkt)
    assert src[:2] == rig.dp_addr6  # from the v6 socket
    assert nothing_on(rig.peer_a)


def test_v4_inner_over_a_v6_underlay(make_rig6):
    rig = make_rig6()
    pkt = sized_packet(LOCAL4, "10.5.3.9", 200, ttl=9)
    rig.to_tun(pkt)
    data, src = recv(rig.peer_v)
    assert data == hopped(pkt)
    assert src[:2] == rig.dp_addr6


def test_mixed_batch_keeps_order_per_peer(make_rig6):
    rig = make_rig6(gso=True)
    a = [sized6(LOCAL6, "fd00:5:2::7", 400, fill=i) for i in range(3)]
    v = [sized6(LOCAL6, "fd00:5:3::8", 400, fill=10 + i) for i in range(3)]
    four = sized_packet(LOCAL4, "10.5.2.3", 400)
    rig.to_tun(a[0], a[1], v[0], four, v[1], v[2], a[2])
    assert [recv(rig.peer_a)[0] for _ in range(4)] == [
        hopped6(a[0]), hopped6(a[1]), hopped(four), hopped6(a[2])]
    assert [recv(rig.peer_v)[0] for _ in range(3)] == [hopped6(p) for p in v]
    c = rig.counters()
    assert c["tx_packets"] == 7 and c["gso_sends"] >= 2  # a[0:2] and v[1:3] went as runs


def test_gso_over_the_v6_socket(make_rig6):
    rig = make_rig6(gso=True)
    assert rig.dp.offloads()["udp_gso"]
    pkts = [sized6(LOCAL6, "fd00:5:3::8", 1000, fill=i) for i in range(5)]
    pkts.append(sized6(LOCAL6, "fd00:5:3::8", 300, fill=9))  # the last may be shorter
    rig.to_tun(*pkts)
    assert [recv(rig.peer_v)[0] for _ in pkts] == [hopped6(p) for p in pkts]
    assert nothing_on(rig.peer_v)
    c = rig.counters()
    assert (c["gso_sends"], c["tx_packets"]) == (1, 6)


@pytest.mark.parametrize("routes,dst,peer", [
    ({"::/0": "A", "fd00:7::/64": "V", "fd00:7::5/128": "A"}, "fd00:7::5", "A"),
    ({"::/0": "A", "fd00:7::/64": "V", "fd00:7::5/128": "A"}, "fd00:7::6", "V"),
    ({"::/0": "A", "fd00:7::/64": "V", "fd00:7::5/128": "A"}, "fd00:8::1", "A"),
    ({"::/0": "V"}, "2001:db8::1", "V"),
    ({"fd00:7::5/128": "V"}, "fd00:7::5", "V"),
], ids=["128-wins", "64-over-0", "falls-to-0", "only-default", "only-host"])
def test_longest_prefix_through_the_datapath(make_rig6, routes, dst, peer):
    rig = make_rig6(routes=False)
    peers = {"A": PEER_A, "V": PEER_B}  # V: the other peer, B (v4, for both datapaths)
    for net, who in routes.items():
        rig.dp.set_route(ipaddress.IPv6Network(net), peers[who])
    pkt = sized6(LOCAL6, dst, 100)
    rig.to_tun(pkt)
    hit, miss = (rig.peer_a, rig.peer_b) if peer == "A" else (rig.peer_b, rig.peer_a)
    assert recv(hit)[0] == hopped6(pkt)
    assert nothing_on(miss)


def test_del_route_v6(make_rig6):
    rig = make_rig6()
    rig.dp.del_route(NET6_B)
    rig.to_tun(sized6(LOCAL6, "fd00:5:4::7", 100))
    assert nothing_on(rig.peer_b)
    assert rig.counters()["tx_drop_no_route"] == 1
    # B holds no subnet any more: not a peer, its datagrams are from an unknown source.
    rig.peer_b.sendto(sized6("fd00:5:4::7", LOCAL6, 100), rig.dp_addr)
    rig.from_udp()
    assert rig.counters()["rx_drop_unknown_source"] == 1


@pytest.mark.parametrize("dst", ["ff02::1", "ff02::1:ff00:10", "ff02::16", "fe80::1"])
def test_multicast_and_link_local_are_not_forwarded(make_rig6, dst):
    rig = make_rig6()
    rig.dp.set_route(ipaddress.IPv6Network("::/0"), PEER_A)  # even with a default route
    rig.to_tun(icmp6("fe80::5", dst, 135, 0, bytes(4) + a6("fd00:5:1::1")))
    assert nothing_on(rig.peer_a)
    assert rig.tun_writes() == []
    c = rig.counters()
    assert (c["tx_drop_local_scope"], c["tx_packets"], c["tx_drop_no_route"]) == (1, 0, 0)


def check_icmp6(reply: bytes, offender: bytes, kind: int, src: bytes) -> None:
    r = parse_icmp6(reply)
    assert (r.type, r.code, r.nxt, r.hops) == (kind, 0, 58, 64)
    assert r.checksum_ok and r.length_ok
    assert r.src == src and r.dst == offender[8:24]
    assert r.rest == bytes(4)
    assert r.quote == offender[:1232]


@pytest.mark.parametrize("size", [100, 1400])
def test_tun_hop_limit_exhausted_answers_time_exceeded(make_rig6, size):
    rig = make_rig6()
    pkt = sized6(LOCAL6, "fd00:5:2::7", size, hops=1)
    rig.to_tun(pkt)
    (reply,) = rig.tun_writes()
    check_icmp6(reply, pkt, 3, OWN6.network_address.packed)
    assert len(reply) == min(48 + size, 1280)
    assert nothing_on(rig.peer_a)
    c = rig.counters()
    assert (c["tx_drop_ttl"], c["icmp_time_exceeded_sent"], c["tx_packets"]) == (1, 1, 0)


def test_tun_hop_limit_two_forwarded_with_one(make_rig6):
    rig = make_rig6()
    pkt = sized6(LOCAL6, "fd00:5:2::7", 100, hops=2)
    rig.to_tun(pkt)
    assert recv(rig.peer_a)[0][7] == 1


def test_no_time_exceeded_before_our_v6_subnet_is_known(make_rig6):
    rig = make_rig6(own6=None)
    rig.to_tun(sized6(LOCAL6, "fd00:5:2::7", 100, hops=1))
    assert rig.tun_writes() == []
    c = rig.counters()
    assert (c["tx_drop_ttl"], c["icmp_time_exceeded_sent"]) == (1, 0)


def test_no_route_answers_destination_unreachable(make_rig6):
    rig = make_rig6()
    pkt = sized6(LOCAL6, "fd00:9::1", 200)
    rig.to_tun(pkt)
    (reply,) = rig.tun_writes()
    check_icmp6(reply, pkt, 1, a6("fd00:9::1"))
    c = rig.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"]) == (1, 1)


@pytest.mark.parametrize("pkt", [
    icmp6(LOCAL6, "fd00:9::1", 1, 0, bytes(52)),
    icmp6(LOCAL6, "fd00:9::1", 3, 0, bytes(52)),
    sized6("::", "fd00:9::1", 80),
], ids=["icmp-unreachable", "icmp-time-exceeded", "from-unspecified"])
def test_no_route_no_answer(make_rig6, pkt):
    rig = make_rig6()
    rig.to_tun(pkt)
    assert rig.tun_writes() == []
    c = rig.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"]) == (1, 0)


def test_icmp6_errors_are_rate_limited_per_destination(make_rig6):
    rig = make_rig6()
    for _ in range(8):
        rig.to_tun(sized6(LOCAL6, "fd00:9::1", 80))
    assert len(rig.tun_writes()) == 6  # the burst
    c = rig.counters()
    assert (c["icmp_unreachable_sent"], c["icmp_rate_limited"]) == (6, 2)


# -- UDP -> TUN ------------------------------------------------------------------------
def test_v6_from_a_v4_peer_delivered(make_rig6):
    rig = make_rig6()
    pkt = sized6("fd00:5:2::9", LOCAL6, 600)
    rig.peer_a.sendto(pkt, rig.dp_addr)
    rig.from_udp()
    assert rig.tun_writes() == [hopped6(pkt)]
    c = rig.counters()
    assert (c["rx_packets"], c["rx_bytes"], c["rx_datagrams"]) == (1, 600, 1)


@pytest.mark.parametrize("inner", ["v6", "v4"])
def test_from_a_v6_peer_delivered(make_rig6, inner):
    rig = make_rig6()
    pkt = (sized6("fd00:5:3::9", LOCAL6, 300) if inner == "v6"
           else sized_packet("10.5.3.9", LOCAL4, 300))
    rig.peer_v.sendto(pkt, rig.dp_addr6)
    rig.from_udp6()
    assert rig.tun_writes() == [hopped6(pkt) if inner == "v6" else hopped(pkt)]


def test_v6_trailing_bytes_cut_to_the_payload_length(make_rig6):
    rig = make_rig6()
    pkt = sized6("fd00:5:2::9", LOCAL6, 100)
    rig.peer_a.sendto(pkt + b"junk", rig.dp_addr)
    rig.from_udp()
    assert rig.tun_writes() == [hopped6(pkt)]


def test_v6_spoofed_source_dropped(make_rig6):
    rig = make_rig6()
    rig.peer_a.sendto(sized6("fd00:5:4::9", LOCAL6, 100), rig.dp_addr)  # B's subnet from A
    rig.peer_b.sendto(sized6("fd00:5:2::9", LOCAL6, 100), rig.dp_addr)  # A's from B
    rig.from_udp()
    assert rig.tun_writes() == []
    assert rig.counters()["rx_drop_spoofed_source"] == 2


def test_v6_check_source_off_accepts_any_inner_source(make_rig6):
    rig = make_rig6(check_source=False)
    pkt = sized6("fd00:77::9", LOCAL6, 100)
    rig.peer_a.sendto(pkt, rig.dp_addr)
    rig.from_udp()
    assert rig.tun_writes() == [hopped6(pkt)]


@pytest.mark.parametrize("own6", [OWN6, None], ids=["other-subnet", "subnet-unset"])
def test_v6_destination_outside_our_subnet_dropped(make_rig6, own6):
    rig = make_rig6(own6=own6)
    rig.peer_a.sendto(sized6("fd00:5:2::9", "fd00:5:4::1", 100), rig.dp_addr)
    rig.peer_a.sendto(sized6("fd00:5:2::9", LOCAL6, 100), rig.dp_addr)
    rig.from_udp()
    delivered = rig.tun_writes()
    c = rig.counters()
    if own6 is None:
        assert delivered == [] and c["rx_drop_dst_outside"] == 2
    else:
        assert len(delivered) == 1 and c["rx_drop_dst_outside"] == 1


@pytest.mark.parametrize("datagram", [
    b"\x60" + bytes(38),                                   # shorter than a v6 header
    b"\x60\0\0\0\0\x40" + bytes(54),                       # payload length beyond the datagram
], ids=["short", "payload-beyond"])
def test_v6_malformed_dropped(make_rig6, datagram):
    rig = make_rig6(check_source=False)
    rig.peer_a.sendto(datagram, rig.dp_addr)
    rig.from_udp()
    assert rig.tun_writes() == []
    assert rig.counters()["rx_drop_malformed"] == 1


def test_v6_hop_limit_exhausted_answers_back_over_the_v4_underlay(make_rig6):
    rig = make_rig6()
    pkt = sized6("fd00:5:2::9", LOCAL6, 300, hops=1)
    rig.peer_a.sendto(pkt, rig.dp_addr)
    rig.from_udp()
    assert rig.tun_writes() == []
    reply, src = recv(rig.peer_a)
    assert src == rig.dp_addr
    check_icmp6(reply, pkt, 3, OWN6.network_address.packed)
    c = rig.counters()
    assert (c["rx_drop_ttl"], c["icmp_time_exceeded_sent"]) == (1, 1)


def test_v4_ttl_exhausted_answers_back_over_the_v6_underlay(make_rig6):
    rig = make_rig6()
    pkt = sized_packet("10.5.3.9", LOCAL4, 120, ttl=1)
    rig.peer_v.sendto(pkt, rig.dp_addr6)
    rig.from_udp6()
    reply, src = recv(rig.peer_v)
    assert src[:2] == rig.dp_addr6
    r = parse_icmp(reply)
    assert (r.type, r.code, r.icmp_ok, r.ip_ok) == (11, 0, True, True)


def test_v6_hop_limit_exhausted_icmp_error_gets_no_answer(make_rig6):
    rig = make_rig6()
    rig.peer_a.sendto(icmp6("fd00:5:2::9", LOCAL6, 3, 0, bytes(52), hops=1), rig.dp_addr)
    rig.from_udp()
    assert nothing_on(rig.peer_a)
    c = rig.counters()
    assert (c["rx_drop_ttl"], c["icmp_time_exceeded_sent"]) == (1, 0)


def test_gro_on_the_v6_socket_splits_and_checks_each(make_rig6):
    rig = make_rig6(gro=True)
    assert rig.dp.offloads()["udp_gro"]
    good = [sized6("fd00:5:3::9", LOCAL6, 500, fill=i) for i in range(3)]
    spoofed = sized6("fd00:5:2::9", LOCAL6, 500)
    seg = struct.pack("=H", 500)
    rig.peer_v.sendmsg([b"".join([good[0], spoofed, good[1], good[2]])],
                       [(socket.SOL_UDP, 103, seg)], 0, rig.dp_addr6)
    rig.from_udp6()
    assert rig.tun_writes() == [hopped6(p) for p in good]
    c = rig.counters()
    assert (c["gro_receives"], c["rx_datagrams"], c["rx_packets"],
            c["rx_drop_spoofed_source"]) == (1, 4, 3, 1)


# -- control -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PythonDatapath, CDatapath], ids=["python", "c"])
def test_a_v6_peer_needs_the_v6_socket(cls):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dp = cls(a.fileno(), s, port=8285, mtu=MTU)
        with pytest.raises(ValueError, match="no IPv6 socket"):
            dp.set_route(NET6_A, PEER_V)
        dp.set_route(NET6_A, PEER_A)  # a v6 subnet behind a v4 peer needs none
        with pytest.raises(ValueError, match="cannot be ::/0"):
            dp.set_subnet(ipaddress.IPv6Network("::/0"))
    finally:
        for x in (a, b, s):
            x.close()


def test_setting_one_family_leaves_the_other(make_rig6):
    rig = make_rig6()
    rig.dp.set_subnet(ipaddress.IPv6Network("fd00:5:9::/64"))
    rig.peer_a.sendto(sized_packet("10.5.2.9", LOCAL4, 100), rig.dp_addr)
    rig.peer_a.sendto(sized6("fd00:5:2::9", "fd00:5:9::1", 100), rig.dp_addr)
    rig.from_udp()
    assert len(rig.tun_writes()) == 2


def test_the_c_datapath_refuses_peers_in_0_0_0_0_8():
    # Its v6 peers' ids live there (c_datapath.py): no v4 peer may.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dp = CDatapath(a.fileno(), s, port=8285, mtu=MTU)
        with pytest.raises(ValueError, match=r"0\.0\.0\.0/8"):
            dp.set_route(NET4_A, ipaddress.IPv4Address("0.0.0.7"))
    finally:
        for x in (a, b, s):
            x.close()


# -- run() -------------------------------------------------------------------------------
async def test_run_reads_both_sockets(make_rig6):
    rig = make_rig6()
    loop = asyncio.get_running_loop()
    for s in (rig.tun, rig.peer_a, rig.peer_v):
        s.setblocking(False)
    task = asyncio.create_task(rig.dp.run())
    try:
        out = sized6(LOCAL6, "fd00:5:3::7", 700)
        rig.tun.send(out)
        got = await asyncio.wait_for(loop.sock_recv(rig.peer_v, BUF), 5)
        assert got == hopped6(out)
        for sender, to, src in ((rig.peer_v, rig.dp_addr6, "fd00:5:3::7"),
                                (rig.peer_a, rig.dp_addr, "fd00:5:2::7")):
            back = sized6(src, LOCAL6, 200)
            sender.sendto(back, to)
            got = await asyncio.wait_for(loop.sock_recv(rig.tun, BUF), 5)
            assert got == hopped6(back)
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    assert task.exception() is None
    c = rig.counters()
    assert (c["tx_packets"], c["rx_packets"]) == (1, 2)


@pytest.mark.parametrize("kind", ["python", "c"])
async def test_run_moves_v6_both_ways(make_rig6, kind):
    rig = make_rig6()
    loop = asyncio.get_running_loop()
    for s in (rig.tun, rig.peer_a):
        s.setblocking(False)
    task = asyncio.create_task(rig.dp.run())
    try:
        out = sized6(LOCAL6, "fd00:5:2::7", 900)
        rig.tun.send(out)
        got = await asyncio.wait_for(loop.sock_recv(rig.peer_a, BUF), 5)
        assert got == hopped6(out)
        back = sized6("fd00:5:2::7", LOCAL6, 300)
        rig.peer_a.sendto(back, rig.dp_addr)
        assert await asyncio.wait_for(loop.sock_recv(rig.tun, BUF), 5) == hopped6(back)
        rig.tun.send(sized6(LOCAL6, "fd00:5:2::7", 100, hops=1))
        reply = await asyncio.wait_for(loop.sock_recv(rig.tun, BUF), 5)
        assert parse_icmp6(reply).type == 3 and parse_icmp6(reply).checksum_ok
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    c = rig.counters()
    assert (c["tx_packets"], c["rx_packets"], c["icmp_time_exceeded_sent"]) == (1, 1, 1)


def test_v6_route_churn_matches_a_reference(make_rig6):
    """Random v6 routes of mixed lengths (/0 to /128) set, moved and deleted between two
    v4 peers; after each round every probe goes where a linear-scan reference says (or is
    refused with no route). Exercises the C table's growth and backward-shift deletion."""
    rig = make_rig6(routes=False)
    rng = random.Random(1406)
    peers = {PEER_A: rig.peer_a, PEER_B: rig.peer_b}
    ref: dict[ipaddress.IPv6Network, ipaddress.IPv4Address] = {}
    base = int(ipaddress.IPv6Address("fd00:6::"))
    for _ in range(6):
        for _ in range(150):
            plen = rng.choice([0, 8, 32, 48, 60, 64, 64, 64, 96, 127, 128])
            a = base | rng.getrandbits(16) << 80 | rng.getrandbits(8) << 64 | rng.getrandbits(4)
            net = ipaddress.IPv6Network((a, plen), strict=False)
            if rng.random() < 0.3 and ref:
                gone = rng.choice(sorted(ref))
                rig.dp.del_route(gone)
                del ref[gone]
            else:
                ref[net] = rng.choice([PEER_A, PEER_B])
                rig.dp.set_route(net, ref[net])
        probes = []
        for _ in range(40):
            if rng.random() < 0.7:
                n = rng.choice(sorted(ref))
                probes.append(int(n.network_address) + rng.choice([0, n.num_addresses - 1]))
            else:
                probes.append(base | rng.getrandbits(16) << 80 | rng.getrandbits(8) << 64)
        want: dict[ipaddress.IPv4Address, list[bytes]] = {PEER_A: [], PEER_B: []}
        no_route = 0
        pkts = []
        for p in probes:
            dst = ipaddress.IPv6Address(p)
            if dst.is_multicast or dst.is_link_local:
                continue
            pkt = sized6(LOCAL6, str(dst), 64 + len(pkts) % 50)
            hits = [n for n in ref if dst in n]
            if hits:
                want[ref[max(hits, key=lambda n: n.prefixlen)]].append(hopped6(pkt))
            else:
                no_route += 1
            pkts.append(pkt)
        before = rig.counters()["tx_drop_no_route"]
        rig.to_tun(*pkts)
        for peer, sock in peers.items():
            assert [recv(sock)[0] for _ in want[peer]] == want[peer]
            assert nothing_on(sock)
        assert rig.counters()["tx_drop_no_route"] - before == no_route
        rig.tun_writes()  # the no-route answers
