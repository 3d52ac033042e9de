"""The datapath behaviour suite: every test here runs against the python AND the C
datapath (the `kind` fixture), over a stand-in TUN (a unix datagram socketpair) and
loopback UDP, and the choice of datapath by name.

The tests drive a datapath one wake-up at a time: the python one's fd readers, the C one's
drain hooks (what its packet thread does when poll() says an fd is readable, run in the
test's thread), so that one read batch or one receive batch holds the same packets in
both. run() is tested on its own, with the C packet thread and the python event loop
readers. What only one twin has is tested elsewhere: the C datapath's TSO cutting and its
Core in test_c_datapath.py, its pure segment/coalesce hooks in test_c_segmentation.py.
"""

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
from typing import Any

import pytest

# The C datapath must be built (make setup, pip install): without it this import fails
# the whole suite loudly, it never skips.
from backends.udp.c_datapath import CDatapath
from backends.udp.datapath import VNET_HDR, VNET_NONE, TunLost
from backends.udp.packet import ICMP_BURST, icmp_bucket
from backends.udp.python_datapath import PythonDatapath
from backends.udp.selection import DATAPATHS, choose_datapath
from tests.support.packets import (
    ACK,
    PROTO_ICMP,
    PROTO_TCP,
    PSH,
    addr,
    hopped,
    icmp_echo,
    icmp_message,
    inet_checksum,
    ip_header_ok,
    ip_packet,
    parse_icmp,
    parse_tcp,
    sized_packet,
    tcp_packet,
)

MTU = 1400
NET_A = ipaddress.IPv4Network("10.5.2.0/24")
NET_B = ipaddress.IPv4Network("10.5.3.0/24")
PEER_A = ipaddress.IPv4Address("127.0.0.2")
PEER_B = ipaddress.IPv4Address("127.0.0.3")
STRANGER = "127.0.0.4"
OWN = ipaddress.IPv4Network("10.5.1.0/24")  # this host's subnet
LOCAL = "10.5.1.10"  # a container on this host
BUF = 1 << 20
KINDS = {"python": PythonDatapath, "c": CDatapath}


def make_packet(src: str, dst: str, size: int = 100, *, ttl: int = 64, proto: int = 17,
                frag: int = 0, mf: bool = False, fill: int | None = None,
                options: bytes = b"") -> bytes:
    """A valid IPv4 packet of `size` bytes with DF set (unless fragmented)."""
    return sized_packet(src, dst, size, ttl=ttl, proto=proto, ident=0x4242,
                        df=not (frag or mf), mf=mf, frag=frag, fill=fill, options=options)


def assert_hop(got: bytes, sent: bytes) -> None:
    assert len(got) == len(sent)
    assert got[8] == sent[8] - 1
    assert ip_header_ok(got)
    assert got == hopped(sent)


def assert_forwarded(sock: socket.socket, pkts: list[bytes]) -> None:
    """Each of `pkts` arrived on `sock` in order, one hop on; then nothing more."""
    for pkt in pkts:
        assert_hop(recv(sock)[0], pkt)
    assert nothing_on(sock)


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
    kind: str
    dp: PythonDatapath | CDatapath
    tun: socket.socket  # the test's end of the stand-in TUN
    dp_addr: tuple[str, int]
    port: int
    peer_a: socket.socket
    peer_b: socket.socket
    stranger: socket.socket
    vnet: bool
    from_tun: Callable[[], None]
    from_udp: Callable[[], None]
    tun_fd: int  # the datapath's end of the stand-in TUN

    def counters(self) -> dict[str, int]:
        return self.dp.counters()

    def offloads(self) -> dict[str, bool]:
        return self.dp.offloads()

    def to_tun(self, *pkts: bytes) -> None:
        """Packets the kernel routes into flannel0, read in one wake-up."""
        for p in pkts:
            self.tun.send((VNET_NONE if self.vnet else b"") + p)
        self.from_tun()

    def to_udp(self, sender: socket.socket, *datagrams: bytes) -> None:
        """Datagrams from `sender`, received in one wake-up."""
        for d in datagrams:
            sender.sendto(d, self.dp_addr)
        self.from_udp()

    def writes(self) -> list[bytes]:
        """What the datapath wrote to the TUN, as written (with any vnet header)."""
        out = []
        self.tun.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.tun.recv(BUF))
        return out

    def drain_tun(self) -> list[bytes]:
        """The packets written to the TUN, each a plain one (no offload in its header)."""
        out = self.writes()
        if self.vnet:
            assert all(w[:VNET_HDR.size] == VNET_NONE for w in out)
            out = [w[VNET_HDR.size:] for w in out]
        return out

    def drops(self) -> int:
        return sum(v for k, v in self.counters().items() if k.startswith("rx_drop_"))


def _udp(address: str, port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    s.bind((address, port))
    return s


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    """The datapath under test: "python" or "c"."""
    return request.param


@pytest.fixture
def make_rig(kind: str) -> Iterator[Callable[..., Rig]]:
    socks: list[socket.socket] = []
    rigs: list[Rig] = []

    def make(*, gso: bool = False, gro: bool = False, check_source: bool = True,
             mtu: int = MTU, routes: bool = True, vnet: bool = False,
             coalesce: bool = True, own: ipaddress.IPv4Network | None = OWN,
             icmp_ratelimit_ms: int = 60_000) -> Rig:
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
        os.set_blocking(dp_end.fileno(), False)
        sock.setblocking(False)
        # The ICMP rate limit's bucket refills one error a minute here: a test sees its
        # burst (6 per destination) and nothing more, however slowly it runs.
        dp = KINDS[kind](dp_end.fileno(), sock, port=port, mtu=mtu, check_source=check_source,
                         gso=gso, gro=gro, vnet_hdr=vnet, coalesce=coalesce,
                         icmp_ratelimit_ms=icmp_ratelimit_ms)
        if own is not None:
            dp.set_subnet(own)
        if routes:
            dp.set_route(NET_A, PEER_A)
            dp.set_route(NET_B, PEER_B)
        if isinstance(dp, PythonDatapath):
            from_tun, from_udp = dp._from_tun(), dp._from_udp()
        else:
            from_tun, from_udp = dp._core.drain_tun, dp._core.drain_udp
        rig = Rig(kind, dp, tun, sock.getsockname(), port, peer_a, peer_b, stranger, vnet,
                  from_tun, from_udp, dp_end.fileno())
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.dp.stop()
    for s in socks:
        s.close()


GSO = pytest.mark.parametrize("gso", [True, False], ids=["gso", "nogso"])
VNET = pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])


