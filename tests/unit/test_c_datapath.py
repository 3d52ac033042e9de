"""What only the C datapath (backends/udp/_fastpath.c) has: its build, TUN TSO (a TCP
super-packet read from the TUN cut into wire packets), and its Core's own rules (one
initialisation, a failed one cleaned up, no use before it, test hooks refused while the
packet thread runs). Its behaviour shared with the python datapath is tested against both
in test_datapath.py; its pure segment/coalesce hooks in test_c_segmentation.py."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import subprocess
import sys

import pytest

# The extension must be built (make setup, pip install): without it this import fails
# loudly, it never skips.
from backends.udp import _fastpath, c_datapath, datapath
from backends.udp.datapath import VNET_HDR
from tests.support.packets import ACK, PSH, l4_checksum_ok, parse_tcp, tcp_packet

PEER = "127.0.0.1"
NET = ipaddress.IPv4Network("10.5.2.0/24")


def test_extension_is_built():
    from backends.udp.selection import choose_datapath

    assert choose_datapath("c", {}) is c_datapath.CDatapath
    # `make asan` checks that its sanitized build is the one under test.
    where = os.environ.get("TWEED_EXPECT_FASTPATH")
    if where:
        assert _fastpath.__file__.startswith(where), _fastpath.__file__


def test_batches_and_caps_are_the_ones_both_datapaths_use():
    assert (_fastpath.BATCH, _fastpath.RX_BATCH) == (datapath.TUN_BATCH, datapath.RX_BATCH)
    assert (_fastpath.GSO_SEGS, _fastpath.GSO_BYTES) == (datapath.GSO_MAX_SEGMENTS,
                                                         datapath.GSO_MAX_BYTES)
    assert (_fastpath.MERGE_MAX, _fastpath.MERGE_BYTES) == (datapath.COALESCE_MAX_SEGMENTS,
                                                            datapath.COALESCE_MAX_BYTES)


class Rig:
    """A C datapath between a socketpair (the TUN, with vnet headers) and loopback UDP."""

    def __init__(self) -> None:
        self.tun_dp, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.settimeout(2)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((PEER, 0))
        self.peer.settimeout(2)
        self.dp = c_datapath.CDatapath(self.tun_dp.fileno(), self.udp,
                                       port=self.peer.getsockname()[1], mtu=1472,
                                       vnet_hdr=True)
        self.dp.set_route(NET, ipaddress.IPv4Address(PEER))

    def close(self) -> None:
        for s in (self.tun_dp, self.tun, self.udp, self.peer):
            s.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_a_tso_super_packet_leaves_as_mtu_sized_packets_in_one_gso_send(rig):
    payload = bytes(range(256)) * 20  # 5120 bytes: 5 segments of 1000 and one of 120
    sup = tcp_packet(payload, seq=1000, flags=ACK | PSH, tcp_csum="pseudo")  # partial sum
    head = VNET_HDR.pack(1, 1, 40, 1000, 20, 16)  # NEEDS_CSUM, GSO TCPv4, MSS 1000
    rig.tun.send(head + sup)
    rig.dp._core.drain_tun()
    got = [rig.peer.recv(2000) for _ in range(6)]
    assert [len(g) for g in got] == [1040] * 5 + [160]
    assert b"".join(g[40:] for g in got) == payload
    assert all(l4_checksum_ok(g) and g[8] == 63 for g in got)
    assert [parse_tcp(g)[1].seq for g in got] == [1000 + 1000 * k for k in range(6)]
    assert [parse_tcp(g)[1].flags for g in got] == [ACK] * 5 + [ACK | PSH]  # PSH last only
    c = rig.dp.counters()
    assert (c["tso_reads"], c["gso_sends"], c["tx_packets"], c["tx_bytes"]) == (1, 1, 6, 5360)


def test_a_malformed_super_packet_is_dropped_after_routing(rig):
    sup = tcp_packet(bytes(3000), tcp_csum="pseudo")
    rig.tun.send(VNET_HDR.pack(1, 4, 40, 1000, 20, 16) + sup)  # GSO TCPv6 on IPv4: no
    rig.dp._core.drain_tun()
    c = rig.dp.counters()
    assert (c["tx_drop_malformed"], c["tx_packets"], c["tso_reads"]) == (1, 0, 0)


async def test_super_packets_through_the_packet_thread(rig):
    payload = bytes(range(200)) * 100  # 20,000 bytes: 13 segments of 1432 and one of 1384
    for k in range(3):
        sup = tcp_packet(payload, seq=1 + k * len(payload), tcp_csum="pseudo")
        rig.tun.send(VNET_HDR.pack(1, 1, 40, 1432, 20, 16) + sup)
    task = asyncio.create_task(rig.dp.run())
    try:
        got = [await asyncio.to_thread(rig.peer.recv, 2000) for _ in range(42)]
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    assert b"".join(parse_tcp(g)[2] for g in got) == payload * 3
    assert rig.dp.counters()["tso_reads"] == 3


# -- the Core's own rules -----------------------------------------------------------------
def test_core_refuses_use_before_init():
    core = _fastpath.Core.__new__(_fastpath.Core)
    for call in (lambda: core.set_route(0, 0, 1), lambda: core.del_route(0, 0), core.start,
                 core.drain_tun, core.drain_udp):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    assert core.counters() == (0,) * len(datapath.COUNTERS)
    core.stop()  # not running: nothing to do


def test_core_initialises_once(rig):
    core = rig.dp._core
    with pytest.raises(RuntimeError, match="already initialised"):
        core.__init__(rig.tun.fileno(), rig.udp.fileno(), 1, 576)
    # Still the first configuration: the TUN and the MTU are those it was made with.
    pkt = tcp_packet(b"x" * 1000, dst="10.5.2.9")
    rig.tun.send(VNET_HDR.pack(0, 0, 0, 0, 0, 0) + pkt)
    core.drain_tun()
    assert rig.peer.recv(2000)[40:] == b"x" * 1000


@pytest.mark.parametrize(("mtu", "port"), [(67, 1), (65536, 1), (1500, 0), (1500, 65536)])
def test_core_rejects_bad_mtu_or_port(rig, mtu, port):
    with pytest.raises(ValueError, match="bad mtu or port"):
        _fastpath.Core(rig.tun_dp.fileno(), rig.udp.fileno(), port, mtu)


def test_core_on_a_closed_fd_fails_with_oserror():
    with pytest.raises(OSError):
        _fastpath.Core(1_000_000, 1_000_001, 8285, 1500)


def test_a_failed_init_leaves_nothing_half_made_and_may_be_retried():
    # Run out of descriptors so that Core_init's eventfd fails (after it changed the
    # sockets): OSError, not a crash or a lock destroyed before it was made, and the same
    # object initialises once a descriptor is free again.
    code = r"""
