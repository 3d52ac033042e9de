"""The C datapath (backends/_fastpath.c) against a stand-in TUN: same behaviour and counters
as the pure-Python one."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import struct

import pytest

# make setup builds the extension; without it this import fails loudly, never skips.
from backends.udp import c_datapath  # noqa: E402
from backends.udp.datapath import VNET_HDR, VNET_NONE
from backends.udp.packet import checksum

PEER = "127.0.0.1"
NET = ipaddress.IPv4Network("10.5.2.0/24")


def test_extension_is_built():
    from backends.udp import _fastpath
    from backends.udp.selection import choose_datapath

    assert choose_datapath("c", {}) is c_datapath.CDatapath
    # `make asan` checks that its sanitized build is the one under test.
    where = os.environ.get("TWEED_EXPECT_FASTPATH")
    if where:
        assert _fastpath.__file__.startswith(where), _fastpath.__file__


def ip_packet(src: str, dst: str, payload: bytes = b"p" * 40, ttl: int = 64,
              proto: int = 17) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, ttl,
                                proto, 0, socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + payload


class Rig:
    """A C datapath between a socketpair (the TUN) and a loopback UDP socket."""

    def __init__(self, vnet: bool = False, check_source: bool = True) -> None:
        self.tun_dp, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.settimeout(2)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((PEER, 0))
        self.peer.settimeout(2)
        self.vnet = vnet
        self.dp = c_datapath.CDatapath(self.tun_dp.fileno(), self.udp,
                                       port=self.peer.getsockname()[1], mtu=1472,
                                       check_source=check_source, vnet_hdr=vnet)
        self.dp.set_route(NET, ipaddress.IPv4Address(PEER))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.create_task(self.dp.run())
        await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc) -> None:
        self.dp.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)
        for s in (self.tun_dp, self.tun, self.udp, self.peer):
            s.close()

    def to_tun(self, pkt: bytes) -> None:
        self.tun.send((VNET_NONE if self.vnet else b"") + pkt)

    async def from_tun(self) -> bytes:
        data = await asyncio.to_thread(self.tun.recv, 70000)
        if self.vnet:
            assert data[:VNET_HDR.size] == VNET_NONE
            data = data[VNET_HDR.size:]
        return data

    def to_udp(self, data: bytes) -> None:
        self.peer.sendto(data, self.udp.getsockname())


async def settle(dp, key: str, value: int) -> dict[str, int]:
    for _ in range(200):
        c = dp.counters()
        if c[key] >= value:
            return c
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} did not reach {value}: {dp.counters()}")


@pytest.mark.parametrize("vnet", [False, True])
async def test_forwards_both_ways_with_ttl_patched(vnet):
    async with Rig(vnet=vnet) as rig:
        pkt = ip_packet("10.5.1.2", "10.5.2.9", ttl=64)
        rig.to_tun(pkt)
        got = await asyncio.to_thread(rig.peer.recv, 2000)
        assert got[8] == 63 and checksum(got[:20]) == 0 and got[20:] == pkt[20:]
        rig.to_udp(ip_packet("10.5.2.9", "10.5.1.2", ttl=10))
        back = await rig.from_tun()
        assert back[8] == 9 and checksum(back[:20]) == 0
        c = await settle(rig.dp, "rx_packets", 1)
        assert c["tx_packets"] == 1 and c["tx_bytes"] == len(pkt)


async def test_many_packets_leave_as_one_datagram_each():
    async with Rig() as rig:
        pkts = [ip_packet("10.5.1.2", "10.5.2.9", bytes([i]) * 100) for i in range(150)]
        for p in pkts:
            rig.to_tun(p)
        got = [await asyncio.to_thread(rig.peer.recv, 2000) for _ in pkts]
        assert [g[20:] for g in got] == [p[20:] for p in pkts]


async def test_a_run_for_one_peer_goes_as_one_gso_send_of_one_packet_per_datagram():
    rig = Rig()
    # Queued before the loop starts, so the loop reads them in one batch (a unix datagram
    # socket queues at most 10 by default).
    pkts = [ip_packet("10.5.1.2", "10.5.2.9", bytes([i]) * 300) for i in range(7)]
    pkts.append(ip_packet("10.5.1.2", "10.5.2.9", b"short"))  # the last may be shorter
    for p in pkts:
        rig.to_tun(p)
    async with rig:
        got = [await asyncio.to_thread(rig.peer.recv, 2000) for _ in pkts]
        assert [g[20:] for g in got] == [p[20:] for p in pkts]
        assert rig.dp.offloads()["udp_gso"]
        c = await settle(rig.dp, "tx_packets", len(pkts))
        assert c["gso_sends"] == 1


async def test_no_route_icmp_and_drops():
    async with Rig() as rig:
        rig.to_tun(ip_packet("10.5.1.2", "10.5.77.1", proto=6))
        reply = await rig.from_tun()
        assert reply[9] == 1 and reply[20] == 3 and reply[21] == 0
        assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
        assert reply[12:16] == socket.inet_aton("10.5.77.1")  # from the unreachable dst
        rig.to_tun(ip_packet("10.5.1.2", "10.5.77.1", proto=1))  # ICMP: no answer
        rig.to_tun(ip_packet("10.5.1.2", "10.5.2.9", ttl=1))
        rig.to_tun(b"\x60" + bytes(40))
        c = await settle(rig.dp, "tx_drop_malformed", 1)
        assert c["tx_drop_no_route"] == 2 and c["icmp_unreachable_sent"] == 1
        assert c["tx_drop_ttl"] == 1
        rig.to_udp(ip_packet("10.5.9.9", "10.5.1.2"))  # spoofed inner source
        rig.to_udp(b"\x45" + bytes(10))  # too short
        rig.to_udp(ip_packet("10.5.2.9", "10.5.1.2", b"x" * 1500))  # over the MTU
        rig.to_udp(ip_packet("10.5.2.9", "10.5.1.2", ttl=1))
        c = await settle(rig.dp, "rx_datagrams", 4)
        assert (c["rx_drop_spoofed_source"], c["rx_drop_malformed"], c["rx_drop_oversized"],
                c["rx_drop_ttl"]) == (1, 1, 1, 1)
        rig.dp.del_route(NET)
        rig.to_udp(ip_packet("10.5.2.9", "10.5.1.2"))
        c = await settle(rig.dp, "rx_drop_unknown_source", 1)


async def test_source_checks_off_accepts_anyone():
    async with Rig(check_source=False) as rig:
        rig.dp.del_route(NET)
        rig.to_udp(ip_packet("10.5.9.9", "10.5.1.2"))
        assert (await rig.from_tun())[12:16] == socket.inet_aton("10.5.9.9")


async def test_random_datagrams_keep_counters_consistent():
    rng = random.Random(5)
    async with Rig() as rig:
        n = 2000
        for i in range(n):
            if i % 3 == 0:
                data = ip_packet("10.5.2.7", "10.5.1.2", rng.randbytes(rng.randrange(0, 300)),
                                 ttl=rng.randrange(0, 256))
            else:
                data = rng.randbytes(rng.randrange(0, 1600))
            rig.to_udp(data)
            if i % 200 == 0:
                await asyncio.sleep(0.01)  # let the socket buffer drain
        # Loopback may drop some before they reach the socket: wait until the count rests.
        c, last = rig.dp.counters(), None
        while c != last:
            await asyncio.sleep(0.2)
            last, c = c, rig.dp.counters()
        assert c["rx_datagrams"] > n // 2
        drops = sum(v for k, v in c.items() if k.startswith("rx_drop_"))
        assert c["rx_datagrams"] == c["rx_packets"] + drops
        pkt = ip_packet("10.5.1.2", "10.5.2.9")
        rig.to_tun(pkt)
        assert (await asyncio.to_thread(rig.peer.recv, 2000))[20:] == pkt[20:]


async def test_a_coalesced_receive_is_split_into_its_packets():
    async with Rig() as rig:
        pkts = [ip_packet("10.5.2.9", "10.5.1.2", bytes([i]) * 200) for i in range(5)]
        # The peer sends them as one UDP GSO message; loopback hands them to our GRO
        # socket as one buffer with their size, which the datapath must cut again.
        seg = struct.pack("=H", len(pkts[0]))
        rig.peer.sendmsg([b"".join(pkts)], [(socket.SOL_UDP, 103, seg)], 0,
                         rig.udp.getsockname())
        got = [await rig.from_tun() for _ in pkts]
        assert [g[20:] for g in got] == [p[20:] for p in pkts]
        assert all(g[8] == 63 for g in got)
        c = await settle(rig.dp, "rx_packets", 5)
        assert rig.dp.offloads()["udp_gro"]
        assert c["gro_receives"] >= 1 and c["rx_datagrams"] == 5


def tcp_packet(src: str, dst: str, seq: int, payload: bytes, flags: int = 0x10,
               ttl: int = 64) -> bytes:
    """An IPv4/TCP packet with both checksums right."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 4000, 5001, seq, 7, 5 << 4, flags, 512, 0, 0))
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(
        "!BBH", 0, 6, len(tcp) + len(payload))
    struct.pack_into("!H", tcp, 16, checksum(pseudo + bytes(tcp) + payload))
    return ip_packet(src, dst, bytes(tcp) + payload, ttl=ttl, proto=6)