# -- TUN -> UDP -------------------------------------------------------------------------
@GSO
@VNET
def test_tun_to_udp_one_packet(make_rig, gso, vnet):
    rig = make_rig(gso=gso, vnet=vnet)
    pkt = make_packet(LOCAL, "10.5.2.7", 300)
    rig.to_tun(pkt)
    data, src = recv(rig.peer_a)
    assert_hop(data, pkt)
    assert src == rig.dp_addr
    assert nothing_on(rig.peer_a) and nothing_on(rig.peer_b)
    c = rig.counters()
    assert (c["tx_packets"], c["tx_bytes"]) == (1, 300)
    assert c["gso_sends"] == 0


def test_gso_probe_on_loopback(make_rig):
    assert make_rig(gso=True).offloads()["udp_gso"] is True  # loopback takes it here
    off = make_rig(gso=False)
    assert off.offloads()["udp_gso"] is False
    assert "udp gso off" in off.dp.mode()
    assert off.counters()["offload_udp_gso"] == 0


def test_offloads_and_mode_name_the_datapath(make_rig, kind):
    rig = make_rig(gso=True, gro=True, vnet=True)
    assert rig.dp.name == kind
    assert rig.dp.mode().startswith(f"{kind} (")
    # A socketpair refuses TUNSETOFFLOAD, and the python datapath has no TSO at all.
    assert rig.offloads() == {"tun_tso": False, "udp_gso": True, "udp_gro": True,
                              "tun_coalesce": True}
    assert "tun tso off, udp gso on, udp gro on, tun coalesce on" in rig.dp.mode()
    c = rig.counters()
    assert (c["offload_tun_tso"], c["offload_udp_gso"], c["offload_udp_gro"],
            c["offload_tun_coalesce"]) == (0, 1, 1, 1)
    assert not make_rig(vnet=False).offloads()["tun_coalesce"]  # needs the vnet header
    assert not make_rig(vnet=True, coalesce=False).offloads()["tun_coalesce"]


@GSO
def test_tun_to_udp_batch_is_one_packet_per_datagram(make_rig, gso):
    rig = make_rig(gso=gso)
    pkts = [make_packet(LOCAL, f"10.5.2.{i}", 1000, fill=i) for i in range(1, 6)]
    pkts.append(make_packet(LOCAL, "10.5.2.99", 400, fill=99))  # the last one shorter
    rig.to_tun(*pkts)
    assert_forwarded(rig.peer_a, pkts)
    c = rig.counters()
    assert c["tx_packets"] == 6
    assert c["tx_bytes"] == 5 * 1000 + 400
    assert c["gso_sends"] == (1 if gso else 0)
    assert c["tx_drop_send_error"] == 0


def test_gso_refused_by_the_socket_falls_back_to_one_datagram_per_send(make_rig):
    rig = make_rig(gso=True)
    assert rig.offloads()["udp_gso"], "loopback takes UDP GSO on this kernel"
    # UDP GSO needs UDP checksums; with SO_NO_CHECK the kernel refuses a GSO send.
    rig.dp.sock.setsockopt(socket.SOL_SOCKET, 11, 1)
    pkts = [make_packet(LOCAL, "10.5.2.5", 700, fill=i) for i in range(5)]
    rig.to_tun(*pkts)
    assert_forwarded(rig.peer_a, pkts)
    c = rig.counters()
    assert rig.offloads()["udp_gso"] is False and c["offload_udp_gso"] == 0
    assert (c["tx_packets"], c["gso_sends"], c["tx_drop_send_error"]) == (5, 0, 0)


@GSO
def test_tun_to_udp_longer_packet_starts_new_run(make_rig, gso):
    rig = make_rig(gso=gso)
    sizes = [500, 500, 300, 500, 800, 800, 800, 20]
    pkts = [make_packet(LOCAL, "10.5.2.5", n, fill=i) for i, n in enumerate(sizes)]
    rig.to_tun(*pkts)
    assert_forwarded(rig.peer_a, pkts)
    c = rig.counters()
    assert c["tx_packets"] == len(sizes)
    # Runs: 500 500 300 (a shorter one ends a run), 500 alone (sent plainly), 800 800 800 20.
    assert c["gso_sends"] == (2 if gso else 0)


@GSO
def test_tun_to_udp_more_than_64_segments(make_rig, gso):
    rig = make_rig(gso=gso)
    pkts = [make_packet(LOCAL, "10.5.2.5", 200, fill=i) for i in range(150)]
    rig.to_tun(*pkts)
    assert_forwarded(rig.peer_a, pkts)
    c = rig.counters()
    assert c["tx_packets"] == 150
    assert c["gso_sends"] == (3 if gso else 0)  # 64 + 64 + 22


def test_tun_to_udp_a_run_ends_with_the_read_batch(make_rig):
    # 64 reads make a send batch in both datapaths: a run to one peer that would go on
    # past the 64th read is cut there.
    rig = make_rig(gso=True)
    pkts = [make_packet(LOCAL, "10.5.3.5", 300, fill=i) for i in range(10)]
    pkts += [make_packet(LOCAL, "10.5.2.5", 300, fill=i) for i in range(60)]
    rig.to_tun(*pkts)
    assert [recv(rig.peer_b)[0][-1] for _ in range(10)] == list(range(10))
    assert [recv(rig.peer_a)[0][-1] for _ in range(60)] == list(range(60))
    c = rig.counters()
    assert (c["tx_packets"], c["gso_sends"]) == (70, 3)  # 10 to B; 54 + 6 to A


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
    c = rig.counters()
    assert c["tx_packets"] == len(order)
    assert c["gso_sends"] == (2 if gso else 0)  # AA and BBB; the others go alone


@GSO
def test_tun_to_udp_bad_packets_in_a_batch_do_not_disturb_others(make_rig, gso):
    rig = make_rig(gso=gso)
    good = [make_packet(LOCAL, "10.5.2.1", 700, fill=i) for i in range(3)]
    rig.to_tun(good[0], make_packet(LOCAL, "10.9.9.9", 700, fill=0xEE), good[1],
               b"\x50" + b"\x00" * 99, make_packet(LOCAL, "10.5.2.1", 700, ttl=1), good[2])
    assert_forwarded(rig.peer_a, good)
    c = rig.counters()
    assert (c["tx_packets"], c["tx_drop_no_route"], c["tx_drop_malformed"],
            c["tx_drop_ttl"]) == (3, 1, 1, 1)
    # The ICMP answers: net unreachable, time exceeded.
    assert [parse_icmp(p).type for p in rig.drain_tun()] == [3, 11]


@GSO
def test_a_peer_the_socket_cannot_send_to_costs_only_its_own_packets(make_rig, gso):
    # Sending to a broadcast address without SO_BROADCAST fails (EACCES): that peer's
    # packets are dropped and counted, the other peer's still go, in order.
    rig = make_rig(gso=gso)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.9.0/24"),
                     ipaddress.IPv4Address("255.255.255.255"))
    order = "AXAXXAXA"
    pkts = [make_packet(LOCAL, "10.5.2.9" if p == "A" else "10.5.9.9", 600, fill=i)
            for i, p in enumerate(order)]
    rig.to_tun(*pkts)
    for pkt, p in zip(pkts, order, strict=True):
        if p == "A":
            assert_hop(recv(rig.peer_a)[0], pkt)
    assert nothing_on(rig.peer_a)
    c = rig.counters()
    assert (c["tx_packets"], c["tx_drop_send_error"]) == (4, 4)


