"""Unit tests for PythonDatapath on a stand-in TUN and loopback UDP, and datapath choice."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import re
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from backends.udp.packet import checksum
from backends.udp.python_datapath import PythonDatapath
from backends.udp.selection import DATAPATHS, choose_datapath

MTU = 1400
NET_A = ipaddress.IPv4Network("10.5.2.0/24")
NET_B = ipaddress.IPv4Network("10.5.3.0/24")
PEER_A = ipaddress.IPv4Address("127.0.0.2")
PEER_B = ipaddress.IPv4Address("127.0.0.3")
STRANGER = "127.0.0.4"
LOCAL = "10.5.1.10"  # a container on this host
BUF = 1 << 20


def ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def make_packet(src: str, dst: str, size: int = 100, *, ttl: int = 64, proto: int = 17,
                ihl: int = 5, frag: int = 0x4000, fill: int | None = None) -> bytes:
    """A valid IPv4 packet of `size` bytes with a correct header checksum."""
    hlen = ihl * 4
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, size, 0x4242, frag, ttl, proto,
                              0, ip(src), ip(dst)) + b"\x01" * (hlen - 20))
    struct.pack_into("!H", h, 10, checksum(h))
    body = bytes([fill if fill is not None else size & 0xFF]) * (size - hlen)
    return bytes(h + body)


def forwarded(pkt: bytes) -> bytes:
    """What a hop makes of `pkt`: TTL one less, header checksum recomputed in full."""
    p = bytearray(pkt)
    ihl = (p[0] & 0x0F) * 4
    p[8] -= 1
    p[10] = p[11] = 0
    struct.pack_into("!H", p, 10, checksum(p[:ihl]))
    return bytes(p)


def assert_hop(got: bytes, sent: bytes) -> None:
    assert len(got) == len(sent)
    assert got[8] == sent[8] - 1
    assert checksum(got[:(got[0] & 0x0F) * 4]) == 0
    assert got == forwarded(sent)


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


@dataclass
class Rig:
    dp: PythonDatapath
    tun: socket.socket  # the test's end of the stand-in TUN
    dp_addr: tuple[str, int]
    peer_a: socket.socket
    peer_b: socket.socket
    stranger: socket.socket
    from_tun: Callable[[], None]
    from_udp: Callable[[], None]

    def to_tun(self, *pkts: bytes) -> None:
        """Packets the kernel routes into flannel0, read in one wake-up."""
        for p in pkts:
            self.tun.send(p)
        self.from_tun()

    def to_udp(self, sender: socket.socket, *datagrams: bytes) -> None:
        for d in datagrams:
            sender.sendto(d, self.dp_addr)
        self.from_udp()

    def drain_tun(self) -> list[bytes]:
        out = []
        self.tun.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.tun.recv(BUF))
        return out

    def drops(self) -> int:
        c = self.dp.counters()
        return sum(v for k, v in c.items() if k.startswith("rx_drop_"))


def _udp(addr: str, port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    s.bind((addr, port))
    return s


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    socks: list[socket.socket] = []

    def make(*, gso: bool = False, check_source: bool = True, mtu: int = MTU,
             routes: bool = True) -> Rig:
        dp_end, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (dp_end, tun):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
        sock = _udp("127.0.0.1")
        peer_a = _udp(str(PEER_A))
        port = peer_a.getsockname()[1]
        peer_b = _udp(str(PEER_B), port)
        stranger = _udp(STRANGER)
        socks.extend((dp_end, tun, sock, peer_a, peer_b, stranger))
        dp = PythonDatapath(dp_end.fileno(), sock, port=port, mtu=mtu,
                            check_source=check_source, gso=gso, gro=False)
        if routes:
            dp.set_route(NET_A, PEER_A)
            dp.set_route(NET_B, PEER_B)
        os.set_blocking(dp_end.fileno(), False)
        sock.setblocking(False)
        return Rig(dp, tun, sock.getsockname(), peer_a, peer_b, stranger,
                   dp._from_tun(), dp._from_udp())

    yield make
    for s in socks:
        s.close()


GSO = pytest.mark.parametrize("gso", [True, False], ids=["gso", "nogso"])


# -- TUN -> UDP -------------------------------------------------------------------------
@GSO
def test_tun_to_udp_one_packet(make_rig, gso):
    rig = make_rig(gso=gso)
    pkt = make_packet(LOCAL, "10.5.2.7", 300)
    rig.to_tun(pkt)
    data, src = recv(rig.peer_a)
    assert_hop(data, pkt)
    assert src == rig.dp_addr
    assert nothing_on(rig.peer_a) and nothing_on(rig.peer_b)
    c = rig.dp.counters()
    assert (c["tx_packets"], c["tx_bytes"]) == (1, 300)
    assert c["gso_sends"] == 0


def test_gso_probe_on_loopback(make_rig):
    assert make_rig(gso=True).dp.gso in (True, False)  # probed, not assumed
    assert make_rig(gso=False).dp.gso is False
    assert "udp gso off" in make_rig(gso=False).dp.mode()


@GSO
def test_tun_to_udp_batch_is_one_packet_per_datagram(make_rig, gso):
    rig = make_rig(gso=gso)
    pkts = [make_packet(LOCAL, f"10.5.2.{i}", 1000, fill=i) for i in range(1, 6)]
    pkts.append(make_packet(LOCAL, "10.5.2.99", 400, fill=99))  # the last one shorter
    rig.to_tun(*pkts)
    for pkt in pkts:
        data, _ = recv(rig.peer_a)
        assert_hop(data, pkt)
    assert nothing_on(rig.peer_a)
    c = rig.dp.counters()
    assert c["tx_packets"] == 6
    assert c["tx_bytes"] == 5 * 1000 + 400
    assert c["gso_sends"] == (1 if rig.dp.gso else 0)
    assert c["tx_drop_send_error"] == 0


def test_gso_refused_by_the_socket_falls_back_to_one_datagram_per_send(make_rig):
    rig = make_rig(gso=True)
    assert rig.dp.gso, "loopback takes UDP GSO on this kernel"
    # UDP GSO needs UDP checksums; with SO_NO_CHECK the kernel refuses a GSO send.
    rig.dp.sock.setsockopt(socket.SOL_SOCKET, 11, 1)
    pkts = [make_packet(LOCAL, "10.5.2.5", 700, fill=i) for i in range(5)]
    rig.to_tun(*pkts)
    for pkt in pkts:
        data, _ = recv(rig.peer_a)
        assert_hop(data, pkt)
    c = rig.dp.counters()
    assert rig.dp.gso is False and c["offload_udp_gso"] == 0
    assert (c["tx_packets"], c["gso_sends"], c["tx_drop_send_error"]) == (5, 0, 0)


@GSO
def test_tun_to_udp_longer_packet_starts_new_run(make_rig, gso):
    rig = make_rig(gso=gso)
    sizes = [500, 500, 300, 500, 800, 800, 800, 20]
    pkts = [make_packet(LOCAL, "10.5.2.5", n, fill=i) for i, n in enumerate(sizes)]
    rig.to_tun(*pkts)
    for pkt in pkts:
        data, _ = recv(rig.peer_a)
        assert_hop(data, pkt)
    assert nothing_on(rig.peer_a)
    assert rig.dp.tx_packets == len(sizes)


@GSO
def test_tun_to_udp_more_than_64_segments(make_rig, gso):
    rig = make_rig(gso=gso)
    pkts = [make_packet(LOCAL, "10.5.2.5", 200, fill=i) for i in range(150)]
    rig.to_tun(*pkts)
    for pkt in pkts:
        data, _ = recv(rig.peer_a)
        assert_hop(data, pkt)
    assert nothing_on(rig.peer_a)
    c = rig.dp.counters()
    assert c["tx_packets"] == 150
    if rig.dp.gso:
        assert c["gso_sends"] == 3  # 64 + 64 + 22


@GSO
def test_tun_to_udp_interleaved_peers(make_rig, gso):
    rig = make_rig(gso=gso)
    order = "ABABAABBBA"
    pkts = [make_packet(LOCAL, "10.5.2.9" if p == "A" else "10.5.3.9", 600, fill=i)
            for i, p in enumerate(order)]
    rig.to_tun(*pkts)
    for peer, name in ((rig.peer_a, "A"), (rig.peer_b, "B")):
        for pkt, p in zip(pkts, order, strict=True):
            if p == name:
                data, _ = recv(peer)
                assert data[19] == pkt[19]  # to the right subnet
                assert_hop(data, pkt)
        assert nothing_on(peer)
    assert rig.dp.tx_packets == len(order)


@GSO
def test_tun_to_udp_bad_packets_in_a_batch_do_not_disturb_others(make_rig, gso):
    rig = make_rig(gso=gso)
    good = [make_packet(LOCAL, "10.5.2.1", 700, fill=i) for i in range(3)]
    rig.to_tun(good[0], make_packet(LOCAL, "10.9.9.9", 700, fill=0xEE), good[1],
               b"\x60" + b"\x00" * 99, make_packet(LOCAL, "10.5.2.1", 700, ttl=1), good[2])
    for pkt in good:
        data, _ = recv(rig.peer_a)
        assert_hop(data, pkt)
    assert nothing_on(rig.peer_a)
    c = rig.dp.counters()
    assert (c["tx_packets"], c["tx_drop_no_route"], c["tx_drop_malformed"],
            c["tx_drop_ttl"]) == (3, 1, 1, 1)
    assert len(rig.drain_tun()) == 1  # the ICMP answer


def parse_icmp(reply: bytes) -> dict:
    assert reply[0] >> 4 == 4
    ihl = (reply[0] & 0x0F) * 4
    assert struct.unpack_from("!H", reply, 2)[0] == len(reply)
    icmp = reply[ihl:]
    return {"proto": reply[9], "ttl": reply[8], "src": reply[12:16], "dst": reply[16:20],
            "ip_ok": checksum(reply[:ihl]) == 0, "type": icmp[0], "code": icmp[1],
            "icmp_ok": checksum(icmp) == 0, "quote": icmp[8:]}


@GSO
def test_no_route_answers_net_unreachable(make_rig, gso):
    rig = make_rig(gso=gso)
    pkt = make_packet(LOCAL, "10.9.0.1", 120, proto=6)
    rig.to_tun(pkt)
    reply = rig.tun.recv(BUF)
    r = parse_icmp(reply)
    assert r["proto"] == 1
    assert r["dst"] == ip(LOCAL)
    assert r["src"] == ip("10.9.0.1")
    assert (r["type"], r["code"]) == (3, 0)
    assert r["ip_ok"] and r["icmp_ok"]
    assert r["quote"] == pkt[:28]
    c = rig.dp.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"], c["tx_packets"]) == (1, 1, 0)
    assert nothing_on(rig.peer_a) and nothing_on(rig.peer_b)


@pytest.mark.parametrize(
    "pkt",
    [make_packet(LOCAL, "10.9.0.1", 84, proto=1),  # ICMP
     make_packet(LOCAL, "10.9.0.1", 84, frag=0x2010)],  # non-first fragment
    ids=["icmp", "fragment"],
)
def test_no_route_no_answer(make_rig, pkt):
    rig = make_rig()
    rig.to_tun(pkt)
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"]) == (1, 0)


@pytest.mark.parametrize("ttl", [0, 1])
def test_tun_ttl_expired_dropped(make_rig, ttl):
    rig = make_rig()
    rig.to_tun(make_packet(LOCAL, "10.5.2.7", ttl=ttl))
    assert nothing_on(rig.peer_a)
    c = rig.dp.counters()
    assert (c["tx_drop_ttl"], c["tx_packets"]) == (1, 0)


def test_tun_ttl_two_forwarded_with_one(make_rig):
    rig = make_rig()
    pkt = make_packet(LOCAL, "10.5.2.7", ttl=2)
    rig.to_tun(pkt)
    data, _ = recv(rig.peer_a)
    assert data[8] == 1
    assert_hop(data, pkt)


@pytest.mark.parametrize(
    "pkt",
    [b"", b"\x45" * 19, b"\x60" + b"\x00" * 59, bytes(40)],
    ids=["empty", "short", "ipv6", "version0"],
)
def test_tun_malformed(make_rig, pkt):
    rig = make_rig()
    rig.to_tun(pkt)
    assert nothing_on(rig.peer_a)
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["tx_drop_malformed"], c["tx_packets"], c["tx_drop_no_route"]) == (1, 0, 0)


def test_tun_to_udp_checksum_feff(make_rig):
    rig = make_rig()
    pkt = bytearray(make_packet(LOCAL, "10.5.2.7", 60))
    pkt[4] = pkt[5] = pkt[10] = pkt[11] = 0
    rest = (~checksum(pkt[:20])) & 0xFFFF
    ident = 0x0100 + ((~rest) & 0xFFFF)  # so that the checksum comes out as 0xFEFF
    struct.pack_into("!H", pkt, 4, (ident & 0xFFFF) + (ident >> 16))
    struct.pack_into("!H", pkt, 10, checksum(pkt[:20]))
    assert pkt[10:12] == b"\xfe\xff"
    rig.to_tun(bytes(pkt))
    data, _ = recv(rig.peer_a)
    assert data == forwarded(bytes(pkt))


# -- UDP -> TUN -------------------------------------------------------------------------
def test_udp_to_tun_from_peer(make_rig):
    rig = make_rig()
    pkt = make_packet("10.5.2.5", LOCAL, 500)
    rig.to_udp(rig.peer_a, pkt)
    got = rig.drain_tun()
    assert len(got) == 1
    assert_hop(got[0], pkt)
    c = rig.dp.counters()
    assert (c["rx_datagrams"], c["rx_packets"], c["rx_bytes"]) == (1, 1, 500)
    assert rig.drops() == 0


def test_udp_to_tun_several_datagrams_one_wakeup(make_rig):
    rig = make_rig()
    pkts = [make_packet("10.5.2.5", LOCAL, 100 + i) for i in range(5)]
    pkts += [make_packet("10.5.3.5", LOCAL, 60)]
    rig.peer_b.sendto(pkts[-1], rig.dp_addr)
    rig.to_udp(rig.peer_a, *pkts[:-1])
    got = rig.drain_tun()
    assert sorted(got) == sorted(forwarded(p) for p in pkts)
    assert rig.dp.rx_packets == 6


def test_udp_trailing_bytes_cut_to_total_length(make_rig):
    rig = make_rig()
    pkt = make_packet("10.5.2.5", LOCAL, 80)
    rig.to_udp(rig.peer_a, pkt + b"junk")
    assert rig.drain_tun() == [forwarded(pkt)]


def test_udp_unknown_source_dropped(make_rig):
    rig = make_rig()
    rig.to_udp(rig.stranger, make_packet("10.5.2.5", LOCAL))
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["rx_datagrams"], c["rx_drop_unknown_source"], c["rx_packets"]) == (1, 1, 0)


def test_udp_from_localhost_unknown_when_routes_name_other_peers(make_rig):
    rig = make_rig()
    sender = _udp("127.0.0.1")
    try:
        rig.to_udp(sender, make_packet("10.5.2.5", LOCAL))
    finally:
        sender.close()
    assert rig.drain_tun() == []
    assert rig.dp.rx_drop_unknown_source == 1


def test_udp_spoofed_inner_source_dropped(make_rig):
    rig = make_rig()
    rig.to_udp(rig.peer_a, make_packet("10.5.3.5", LOCAL),  # B's subnet, sent by A
               make_packet("10.7.0.1", LOCAL))
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["rx_datagrams"], c["rx_drop_spoofed_source"], c["rx_packets"]) == (2, 2, 0)


def test_udp_check_source_off_accepts_anyone(make_rig):
    rig = make_rig(check_source=False)
    a = make_packet("10.5.3.5", LOCAL, 90)  # spoofed inner source
    b = make_packet("10.5.2.5", LOCAL, 91)  # from an address that is no peer
    rig.to_udp(rig.peer_a, a)
    rig.to_udp(rig.stranger, b)
    assert rig.drain_tun() == [forwarded(a), forwarded(b)]
    c = rig.dp.counters()
    assert (c["rx_packets"], c["rx_drop_spoofed_source"], c["rx_drop_unknown_source"]) == (
        2, 0, 0)


def test_udp_check_source_off_with_no_routes(make_rig):
    rig = make_rig(check_source=False, routes=False)
    pkt = make_packet("192.0.2.1", LOCAL)
    rig.to_udp(rig.stranger, pkt)
    assert rig.drain_tun() == [forwarded(pkt)]


def _bad_total() -> bytes:
    p = bytearray(make_packet("10.5.2.5", LOCAL, 100))
    struct.pack_into("!H", p, 2, 101)
    return bytes(p)


def _ihl(n: int) -> bytes:
    p = bytearray(make_packet("10.5.2.5", LOCAL, 100))
    p[0] = 0x40 | n
    return bytes(p)


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x45" * 19, make_packet("10.5.2.5", LOCAL)[:19],
     b"\x60" + make_packet("10.5.2.5", LOCAL)[1:], _ihl(4), _ihl(0), _bad_total()],
    ids=["empty", "short", "cut-header", "version6", "ihl4", "ihl0", "total-too-big"],
)
def test_udp_malformed_dropped(make_rig, datagram):
    rig = make_rig()
    rig.to_udp(rig.peer_a, datagram)
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["rx_datagrams"], c["rx_drop_malformed"], c["rx_packets"]) == (1, 1, 0)


def test_udp_oversized_dropped_and_mtu_sized_accepted(make_rig):
    rig = make_rig()
    big = make_packet("10.5.2.5", LOCAL, MTU + 1)
    fits = make_packet("10.5.2.5", LOCAL, MTU)
    rig.to_udp(rig.peer_a, big)
    assert rig.drain_tun() == []
    assert rig.dp.rx_drop_oversized == 1
    rig.to_udp(rig.peer_a, fits)
    assert rig.drain_tun() == [forwarded(fits)]
    assert (rig.dp.rx_datagrams, rig.dp.rx_packets) == (2, 1)


@pytest.mark.parametrize("ttl", [0, 1])
def test_udp_ttl_expired_dropped(make_rig, ttl):
    rig = make_rig()
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL, ttl=ttl))
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["rx_drop_ttl"], c["rx_packets"]) == (1, 0)


def test_del_route_stops_forwarding_and_accepting(make_rig):
    rig = make_rig()
    rig.dp.del_route(NET_A)
    rig.to_tun(make_packet(LOCAL, "10.5.2.7"))
    assert nothing_on(rig.peer_a)
    assert parse_icmp(rig.tun.recv(BUF))["type"] == 3
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))
    assert rig.drain_tun() == []
    c = rig.dp.counters()
    assert (c["tx_drop_no_route"], c["rx_drop_unknown_source"]) == (1, 1)
    # B is untouched
    pkt = make_packet("10.5.3.5", LOCAL)
    rig.to_udp(rig.peer_b, pkt)
    assert rig.drain_tun() == [forwarded(pkt)]
    rig.dp.del_route(NET_A)  # deleting again is harmless


def test_del_route_keeps_other_subnets_of_same_peer(make_rig):
    rig = make_rig()
    extra = ipaddress.IPv4Network("10.5.4.0/24")
    rig.dp.set_route(extra, PEER_A)
    rig.dp.del_route(NET_A)
    ok = make_packet("10.5.4.5", LOCAL)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL), ok)
    assert rig.drain_tun() == [forwarded(ok)]
    assert rig.dp.rx_drop_spoofed_source == 1
    rig.to_tun(make_packet(LOCAL, "10.5.4.1"))
    assert recv(rig.peer_a)[0][19] == 1


def test_set_route_moves_subnet_to_new_peer(make_rig):
    rig = make_rig()
    rig.dp.set_route(NET_A, PEER_B)
    pkt = make_packet(LOCAL, "10.5.2.7")
    rig.to_tun(pkt)
    assert_hop(recv(rig.peer_b)[0], pkt)
    assert nothing_on(rig.peer_a)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))  # A holds no subnet any more
    assert rig.dp.rx_drop_unknown_source == 1
    moved = make_packet("10.5.2.5", LOCAL)
    rig.to_udp(rig.peer_b, moved)
    assert rig.drain_tun() == [forwarded(moved)]


def test_counters_consistent_after_random_datagrams(make_rig):
    rig = make_rig()
    rng = random.Random(2024)
    valid_sent = 0
    delivered: list[bytes] = []
    sent = 0
    while sent < 2_000:
        batch = []
        for _ in range(25):
            r = rng.random()
            if r < 0.15:
                size = rng.randint(20, MTU)
                pkt = make_packet(f"10.5.2.{rng.randint(0, 255)}", LOCAL, size,
                                  ttl=rng.randint(2, 255), fill=rng.getrandbits(8))
                batch.append((rig.peer_a, pkt))
                valid_sent += 1
            elif r < 0.25:
                batch.append((rig.stranger, rng.randbytes(rng.randint(0, 2000))))
            else:
                data = bytearray(rng.randbytes(rng.randint(0, 2000)))
                if data and rng.random() < 0.5:
                    data[0] = 0x40 | (data[0] & 0x0F)  # get past the version check
                batch.append((rig.peer_a, bytes(data)))
        for sender, data in batch:
            sender.sendto(data, rig.dp_addr)
        sent += len(batch)
        rig.from_udp()
        delivered += rig.drain_tun()
    c = rig.dp.counters()
    assert c["rx_datagrams"] == 2_000
    assert c["rx_datagrams"] == c["rx_packets"] + rig.drops()
    assert c["rx_packets"] == len(delivered) >= valid_sent
    assert c["rx_bytes"] == sum(map(len, delivered))
    assert c["rx_drop_unknown_source"] > 0 and c["rx_drop_malformed"] > 0
    assert c["rx_drop_oversized"] > 0
    for p in delivered:
        assert checksum(p[:(p[0] & 0x0F) * 4]) == 0
        assert ipaddress.IPv4Address(p[12:16]) in NET_A
    # still working
    pkt = make_packet("10.5.2.5", LOCAL, 333)
    rig.to_udp(rig.peer_a, pkt)
    assert rig.drain_tun() == [forwarded(pkt)]
    out = make_packet(LOCAL, "10.5.2.5", 333)
    rig.to_tun(out)
    assert_hop(recv(rig.peer_a)[0], out)


# -- run() on the event loop -----------------------------------------------------------
@GSO
async def test_run_moves_packets_both_ways_until_stopped(make_rig, gso):
    rig = make_rig(gso=gso)
    loop = asyncio.get_running_loop()
    for s in (rig.tun, rig.peer_a):
        s.setblocking(False)
    task = asyncio.create_task(rig.dp.run())
    try:
        pkts = [make_packet(LOCAL, "10.5.2.7", 900, fill=i) for i in range(4)]
        for p in pkts:
            rig.tun.send(p)
        for p in pkts:
            data = await asyncio.wait_for(loop.sock_recv(rig.peer_a, BUF), 5)
            assert_hop(data, p)
        back = make_packet("10.5.2.7", LOCAL, 200)
        rig.peer_a.sendto(back, rig.dp_addr)
        data = await asyncio.wait_for(loop.sock_recv(rig.tun, BUF), 5)
        assert_hop(data, back)
        rig.tun.send(make_packet(LOCAL, "10.8.0.1", 64))
        reply = await asyncio.wait_for(loop.sock_recv(rig.tun, BUF), 5)
        assert parse_icmp(reply)["type"] == 3
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None
    assert rig.dp.tx_packets == 4 and rig.dp.rx_packets == 1
    # stopped: nothing is moved any more
    rig.tun.send(make_packet(LOCAL, "10.5.2.7", 100))
    await asyncio.sleep(0.05)
    assert nothing_on(rig.peer_a)
    assert rig.dp.tx_packets == 4
    rig.dp.stop()  # stopping twice is harmless


def test_stop_before_run_is_harmless(make_rig):
    make_rig().dp.stop()


# -- choose_datapath ----------------------------------------------------------------------
@pytest.fixture
def no_fastpath(monkeypatch):
    """The C datapath is not built."""
    import backends.udp.selection

    monkeypatch.setattr(backends.udp.selection, "_c_datapath", lambda: None)


@pytest.fixture
def fake_fastpath(monkeypatch) -> type:
    """A built C datapath, whatever the build here."""
    import backends.udp.selection

    cls = type("CDatapath", (), {"name": "c"})
    monkeypatch.setattr(backends.udp.selection, "_c_datapath", lambda: cls)
    return cls


def test_datapath_names():
    assert set(DATAPATHS) == {"auto", "python", "c"}


@pytest.mark.usefixtures("no_fastpath")
@pytest.mark.parametrize("option", ["python", "PYTHON", "auto", ""])
def test_choose_python_without_c(option):
    assert choose_datapath(option, {}) is PythonDatapath


@pytest.mark.usefixtures("no_fastpath")
def test_choose_c_not_built_names_option():
    with pytest.raises(ValueError, match=r"Backend\.Datapath"):
        choose_datapath("c", {})


@pytest.mark.usefixtures("no_fastpath")
def test_choose_c_not_built_from_env_names_env():
    with pytest.raises(ValueError, match="TWEED_DATAPATH"):
        choose_datapath("python", {"TWEED_DATAPATH": "c"})


def test_choose_python_even_when_c_built(fake_fastpath):
    assert choose_datapath("python", {}) is PythonDatapath


def test_choose_auto_and_c_take_c_when_built(fake_fastpath):
    assert choose_datapath("auto", {}) is fake_fastpath
    assert choose_datapath("c", {}) is fake_fastpath


def test_env_wins_over_option(fake_fastpath):
    assert choose_datapath("c", {"TWEED_DATAPATH": "python"}) is PythonDatapath
    assert choose_datapath("python", {"TWEED_DATAPATH": "c"}) is fake_fastpath
    assert choose_datapath("python", {"TWEED_DATAPATH": ""}) is PythonDatapath


@pytest.mark.parametrize(
    ("option", "environ", "where"),
    [
        ("turbo", {}, "Backend.Datapath"),
        ("python", {"TWEED_DATAPATH": "rust"}, "TWEED_DATAPATH"),
        ("turbo", {"TWEED_DATAPATH": "bogus"}, "TWEED_DATAPATH"),
    ],
)
def test_choose_unknown_name(option, environ, where):
    with pytest.raises(ValueError, match=re.escape(where)) as info:
        choose_datapath(option, environ)
    assert "unknown" in str(info.value)
