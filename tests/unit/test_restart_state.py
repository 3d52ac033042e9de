"""A restarted agent leaves the kernel state of its last run alone until it knows the peers.

Found in the lab (SIGKILL + restart): host-gw and vxlan deleted every peer route, neighbour
and FDB entry at setup, before the first listing of the leases, and added them back a few
milliseconds later. Now deletions wait for the peer set (LeaseManager.watch's `on_listed`,
or any batch), and the kernel is never emptied by a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from pathlib import Path

from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from agent.registry import MemoryRegistry
from backends.base import BackendContext
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwNetwork
from backends.kernel.fake import FakeNetlink
from backends.vxlan import VxlanBackend, VxlanNetwork
from tests.support.aio import background, until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))
OWN = NET("10.5.1.0/24")
HOSTGW = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
VXLAN = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')


def hostgw_peer(subnet: str, n: int, kind: str = "added") -> PeerEvent:
    attrs = LeaseAttrs(IP(f"192.168.100.{n}"), None, "host-gw", None)
    return PeerEvent(PeerEventKind(kind), PeerLease(NET(subnet), attrs))


def vxlan_peer(subnet: str, n: int) -> PeerEvent:
    attrs = LeaseAttrs(IP(f"192.168.100.{n}"), None, "vxlan",
                       {"VNI": 1, "VtepMAC": f"0e:00:00:00:00:{n:02x}"})
    return PeerEvent(PeerEventKind.ADDED, PeerLease(NET(subnet), attrs))


async def test_hostgw_restart_keeps_routes_until_the_peers_are_known() -> None:
    fake = FakeNetlink()
    first = HostGwNetwork(fake, EXT, HOSTGW, resync=10.0)
    await first.setup(Lease(OWN, "10.5.1.0-24", first.lease_attrs, 5, None))
    await first.apply([hostgw_peer("10.5.2.0/24", 2), hostgw_peer("10.5.3.0/24", 3)])
    before = dict(fake.table)
    assert set(before) == {NET("10.5.2.0/24"), NET("10.5.3.0/24")}

    # The process dies; a new one starts over the same kernel.
    second = HostGwNetwork(fake, EXT, HOSTGW, resync=10.0)
    await second.setup(Lease(OWN, "10.5.1.0-24", second.lease_attrs, 5, None))
    await second.sync()  # a resync before the first listing
    assert fake.table == before
    # The listing: host 3 left while we were down, so its route goes now, and only now.
    await second.apply([hostgw_peer("10.5.2.0/24", 2)])
    assert set(fake.table) == {NET("10.5.2.0/24")}


async def test_vxlan_restart_keeps_entries_until_the_peers_are_known(tmp_path: Path) -> None:
    fake = FakeNetlink()

    async def run() -> VxlanNetwork:
        backend = VxlanBackend(BackendContext(fake, EXT, 10.0, tmp_path, "subnet.env"),
                               rng=random.Random(1))
        network = await backend.register_network(VXLAN)
        await network.setup(Lease(OWN, "10.5.1.0-24", network.lease_attrs, 5, None))
        return network

    first = await run()
    await first.apply([vxlan_peer("10.5.2.0/24", 2), vxlan_peer("10.5.3.0/24", 3)])
    state = (dict(fake.table), set(fake.neigh), set(fake.fdb))
    assert len(state[0]) == len(state[1]) == len(state[2]) == 2

    second = await run()
    await second.sync()
    assert (dict(fake.table), set(fake.neigh), set(fake.fdb)) == state
    await second.apply([])  # the listing found no peers at all: everything goes
    assert (fake.table, fake.neigh, fake.fdb) == ({}, set(), set())


async def test_watch_calls_on_listed_after_each_listing_even_without_peers() -> None:
    reg = MemoryRegistry()
    cfg = HOSTGW
    attrs = LeaseAttrs(IP("192.168.100.1"), None, "host-gw", None)
    m = LeaseManager(reg, cfg, attrs, rng=random.Random(1), backoff_cap=0.1)
    await asyncio.wait_for(m.acquire(), 5)
    listed: list[int] = []
    batches: list[list[PeerEvent]] = []

    async def on_batch(batch: list[PeerEvent]) -> None:
        batches.append(batch)

    async def on_listed() -> None:
        listed.append(len(batches))

    async with background(m.watch(on_batch, on_listed)):
        await until(lambda: listed)
        assert listed == [0] and batches == []  # no peers: no batch, but the signal
        reg.available = False
        await until(lambda: m.counters.watch_reconnects >= 1)
        other = LeaseAttrs(IP("192.168.100.2"), None, "host-gw", None)
        await reg.put("10.5.2.0-24", encode_lease(other), ttl=86400)
        reg.compact(reg.revision)
        reg.available = True
        await until(lambda: len(listed) == 2)
    # After the compaction: the re-listing's batch first, then the signal.
    assert listed == [0, 1] and [e.kind for e in batches[0]] == ["added"]