@GSO
def test_no_route_answers_net_unreachable(make_rig, gso):
    rig = make_rig(gso=gso)
    pkt = make_packet(LOCAL, "10.9.0.1", 120, proto=PROTO_TCP)
    rig.to_tun(pkt)
    (reply,) = rig.drain_tun()
    r = parse_icmp(reply)
    assert r.proto == PROTO_ICMP and r.ttl == 64
    assert r.dst == addr(LOCAL)
    assert r.src == addr("10.9.0.1")
    assert (r.type, r.code) == (3, 0)
    assert r.ip_ok and r.icmp_ok
    assert r.rest == bytes(4)
    assert r.quote == pkt[:28]
    c = rig.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"], c["tx_packets"]) == (1, 1, 0)
    assert nothing_on(rig.peer_a) and nothing_on(rig.peer_b)


def test_no_route_answer_quotes_ip_options_and_eight_bytes(make_rig):
    rig = make_rig(vnet=True)
    pkt = make_packet(LOCAL, "10.9.0.1", 120, options=b"\x01\x01\x01\x00")
    rig.to_tun(pkt)
    (reply,) = rig.drain_tun()
    r = parse_icmp(reply)
    assert r.ip_ok and r.icmp_ok and (r.type, r.code) == (3, 0)
    assert r.quote == pkt[:24 + 8]


@pytest.mark.parametrize(
    "pkt",
    [make_packet(LOCAL, "10.9.0.1", 84, proto=PROTO_ICMP),
     make_packet(LOCAL, "10.9.0.1", 84, mf=True, frag=0x10)],  # non-first fragment
    ids=["icmp", "fragment"],
)
def test_no_route_no_answer(make_rig, pkt):
    rig = make_rig()
    rig.to_tun(pkt)
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["tx_drop_no_route"], c["icmp_unreachable_sent"]) == (1, 0)


def test_no_route_first_fragment_is_answered(make_rig):
    rig = make_rig()
    rig.to_tun(make_packet(LOCAL, "10.9.0.1", 84, mf=True))
    assert parse_icmp(rig.drain_tun()[0]).type == 3


@pytest.mark.parametrize("ttl", [0, 1])
def test_tun_ttl_expired_dropped(make_rig, ttl):
    rig = make_rig()
    rig.to_tun(make_packet(LOCAL, "10.5.2.7", ttl=ttl))
    assert nothing_on(rig.peer_a)
    c = rig.counters()
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
    [b"", b"\x45" * 19, b"\x60" + b"\x00" * 38, b"\x60\0\0\0\0\x15" + b"\x00" * 54,
     bytes(40)],
    ids=["empty", "short", "ipv6-short", "ipv6-payload-beyond-the-read", "version0"],
)
@VNET
def test_tun_malformed(make_rig, pkt, vnet):
    rig = make_rig(vnet=vnet)
    rig.to_tun(pkt)
    assert nothing_on(rig.peer_a)
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["tx_drop_malformed"], c["tx_packets"], c["tx_drop_no_route"]) == (1, 0, 0)


def test_tun_read_shorter_than_the_vnet_header(make_rig):
    rig = make_rig(vnet=True)
    rig.tun.send(VNET_NONE[:4])
    rig.from_tun()
    assert rig.counters()["tx_drop_malformed"] == 1
    assert nothing_on(rig.peer_a)


def test_tun_to_udp_checksum_feff(make_rig):
    rig = make_rig()
    pkt = bytearray(make_packet(LOCAL, "10.5.2.7", 60))
    pkt[4] = pkt[5] = pkt[10] = pkt[11] = 0
    rest = (~inet_checksum(pkt[:20])) & 0xFFFF
    ident = 0x0100 + ((~rest) & 0xFFFF)  # so that the checksum comes out as 0xFEFF
    struct.pack_into("!H", pkt, 4, (ident & 0xFFFF) + (ident >> 16))
    struct.pack_into("!H", pkt, 10, inet_checksum(pkt[:20]))
    assert pkt[10:12] == b"\xfe\xff"
    rig.to_tun(bytes(pkt))
    data, _ = recv(rig.peer_a)
    assert data == hopped(bytes(pkt))


# -- UDP -> TUN -------------------------------------------------------------------------
@VNET
def test_udp_to_tun_from_peer(make_rig, vnet):
    rig = make_rig(vnet=vnet)
    pkt = make_packet("10.5.2.5", LOCAL, 500)
    rig.to_udp(rig.peer_a, pkt)
    got = rig.drain_tun()
    assert len(got) == 1
    assert_hop(got[0], pkt)
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_packets"], c["rx_bytes"]) == (1, 1, 500)
    assert rig.drops() == 0


def test_udp_to_tun_several_datagrams_one_wakeup(make_rig):
    rig = make_rig()
    pkts = [make_packet("10.5.2.5", LOCAL, 100 + i) for i in range(5)]
    pkts += [make_packet("10.5.3.5", LOCAL, 60)]
    rig.peer_b.sendto(pkts[-1], rig.dp_addr)
    rig.to_udp(rig.peer_a, *pkts[:-1])
    got = rig.drain_tun()
    assert got == [hopped(p) for p in [pkts[-1], *pkts[:-1]]]  # in the order they came
    assert rig.counters()["rx_packets"] == 6


def test_udp_trailing_bytes_cut_to_total_length(make_rig):
    rig = make_rig()
    pkt = make_packet("10.5.2.5", LOCAL, 80)
    rig.to_udp(rig.peer_a, pkt + b"junk")
    assert rig.drain_tun() == [hopped(pkt)]
    assert rig.counters()["rx_bytes"] == 80


def test_udp_unknown_source_dropped(make_rig):
    rig = make_rig()
    rig.to_udp(rig.stranger, make_packet("10.5.2.5", LOCAL))
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_drop_unknown_source"], c["rx_packets"]) == (1, 1, 0)


def test_udp_from_localhost_unknown_when_routes_name_other_peers(make_rig):
    rig = make_rig()
    sender = _udp("127.0.0.1")
    try:
        rig.to_udp(sender, make_packet("10.5.2.5", LOCAL))
    finally:
        sender.close()
    assert rig.drain_tun() == []
    assert rig.counters()["rx_drop_unknown_source"] == 1


def test_udp_spoofed_inner_source_dropped(make_rig):
    rig = make_rig()
    rig.to_udp(rig.peer_a, make_packet("10.5.3.5", LOCAL),  # B's subnet, sent by A
               make_packet("10.7.0.1", LOCAL))
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_drop_spoofed_source"], c["rx_packets"]) == (2, 2, 0)