def tcp_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    seg = pkt[ihl:]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return checksum(pkt[:ihl]) == 0 and checksum(pseudo + seg) == 0


async def test_a_tso_super_packet_leaves_as_mtu_sized_packets_in_one_gso_send():
    payload = bytes(range(256)) * 20  # 5120 bytes: 5 segments of 1000 and one of 120
    sup = bytearray(tcp_packet("10.5.1.2", "10.5.2.9", 1000, payload, flags=0x18))
    struct.pack_into("!H", sup, 36, 0)  # the kernel leaves a partial sum here; we redo it
    head = VNET_HDR.pack(1, 1, 40, 1000, 20, 16)  # NEEDS_CSUM, GSO TCPv4, MSS 1000
    rig = Rig(vnet=True)
    rig.tun.send(head + bytes(sup))
    async with rig:
        got = [await asyncio.to_thread(rig.peer.recv, 2000) for _ in range(6)]
        assert [len(g) for g in got] == [1040] * 5 + [160]
        assert b"".join(g[40:] for g in got) == payload
        assert all(tcp_ok(g) and g[8] == 63 for g in got)
        assert [struct.unpack_from("!I", g, 24)[0] for g in got] == \
            [1000 + 1000 * k for k in range(6)]
        assert [g[33] for g in got] == [0x10] * 5 + [0x18]  # PSH on the last only
        c = await settle(rig.dp, "tx_packets", 6)
        assert c["tso_reads"] == 1 and c["gso_sends"] == 1 and c["tx_bytes"] == 5360


