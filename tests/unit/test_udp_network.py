"""The udp network's own rules, without a device (FakeNetlink, a socketpair standing in
for flannel0's TUN): our subnet handed to the datapath, and a TUN that is lost (flannel0
deleted) made again, handed over and counted, with traffic moving through the new one,
for both datapaths."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import backends.udp.network as udp_network
from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs
from backends.base import BackendContext
from backends.external_iface import ExternalInterface
from backends.kernel.fake import FakeNetlink
from backends.udp.network import UdpBackend, UdpNetwork
from tests.support.packets import hopped, sized_packet

IP = ipaddress.IPv4Address
OWN = ipaddress.IPv4Network("10.5.1.0/24")
PEER_NET = ipaddress.IPv4Network("10.5.2.0/24")
PEER = IP("127.0.0.2")
EXT = ExternalInterface("eth0", 2, 1500, IP("127.0.0.1"), IP("127.0.0.1"))


class FakeTun:
    """flannel0 as one end of a datagram socket pair; `theirs` is the kernel's side."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.closed = False

    def fileno(self) -> int:
        return self.ours.fileno()

    def hang_up(self) -> None:
        """What deleting the device does to its fd: poll() reports an error/hang-up."""
        dup = socket.socket(fileno=os.dup(self.ours.fileno()))
        dup.shutdown(socket.SHUT_RDWR)
        dup.close()

    def close(self) -> None:
        self.closed = True
        self.ours.close()
        self.theirs.close()


@pytest.fixture(params=["python", "c"])
def rig(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    tuns: list[FakeTun] = []
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((str(PEER), 0))
    port = peer.getsockname()[1]
    socks: list[socket.socket] = [peer]

    def open_tun(name: str, vnet_hdr: bool = False) -> FakeTun:
        assert name == "flannel0"
        tuns.append(FakeTun())
        return tuns[-1]

    def open_socket(addr: Any, port_: int, size: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
        return s

    monkeypatch.setattr(udp_network, "open_tun", open_tun)
    monkeypatch.setattr(udp_network, "open_socket", open_socket)
    monkeypatch.setattr(udp_network, "RECREATE_RETRY", (0.01, 0.05))
    monkeypatch.delenv("TWEED_DATAPATH", raising=False)
    config = parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {
        "Type": "udp", "Datapath": request.param, "Port": port, "TSO": False,
        "Coalesce": False, "UDPGSO": False, "UDPGRO": False}}))
    netlink = FakeNetlink()
    ctx = BackendContext(netlink, EXT, 300.0, tmp_path, "subnet.env")
    yield UdpBackend(ctx), config, netlink, tuns, peer
    for s in socks:
        s.close()
    for t in tuns:
        if not t.closed:
            t.close()


async def start(rig) -> tuple[UdpNetwork, asyncio.Task[None]]:
    backend, config, _netlink, _tuns, _peer = rig
    network = await backend.register_network(config)
    await network.setup(Lease(OWN, "10.5.1.0-24", LeaseAttrs(EXT.public_ip), 1, None))
    await network.apply([PeerEvent(PeerEventKind.ADDED,
                                   PeerLease(PEER_NET, LeaseAttrs(PEER)))])
    return network, asyncio.create_task(network.run())


async def stop(network: UdpNetwork, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await network.close()


async def wait_recreated(network: UdpNetwork) -> None:
    for _ in range(500):
        if network.counters()["tun_recreated"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("flannel0 was not made again")


async def through(tun: FakeTun, peer: socket.socket, n: int) -> None:
    """A packet from the kernel's side of `tun` reaches the peer, one hop on."""
    pkt = sized_packet("10.5.1.10", "10.5.2.7", 100, ttl=64, fill=n)
    tun.theirs.send(pkt)
    peer.settimeout(5)
    got = await asyncio.to_thread(peer.recv, 2000)
    assert got == hopped(pkt)


async def test_setup_hands_our_subnet_to_the_datapath(rig) -> None:
    network, task = await start(rig)
    try:
        _b, _c, _n, tuns, peer = rig
        # A datagram for our subnet is delivered, one for the peer's own is not.
        dp_addr = network.sock.getsockname() if network.sock else None
        peer.sendto(sized_packet("10.5.2.5", "10.5.2.9", 60), dp_addr)
        ours = sized_packet("10.5.2.5", "10.5.1.10", 60)
        peer.sendto(ours, dp_addr)
        tuns[0].theirs.settimeout(5)
        assert await asyncio.to_thread(tuns[0].theirs.recv, 2000) == hopped(ours)
        assert network.counters()["rx_drop_dst_outside"] == 1
    finally:
        await stop(network, task)


async def test_a_lost_tun_is_made_again_handed_over_and_counted(
    rig, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    _b, _c, netlink, tuns, peer = rig
    network, task = await start(rig)
    try:
        await through(tuns[0], peer, 1)
        configured = [c for c in netlink.calls if c[0] == "configure_link"]
        assert len(configured) == 1
        tuns[0].hang_up()
        await wait_recreated(network)
        assert len(tuns) == 2 and tuns[0].closed  # the old fd let go, a new TUN opened
        configured = [c for c in netlink.calls if c[0] == "configure_link"]
        assert configured[-1][1] == ("flannel0", ipaddress.IPv4Interface("10.5.1.0/32"),
                                     1472, udp_network.TXQUEUELEN)
        assert len(configured) == 2
        c = network.counters()
        assert (c["tun_lost"], c["tun_recreated"]) == (1, 1)
        await through(tuns[1], peer, 2)  # the datapath moves packets through the new one
        assert "flannel0 is gone" in caplog.text and "flannel0 made again" in caplog.text
        assert not task.done()
    finally:
        await stop(network, task)


async def test_making_the_tun_again_is_retried_until_it_works(
    rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _b, _c, netlink, tuns, peer = rig
    network, task = await start(rig)
    failures = [OSError("no such device"), OSError("no such device")]
    real = netlink.configure_link

    async def flaky(*args: Any) -> int:
        if failures:
            raise failures.pop()
        return await real(*args)

    monkeypatch.setattr(netlink, "configure_link", flaky)
    try:
        tuns[0].hang_up()
        await wait_recreated(network)
        assert caplog.text.count("cannot make flannel0 again") == 2
        assert "Traceback" not in caplog.text
        assert len(tuns) == 4 and all(t.closed for t in tuns[:3])
        await through(tuns[3], peer, 3)
    finally:
        await stop(network, task)