def test_udp_source_in_any_subnet_of_the_sender_not_only_its_longest_match(make_rig):
    # A holds 10.5.0.0/16, B the /24 inside it: a source in that /24 sent by A is still in
    # one of A's subnets (the check is "in the sender's subnets", not a route lookup).
    rig = make_rig(routes=False)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.0.0/16"), PEER_A)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.3.0/24"), PEER_B)
    inside = make_packet("10.5.3.5", LOCAL)
    rig.to_udp(rig.peer_a, inside)
    rig.to_udp(rig.peer_b, make_packet("10.5.4.5", LOCAL))  # not in B's /24
    assert rig.drain_tun() == [hopped(inside)]
    assert rig.counters()["rx_drop_spoofed_source"] == 1


def test_udp_check_source_off_accepts_anyone(make_rig):
    rig = make_rig(check_source=False)
    a = make_packet("10.5.3.5", LOCAL, 90)  # spoofed inner source
    b = make_packet("10.5.2.5", LOCAL, 91)  # from an address that is no peer
    rig.to_udp(rig.peer_a, a)
    rig.to_udp(rig.stranger, b)
    assert rig.drain_tun() == [hopped(a), hopped(b)]
    c = rig.counters()
    assert (c["rx_packets"], c["rx_drop_spoofed_source"], c["rx_drop_unknown_source"]) == (
        2, 0, 0)


# -- a router's rules: destinations, TTL, ICMP time exceeded, rate limits ----------------
def test_udp_destination_outside_our_subnet_dropped(make_rig):
    # A peer may send only to this host's subnet: not to another peer's subnet, not to
    # the host's own network beyond it, whatever the source checks say.
    for check_source in (True, False):
        rig = make_rig(check_source=check_source)
        ours = make_packet("10.5.2.5", LOCAL, 90)
        rig.to_udp(rig.peer_a, make_packet("10.5.2.5", "10.5.3.9"), ours,
                   make_packet("10.5.2.5", "192.168.100.1"),
                   make_packet("10.5.2.5", "10.5.0.255"), make_packet("10.5.2.5", "10.5.1.255"))
        assert rig.drain_tun() == [hopped(ours), hopped(make_packet("10.5.2.5", "10.5.1.255"))]
        c = rig.counters()
        assert (c["rx_drop_dst_outside"], c["rx_packets"]) == (3, 2)
        assert c["rx_datagrams"] == c["rx_packets"] + rig.drops()


def test_udp_without_our_subnet_nothing_is_delivered(make_rig):
    rig = make_rig(own=None)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))
    assert rig.drain_tun() == []
    assert rig.counters()["rx_drop_dst_outside"] == 1
    rig.dp.set_subnet(OWN)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))
    assert len(rig.drain_tun()) == 1


def test_our_subnet_can_change(make_rig):
    rig = make_rig()
    rig.dp.set_subnet(ipaddress.IPv4Network("10.5.7.0/24"))
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL), make_packet("10.5.2.5", "10.5.7.3"))
    assert [p[19] for p in rig.drain_tun()] == [3]
    with pytest.raises(ValueError):
        rig.dp.set_subnet(ipaddress.IPv4Network("0.0.0.0/0"))


def assert_time_exceeded(reply: bytes, offender: bytes, src: str = "10.5.1.0") -> None:
    r = parse_icmp(reply)
    assert (r.type, r.code) == (11, 0)
    assert r.ip_ok and r.icmp_ok and r.proto == PROTO_ICMP and r.ttl == 64
    assert r.src == addr(src)  # flannel0's address: our subnet's first
    assert r.dst == offender[12:16]
    assert r.rest == bytes(4)
    ihl = (offender[0] & 0x0F) * 4
    assert r.quote == offender[:ihl + 8]  # as it arrived, TTL and all


@VNET
def test_tun_ttl_expired_answers_time_exceeded_into_the_tun(make_rig, vnet):
    rig = make_rig(vnet=vnet)
    pkt = make_packet(LOCAL, "10.5.2.7", 120, ttl=1, proto=PROTO_TCP)
    rig.to_tun(pkt)
    (reply,) = rig.drain_tun()
    assert_time_exceeded(reply, pkt)
    assert nothing_on(rig.peer_a)
    c = rig.counters()
    assert (c["tx_drop_ttl"], c["icmp_time_exceeded_sent"], c["tx_packets"]) == (1, 1, 0)


def test_tun_ttl_expired_echo_request_is_answered(make_rig):
    # ping -t 1 through the overlay: an echo request is a query, not an error.
    rig = make_rig()
    echo = icmp_echo(LOCAL, "10.5.2.7", ttl=1, data=b"0123456789")
    rig.to_tun(echo)
    (reply,) = rig.drain_tun()
    assert_time_exceeded(reply, echo)


def test_udp_ttl_expired_answers_back_to_the_peer_that_routes_the_source(make_rig):
    rig = make_rig()
    pkt = make_packet("10.5.3.5", LOCAL, 200, ttl=1)  # from B's subnet, sent by B
    rig.to_udp(rig.peer_b, pkt)
    assert rig.drain_tun() == []
    reply, src = recv(rig.peer_b)
    assert src == rig.dp_addr
    assert_time_exceeded(reply, pkt)
    assert nothing_on(rig.peer_a)
    c = rig.counters()
    assert (c["rx_drop_ttl"], c["icmp_time_exceeded_sent"], c["rx_packets"]) == (1, 1, 0)


def test_udp_ttl_expired_source_without_a_route_gets_no_answer(make_rig):
    rig = make_rig(check_source=False)
    rig.to_udp(rig.stranger, make_packet("10.7.0.5", LOCAL, ttl=1))
    c = rig.counters()
    assert (c["rx_drop_ttl"], c["icmp_time_exceeded_sent"]) == (1, 0)
    assert nothing_on(rig.stranger) and nothing_on(rig.peer_a) and nothing_on(rig.peer_b)


def test_no_time_exceeded_before_our_subnet_is_known(make_rig):
    rig = make_rig(own=None)
    rig.to_tun(make_packet(LOCAL, "10.5.2.7", ttl=1))
    assert rig.drain_tun() == []
    assert (rig.counters()["tx_drop_ttl"], rig.counters()["icmp_time_exceeded_sent"]) == (1, 0)


@pytest.mark.parametrize("pkt", [
    ip_packet(LOCAL, "10.5.2.7", icmp_message(3, 1, data=bytes(28)), proto=PROTO_ICMP, ttl=1),
    ip_packet(LOCAL, "10.5.2.7", icmp_message(11, 0, data=bytes(28)), proto=PROTO_ICMP, ttl=1),
    ip_packet(LOCAL, "10.5.2.7", icmp_message(40, 0, data=bytes(8)), proto=PROTO_ICMP, ttl=1),
    ip_packet(LOCAL, "10.5.2.7", b"", proto=PROTO_ICMP, ttl=1),
    make_packet(LOCAL, "10.5.2.7", 84, mf=True, frag=0x10, ttl=1),
    make_packet("0.0.0.0", "10.5.2.7", 84, ttl=1),
    make_packet(LOCAL, "224.0.0.5", 84, ttl=1),
    make_packet(LOCAL, "255.255.255.255", 84, ttl=1),
], ids=["icmp-unreachable", "icmp-time-exceeded", "icmp-unknown-type", "icmp-empty",
        "fragment", "from-0.0.0.0", "to-multicast", "to-broadcast"])