import errno, os, resource, socket
from backends.udp import _fastpath
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
spare = []
try:
    while True:
        spare.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
core = _fastpath.Core.__new__(_fastpath.Core)
try:
    core.__init__(a.fileno(), u.fileno(), 8285, 1500)
except OSError as e:
    assert e.errno == errno.EMFILE, e
    print("failed cleanly")
os.close(spare.pop())
os.close(spare.pop())  # room for both eventfds
core.__init__(a.fileno(), u.fileno(), 8285, 1500)
core.set_route(0x0A050200, 0xFFFFFF00, 0x7F000001)
print("retried", core.offloads()["udp_gso"] in (True, False))
del core
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["failed cleanly", "retried True"]


@pytest.mark.parametrize("mask", [0xFF00FF00, 0x00FFFFFF, 0xFFFFFFFE ^ 0x100])
def test_routes_need_a_netmask(rig, mask):
    with pytest.raises(ValueError, match="not a netmask"):
        rig.dp._core.set_route(0x0A050000, mask, 0x7F000001)
    with pytest.raises(ValueError, match="not a netmask"):
        rig.dp._core.del_route(0x0A050000, mask)


async def test_the_test_hooks_refuse_to_run_beside_the_packet_thread(rig):
    task = asyncio.create_task(rig.dp.run())
    await asyncio.sleep(0.05)
    try:
        for hook in (rig.dp._core.drain_tun, rig.dp._core.drain_udp):
            with pytest.raises(RuntimeError, match="packet thread is running"):
                hook()
    finally:
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    rig.dp._core.drain_tun()  # stopped: allowed again


async def test_route_changes_from_another_thread_while_packets_flow(rig):
    """set_route/del_route from a Python thread while the packet thread forwards: each
    takes the write lock without the GIL, so the event loop keeps running meanwhile."""
    task = asyncio.create_task(rig.dp.run())
    stop = False

    def churn() -> int:
        n = 0
        while not stop:
            for i in range(256):
                rig.dp.set_route(ipaddress.IPv4Network(f"10.6.{i}.0/24"),
                                 ipaddress.IPv4Address("127.0.0.9"))
            for i in range(256):
                rig.dp.del_route(ipaddress.IPv4Network(f"10.6.{i}.0/24"))
            n += 1
        return n

    churner = asyncio.create_task(asyncio.to_thread(churn))
    try:
        for k in range(300):
            pkt = tcp_packet(struct.pack("!I", k), dst="10.5.2.9")
            rig.tun.send(VNET_HDR.pack(0, 0, 0, 0, 0, 0) + pkt)
            got = await asyncio.to_thread(rig.peer.recv, 2000)
            assert got[40:] == struct.pack("!I", k)
    finally:
        stop = True
        rounds = await churner
        rig.dp.stop()
        await asyncio.wait_for(task, 5)
    assert rounds > 0