async def test_in_order_segments_are_written_to_the_tun_as_one_super_packet():
    segs = [tcp_packet("10.5.2.9", "10.5.1.2", 500 + 700 * k, bytes([k]) * 700)
            for k in range(4)]
    rig = Rig(vnet=True)
    for s in segs:  # queued before the loop starts: one receive batch
        rig.to_udp(s)
    await asyncio.sleep(0.05)
    async with rig:
        data = await asyncio.to_thread(rig.tun.recv, 70000)
        flags, gso_type, hdr_len, gso_size, start, off = VNET_HDR.unpack_from(data)
        assert (flags, gso_type, hdr_len, gso_size, start, off) == (1, 1, 40, 700, 20, 16)
        pkt = data[VNET_HDR.size:]
        assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt) == 40 + 2800
        assert pkt[8] == 63 and checksum(pkt[:20]) == 0
        assert pkt[40:] == b"".join(bytes([k]) * 700 for k in range(4))
        c = await settle(rig.dp, "rx_packets", 4)
        assert c["coalesced_writes"] == 1 and c["rx_datagrams"] == 4


async def test_gso_refused_by_the_socket_falls_back_to_one_datagram_per_send():
    rig = Rig()
    # UDP GSO needs UDP checksums; with SO_NO_CHECK the kernel refuses a GSO send.
    rig.udp.setsockopt(socket.SOL_SOCKET, 11, 1)
    pkts = [ip_packet("10.5.1.2", "10.5.2.9", bytes([i]) * 300) for i in range(5)]
    for p in pkts:
        rig.to_tun(p)
    async with rig:
        got = [await asyncio.to_thread(rig.peer.recv, 2000) for _ in pkts]
        assert [g[20:] for g in got] == [p[20:] for p in pkts]
        c = await settle(rig.dp, "tx_packets", 5)
        assert not rig.dp.offloads()["udp_gso"] and c["gso_sends"] == 0
        assert c["tx_drop_send_error"] == 0