def test_tun_ttl_expired_no_answer(make_rig, pkt):
    rig = make_rig()
    rig.dp.set_route(ipaddress.IPv4Network("224.0.0.0/3"), PEER_A)  # routed, to reach TTL
    rig.to_tun(pkt)
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["tx_drop_ttl"], c["icmp_time_exceeded_sent"]) == (1, 0)


def _other_bucket(ip: str) -> str:
    """A container address whose rate-limit bucket is not ip's."""
    mine = icmp_bucket(int(ipaddress.IPv4Address(ip)))
    return next(str(a) for a in OWN.hosts() if icmp_bucket(int(a)) != mine)


def test_icmp_errors_are_rate_limited_per_destination(make_rig):
    rig = make_rig()  # a bucket refills one error a minute: only the burst goes
    rig.to_tun(*(make_packet(LOCAL, "10.5.2.7", 60, ttl=1, fill=i) for i in range(10)))
    assert len(rig.drain_tun()) == ICMP_BURST
    c = rig.counters()
    assert (c["icmp_time_exceeded_sent"], c["icmp_rate_limited"], c["tx_drop_ttl"]) == (
        ICMP_BURST, 10 - ICMP_BURST, 10)
    # Net unreachable shares the budget of its destination...
    rig.to_tun(make_packet(LOCAL, "10.9.0.1", 60))
    assert rig.drain_tun() == []
    # ...and another destination has its own.
    other = _other_bucket(LOCAL)
    rig.to_tun(make_packet(other, "10.5.2.7", 60, ttl=1), make_packet(other, "10.9.0.1", 60))
    assert [parse_icmp(p).type for p in rig.drain_tun()] == [11, 3]
    assert rig.counters()["icmp_rate_limited"] == 10 - ICMP_BURST + 1


def test_icmp_rate_limit_refills_with_time(make_rig):
    rig = make_rig(icmp_ratelimit_ms=200)
    rig.to_tun(*(make_packet(LOCAL, "10.5.2.7", 60, ttl=1) for _ in range(ICMP_BURST + 1)))
    assert len(rig.drain_tun()) == ICMP_BURST  # unless processing took over 200 ms
    import time

    time.sleep(0.25)  # one interval later there is a token again
    rig.to_tun(make_packet(LOCAL, "10.5.2.7", 60, ttl=1))
    assert len(rig.drain_tun()) == 1


def test_icmp_rate_limit_off(make_rig):
    rig = make_rig(icmp_ratelimit_ms=0)
    rig.to_tun(*(make_packet(LOCAL, "10.5.2.7", 60, ttl=1) for _ in range(20)))
    assert len(rig.drain_tun()) == 20
    assert rig.counters()["icmp_rate_limited"] == 0


def test_udp_check_source_off_with_no_routes(make_rig):
    rig = make_rig(check_source=False, routes=False)
    pkt = make_packet("192.0.2.1", LOCAL)
    rig.to_udp(rig.stranger, pkt)
    assert rig.drain_tun() == [hopped(pkt)]


def _bad_total() -> bytes:
    p = bytearray(make_packet("10.5.2.5", LOCAL, 100))
    struct.pack_into("!H", p, 2, 101)
    return bytes(p)


def _ihl(n: int) -> bytes:
    p = bytearray(make_packet("10.5.2.5", LOCAL, 100))
    p[0] = 0x40 | n
    return bytes(p)


def _total_below_ihl() -> bytes:
    p = bytearray(make_packet("10.5.2.5", LOCAL, 100, options=bytes(8)))
    struct.pack_into("!H", p, 2, 24)
    return bytes(p)


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x45" * 19, make_packet("10.5.2.5", LOCAL)[:19],
     b"\x60" + make_packet("10.5.2.5", LOCAL)[1:], _ihl(4), _ihl(0), _bad_total(),
     _total_below_ihl()],
    ids=["empty", "short", "cut-header", "version6", "ihl4", "ihl0", "total-too-big",
         "total-below-ihl"],
)
def test_udp_malformed_dropped(make_rig, datagram):
    rig = make_rig()
    rig.to_udp(rig.peer_a, datagram)
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_drop_malformed"], c["rx_packets"]) == (1, 1, 0)


def test_udp_unknown_source_is_checked_before_the_packet(make_rig):
    rig = make_rig()
    rig.to_udp(rig.stranger, b"", make_packet("10.5.2.5", LOCAL, MTU + 1))
    c = rig.counters()
    assert (c["rx_drop_unknown_source"], c["rx_drop_malformed"], c["rx_drop_oversized"]) == (
        2, 0, 0)


@pytest.mark.parametrize("gro", [False, True], ids=["nogro", "gro"])
def test_udp_oversized_dropped_and_mtu_sized_accepted(make_rig, gro):
    rig = make_rig(gro=gro)
    big = make_packet("10.5.2.5", LOCAL, MTU + 1)
    much_bigger = make_packet("10.5.2.5", LOCAL, 9000)
    fits = make_packet("10.5.2.5", LOCAL, MTU)
    rig.to_udp(rig.peer_a, big, much_bigger)
    assert rig.drain_tun() == []
    assert rig.counters()["rx_drop_oversized"] == 2
    rig.to_udp(rig.peer_a, fits)
    assert rig.drain_tun() == [hopped(fits)]
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_packets"], c["rx_drop_oversized"]) == (3, 1, 2)


@pytest.mark.parametrize("ttl", [0, 1])
def test_udp_ttl_expired_dropped(make_rig, ttl):
    rig = make_rig()
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL, ttl=ttl))
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["rx_drop_ttl"], c["rx_packets"]) == (1, 0)


def gso_send(sender: socket.socket, to: tuple[str, int], pkts: list[bytes]) -> None:
    """The packets in one UDP GSO message of their size (the last may be shorter): one
    datagram each on the wire, one buffer on a receiver with UDP_GRO."""
    seg = struct.pack("=H", len(pkts[0]))
    sender.sendmsg([b"".join(pkts)], [(socket.SOL_UDP, 103, seg)], 0, to)


def test_a_coalesced_receive_is_split_into_its_packets(make_rig):
    rig = make_rig(gro=True)
    pkts = [make_packet("10.5.2.9", LOCAL, 220, fill=i) for i in range(4)]
    pkts.append(make_packet("10.5.2.9", LOCAL, 100, fill=4))  # the last may be shorter
    gso_send(rig.peer_a, rig.dp_addr, pkts)
    rig.from_udp()
    assert rig.drain_tun() == [hopped(p) for p in pkts]
    c = rig.counters()
    assert rig.offloads()["udp_gro"]
    assert (c["gro_receives"], c["rx_datagrams"], c["rx_packets"]) == (1, 5, 5)


def test_a_coalesced_receive_is_checked_packet_by_packet(make_rig):
    rig = make_rig(gro=True)
    good = make_packet("10.5.2.9", LOCAL, 200, fill=1)
    spoofed = make_packet("10.5.3.9", LOCAL, 200, fill=2)
    expired = make_packet("10.5.2.9", LOCAL, 200, ttl=1)
    malformed = b"\x60" + good[1:]
    gso_send(rig.peer_a, rig.dp_addr, [good, spoofed, expired, malformed, good])
    gso_send(rig.stranger, rig.dp_addr, [good] * 3)
    rig.from_udp()
    assert rig.drain_tun() == [hopped(good)] * 2
    c = rig.counters()
    assert (c["rx_datagrams"], c["rx_packets"], c["rx_drop_spoofed_source"],
            c["rx_drop_ttl"], c["rx_drop_malformed"], c["rx_drop_unknown_source"],
            c["gro_receives"]) == (8, 2, 1, 1, 1, 3, 2)


def test_del_route_stops_forwarding_and_accepting(make_rig):
    rig = make_rig()
    rig.dp.del_route(NET_A)
    rig.to_tun(make_packet(LOCAL, "10.5.2.7"))
    assert nothing_on(rig.peer_a)
    assert parse_icmp(rig.drain_tun()[0]).type == 3
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))
    assert rig.drain_tun() == []
    c = rig.counters()
    assert (c["tx_drop_no_route"], c["rx_drop_unknown_source"]) == (1, 1)
    # B is untouched
    pkt = make_packet("10.5.3.5", LOCAL)
    rig.to_udp(rig.peer_b, pkt)
    assert rig.drain_tun() == [hopped(pkt)]
    rig.dp.del_route(NET_A)  # deleting again is harmless
    rig.dp.del_route(ipaddress.IPv4Network("10.5.2.0/25"))  # so is a route never set


def test_del_route_keeps_other_subnets_of_same_peer(make_rig):
    rig = make_rig()
    extra = ipaddress.IPv4Network("10.5.4.0/24")
    rig.dp.set_route(extra, PEER_A)
    rig.dp.del_route(NET_A)
    ok = make_packet("10.5.4.5", LOCAL)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL), ok)
    assert rig.drain_tun() == [hopped(ok)]
    assert rig.counters()["rx_drop_spoofed_source"] == 1
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
    assert rig.counters()["rx_drop_unknown_source"] == 1
    moved = make_packet("10.5.2.5", LOCAL)
    rig.to_udp(rig.peer_b, moved)
    assert rig.drain_tun() == [hopped(moved)]


def test_set_route_twice_to_the_same_peer_then_delete_once(make_rig):
    rig = make_rig()
    rig.dp.set_route(NET_A, PEER_A)
    rig.dp.del_route(NET_A)
    rig.to_udp(rig.peer_a, make_packet("10.5.2.5", LOCAL))
    assert rig.counters()["rx_drop_unknown_source"] == 1  # A holds nothing any more


def test_longest_prefix_wins_and_deleting_it_falls_back(make_rig):
    rig = make_rig(routes=False)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.0.0/16"), PEER_A)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.7.0/24"), PEER_B)
    rig.dp.set_route(ipaddress.IPv4Network("10.5.7.128/25"), PEER_A)
    rig.to_tun(make_packet(LOCAL, "10.5.7.1", fill=1), make_packet(LOCAL, "10.5.7.200", fill=2),
               make_packet(LOCAL, "10.5.8.1", fill=3))
    assert recv(rig.peer_b)[0][-1] == 1
    assert sorted(recv(rig.peer_a)[0][-1] for _ in range(2)) == [2, 3]
    rig.dp.del_route(ipaddress.IPv4Network("10.5.7.0/24"))
    rig.to_tun(make_packet(LOCAL, "10.5.7.1", fill=4))
    assert recv(rig.peer_a)[0][-1] == 4
    assert nothing_on(rig.peer_b)


def test_thousands_of_routes_of_mixed_lengths(make_rig):
    """5,000 /24s, some /16s around them and /25s inside them, over eight peers: every
    packet goes to the peer of its longest match, before and after deleting a third of
    them, and the receive side accepts a source exactly when it is in one of the sender's
    subnets."""
    rig = make_rig(routes=False)
    peers = [_udp(f"127.0.0.{10 + i}", rig.port) for i in range(8)]
    try:
        _check_many_routes(rig, peers)
    finally:
        for p in peers:
            p.close()


def _check_many_routes(rig: Rig, peers: list[socket.socket]) -> None:
    rng = random.Random(11)
    routes: dict[ipaddress.IPv4Network, int] = {}
    for second in range(1, 21):  # 10.1-20.0-249.0/24: 5,000 of them
        for third in range(250):
            routes[ipaddress.IPv4Network(f"10.{second}.{third}.0/24")] = rng.randrange(8)
    for second in range(1, 9):  # /16s around the first eight
        routes[ipaddress.IPv4Network(f"10.{second}.0.0/16")] = rng.randrange(8)
    for net in rng.sample(sorted(routes), 300):  # /25s inside some /24s
        if net.prefixlen == 24:
            routes[ipaddress.IPv4Network(f"{net.network_address + 128}/25")] = rng.randrange(8)
    peer_ip = [ipaddress.IPv4Address(p.getsockname()[0]) for p in peers]
    for net, i in routes.items():
        rig.dp.set_route(net, peer_ip[i])

    def want(a: ipaddress.IPv4Address) -> int | None:
        for plen in (25, 24, 16):
            i = routes.get(ipaddress.IPv4Network(f"{a}/{plen}", strict=False))
            if i is not None:
                return i
        return None

    def probe(count: int) -> None:
        before = rig.counters()
        addrs = [ipaddress.IPv4Address(f"10.{rng.randrange(1, 22)}.{rng.randrange(256)}."
                                       f"{rng.randrange(1, 255)}") for _ in range(count)]
        expect: dict[int, list[int]] = {i: [] for i in range(8)}
        unroutable = 0
        for chunk in range(0, count, 200):
            pkts = []
            for k in range(chunk, min(chunk + 200, count)):
                pkts.append(ip_packet(LOCAL, str(addrs[k]), struct.pack("!I", k) + bytes(20)))
                i = want(addrs[k])
                if i is None:
                    unroutable += 1
                else:
                    expect[i].append(k)
            rig.to_tun(*pkts)
            for i, p in enumerate(peers):
                got = []
                p.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        got.append(struct.unpack_from("!I", p.recv(BUF), 20)[0])
                assert got == [k for k in expect[i] if chunk <= k < chunk + 200], f"peer {i}"
            rig.drain_tun()  # the ICMP answers
        c = rig.counters()
        assert c["tx_packets"] - before["tx_packets"] == count - unroutable
        assert c["tx_drop_no_route"] - before["tx_drop_no_route"] == unroutable
        assert unroutable > 0 and count - unroutable > count // 2

    def sources(count: int) -> None:
        before = rig.counters()
        owned: dict[int, list[ipaddress.IPv4Network]] = {i: [] for i in range(8)}
        for net, i in routes.items():
            owned[i].append(net)
        accepted = 0
        for k in range(count):
            i = rng.randrange(8)
            src = ipaddress.IPv4Address(f"10.{rng.randrange(1, 22)}.{rng.randrange(256)}.9")
            ok = any(src in net for net in owned[i])
            accepted += ok
            peers[i].sendto(make_packet(str(src), LOCAL, 60, fill=k & 0xFF), rig.dp_addr)
            if k % 100 == 99:
                rig.from_udp()
        rig.from_udp()
        got = rig.drain_tun()
        c = rig.counters()
        assert len(got) == c["rx_packets"] - before["rx_packets"] == accepted
        assert c["rx_drop_spoofed_source"] - before["rx_drop_spoofed_source"] == count - accepted
        assert 0 < accepted < count

    probe(3000)
    sources(1000)
    for net in rng.sample(sorted(routes), len(routes) // 3):
        rig.dp.del_route(net)
        del routes[net]
    probe(3000)
    sources(1000)


def test_route_churn_matches_a_reference(make_rig):
    """Random sets, moves and deletes in a small space (many collisions and re-uses of
    one slot, every length from /0 to /32), each followed by a probe of the same few
    addresses: the packet goes where the longest remaining match says, or gets no route."""
    rig = make_rig(routes=False, icmp_ratelimit_ms=0)  # an ICMP answer for every no route
    rng = random.Random(3)
    peers = {0: rig.peer_a, 1: rig.peer_b}
    ips = {0: PEER_A, 1: PEER_B}
    routes: dict[ipaddress.IPv4Network, int] = {}
    probes = [ipaddress.IPv4Address(f"10.5.{rng.randrange(4)}.{rng.randrange(256)}")
              for _ in range(12)]
    for step in range(400):
        plen = rng.choice((0, 8, 16, 22, 23, 24, 24, 24, 25, 30, 32))
        net = ipaddress.IPv4Network(
            f"{ipaddress.IPv4Address(0x0A050000 | rng.randrange(1024))}/{plen}", strict=False)
        if net in routes and rng.random() < 0.6:
            rig.dp.del_route(net)
            del routes[net]
        else:
            routes[net] = rng.randrange(2)
            rig.dp.set_route(net, ips[routes[net]])
        rig.to_tun(*(make_packet(LOCAL, str(a), 60, fill=k) for k, a in enumerate(probes)))
        want: dict[int, list[int]] = {0: [], 1: []}
        lost = 0
        for k, a in enumerate(probes):
            match = [n for n in routes if a in n]
            if match:
                want[routes[max(match, key=lambda n: n.prefixlen)]].append(k)
            else:
                lost += 1
        for i, sock in peers.items():
            got = [recv(sock)[0][-1] for _ in want[i]]
            assert got == want[i], f"step {step}, peer {i}"
        assert len(rig.drain_tun()) == lost  # an ICMP answer each
    assert nothing_on(rig.peer_a) and nothing_on(rig.peer_b)


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
    c = rig.counters()
    assert c["rx_datagrams"] == 2_000
    assert c["rx_datagrams"] == c["rx_packets"] + rig.drops()
    assert c["rx_packets"] == len(delivered) >= valid_sent
    assert c["rx_bytes"] == sum(map(len, delivered))
    assert c["rx_drop_unknown_source"] > 0 and c["rx_drop_malformed"] > 0
    assert c["rx_drop_oversized"] > 0
    for p in delivered:
        assert ip_header_ok(p)
        assert ipaddress.IPv4Address(p[12:16]) in NET_A
    # still working
    pkt = make_packet("10.5.2.5", LOCAL, 333)
    rig.to_udp(rig.peer_a, pkt)
    assert rig.drain_tun() == [hopped(pkt)]
    out = make_packet(LOCAL, "10.5.2.5", 333)
    rig.to_tun(out)
    assert_hop(recv(rig.peer_a)[0], out)


# -- coalesced TUN writes -----------------------------------------------------------------
def segments(count: int, size: int = 700, *, seq: int = 500, psh_last: bool = False,
             **tcp: Any) -> list[bytes]:
    """`count` in-order segments of one TCP flow from a container behind peer A."""
    out = []
    for k in range(count):
        flags = ACK | PSH if psh_last and k == count - 1 else ACK
        out.append(tcp_packet(bytes([k & 0xFF]) * size, src="10.5.2.9", dst=LOCAL,
                              seq=seq + size * k, flags=flags, **tcp))
    return out


def merged(write: bytes) -> tuple[tuple[int, ...], bytes]:
    """A TUN write's vnet header fields and its packet."""
    return VNET_HDR.unpack_from(write), write[VNET_HDR.size:]


def check_super_packet(write: bytes, run: list[bytes]) -> None:
    """A coalesced write: one TCP super-packet holding `run` (already hopped) in order."""
    hdr, pkt = merged(write)
    ip0, tcp0, _ = parse_tcp(run[0])
    hl = ip0.ihl + tcp0.thl
    assert hdr == (1, 1, hl, len(run[0]) - hl, 20, 16)  # NEEDS_CSUM, GSO TCPv4, MSS
    ip, tcp, data = parse_tcp(pkt)
    assert ip.total == len(pkt) == hl + sum(len(r) - hl for r in run)
    assert ip_header_ok(pkt) and ip.ttl == ip0.ttl
    assert (tcp.seq, tcp.flags) == (tcp0.seq, tcp0.flags | (parse_tcp(run[-1])[1].flags & PSH))
    assert data == b"".join(parse_tcp(r)[2] for r in run)


def test_in_order_segments_received_together_are_written_as_one_super_packet(make_rig):
    rig = make_rig(vnet=True)
    segs = segments(4, psh_last=True)
    rig.to_udp(rig.peer_a, *segs)  # four datagrams, one receive batch
    (write,) = rig.writes()
    check_super_packet(write, [hopped(s) for s in segs])
    c = rig.counters()
    assert (c["coalesced_writes"], c["rx_packets"], c["rx_datagrams"]) == (1, 4, 4)
    assert c["rx_bytes"] == sum(map(len, segs))


def test_coalescing_off_writes_each_segment(make_rig):
    rig = make_rig(vnet=True, coalesce=False)
    segs = segments(4)
    rig.to_udp(rig.peer_a, *segs)
    assert rig.drain_tun() == [hopped(s) for s in segs]
    assert rig.counters()["coalesced_writes"] == 0


def test_coalescing_keeps_flows_apart_and_order(make_rig):
    rig = make_rig(vnet=True)
    a = segments(3)
    b = segments(2, sport=41000)
    other = make_packet("10.5.2.9", LOCAL, 300)
    rig.to_udp(rig.peer_a, a[0], a[1], b[0], b[1], other, a[2])
    writes = rig.writes()
    assert len(writes) == 4
    check_super_packet(writes[0], [hopped(s) for s in a[:2]])
    check_super_packet(writes[1], [hopped(s) for s in b])
    assert writes[2] == VNET_NONE + hopped(other)
    assert writes[3] == VNET_NONE + hopped(a[2])  # a lone segment goes as it is
    assert rig.counters()["coalesced_writes"] == 2


@pytest.mark.parametrize(("count", "size", "mtu", "split", "first"), [
    (70, 500, MTU, 40, 64),  # 70 in-order segments: two writes, 64 and 6
    (50, 1448, 1500, 25, 44),  # 44 segments of 1,488 bytes fit in 65,000, 45 do not
], ids=["64-segments", "65000-bytes"])
def test_coalescing_stops_at_64_segments_and_65000_bytes(make_rig, count, size, mtu, split,
                                                         first):
    # The caps are the same in both datapaths. The segments arrive in two GRO buffers of
    # one receive batch, split elsewhere than the cap.
    rig = make_rig(vnet=True, gro=True, mtu=mtu)
    segs = segments(count, size)
    gso_send(rig.peer_a, rig.dp_addr, segs[:split])
    gso_send(rig.peer_a, rig.dp_addr, segs[split:])
    rig.from_udp()
    writes = rig.writes()
    assert len(writes) == 2
    check_super_packet(writes[0], [hopped(s) for s in segs[:first]])
    check_super_packet(writes[1], [hopped(s) for s in segs[first:]])
    c = rig.counters()
    assert (c["coalesced_writes"], c["rx_packets"], c["gro_receives"]) == (2, count, 2)


# -- run() on the event loop / the packet thread ------------------------------------------
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
        assert parse_icmp(reply).type == 3
        rig.tun.send(icmp_echo(LOCAL, "10.5.2.7"))
        assert_hop(await asyncio.wait_for(loop.sock_recv(rig.peer_a, BUF), 5),
                   icmp_echo(LOCAL, "10.5.2.7"))
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None
    c = rig.counters()
    assert c["tx_packets"] == 5 and c["rx_packets"] == 1
    # stopped: nothing is moved any more
    rig.tun.send(make_packet(LOCAL, "10.5.2.7", 100))
    await asyncio.sleep(0.05)
    assert nothing_on(rig.peer_a)
    assert rig.counters()["tx_packets"] == 5
    rig.dp.stop()  # stopping twice is harmless


async def test_run_keeps_counters_consistent_under_random_datagrams(make_rig):
    rig = make_rig(gro=True)
    rng = random.Random(5)
    task = asyncio.create_task(rig.dp.run())
    try:
        await asyncio.sleep(0.05)
        n = 2000
        for i in range(n):
            if i % 3 == 0:
                data = make_packet("10.5.2.7", LOCAL, rng.randrange(20, 300),
                                   ttl=rng.randrange(0, 256))
            else:
                data = rng.randbytes(rng.randrange(0, 1600))
            rig.peer_a.sendto(data, rig.dp_addr)
            if i % 200 == 0:
                await asyncio.sleep(0.01)  # let the socket buffer drain
        # Loopback may drop some before they reach the socket: wait until the count rests.
        c, last = rig.counters(), None
        while c != last:
            await asyncio.sleep(0.2)
            last, c = c, rig.counters()
        assert c["rx_datagrams"] > n // 2
        assert c["rx_datagrams"] == c["rx_packets"] + rig.drops()
        assert c["icmp_time_exceeded_sent"] > 0  # to peer A, for the TTLs of 0 and 1
        pkt = make_packet(LOCAL, "10.5.2.9")
        rig.tun.send(pkt)
        got = (await asyncio.to_thread(recv, rig.peer_a))[0]
        while got[9] == PROTO_ICMP:  # the time exceeded answers came first
            got = (await asyncio.to_thread(recv, rig.peer_a))[0]
        assert_hop(got, pkt)
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)


async def test_routes_change_while_running(make_rig):
    rig = make_rig()
    task = asyncio.create_task(rig.dp.run())
    try:
        for i in range(50):
            rig.dp.set_route(NET_A, PEER_B if i % 2 else PEER_A)
            pkt = make_packet(LOCAL, "10.5.2.7", 100, fill=i)
            rig.tun.send(pkt)
            peer = rig.peer_b if i % 2 else rig.peer_a
            assert_hop((await asyncio.to_thread(recv, peer))[0], pkt)
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)


def test_stop_before_run_is_harmless(make_rig):
    make_rig().dp.stop()


async def test_a_tun_that_hangs_up_ends_run_with_tun_lost_and_a_new_one_carries_on(make_rig):
    """A deleted flannel0 shows as POLLERR on its fd (reads fail with EBADFD); the
    stand-in's shutdown() shows as POLLHUP and end of file. Either way run() ends with
    TunLost (no spinning, no silent death), and after set_tun the datapath moves packets
    through the new fd with its routes and subnet kept."""
    rig = make_rig()
    task = asyncio.create_task(rig.dp.run())
    await asyncio.sleep(0.05)
    dp_end = socket.socket(fileno=os.dup(rig.tun_fd))
    dp_end.shutdown(socket.SHUT_RDWR)
    dp_end.close()
    with pytest.raises(TunLost):
        await asyncio.wait_for(task, 5)
    new_dp, new_tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        rig.dp.set_tun(new_dp.fileno())
        rig.tun = new_tun
        task = asyncio.create_task(rig.dp.run())
        try:
            pkt = make_packet(LOCAL, "10.5.2.7", 100)
            new_tun.send(pkt)
            assert_hop((await asyncio.to_thread(recv, rig.peer_a))[0], pkt)
            back = make_packet("10.5.2.5", LOCAL, 80)
            rig.peer_a.sendto(back, rig.dp_addr)
            new_tun.settimeout(2)
            assert await asyncio.to_thread(new_tun.recv, BUF) == hopped(back)
        finally:
            rig.dp.stop()
            await asyncio.wait_for(task, 5)
    finally:
        new_dp.close()
        new_tun.close()


async def test_set_tun_refused_while_running(make_rig):
    rig = make_rig()
    task = asyncio.create_task(rig.dp.run())
    await asyncio.sleep(0.05)
    try:
        with pytest.raises(RuntimeError):
            rig.dp.set_tun(rig.tun.fileno())
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)


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


def test_the_c_datapath_is_built_and_chosen():
    assert choose_datapath("c", {}) is CDatapath
    assert choose_datapath("auto", {}) is CDatapath


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
