"""Unit tests for backends.hostgw with FakeNetlink: desired routes, resync, ownership, errors."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.lease import Lease, PeerEvent, PeerEventKind, PeerLease
from agent.lease_codec import LeaseAttrs, encode_lease
from backends.base import BackendContext
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwBackend, HostGwNetwork
from backends.kernel.fake import FakeNetlink
from backends.kernel.types import Route


@pytest.fixture(autouse=True)
def _no_removal_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals at once, as these tests expect; the grace has tests of its own
    (tests/unit/test_heal.py)."""
    monkeypatch.setattr("backends.routed.REMOVAL_GRACE", 0.0)

CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
IP = ipaddress.IPv4Address
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))
OWN = ipaddress.IPv4Network("10.5.1.0/24")


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def peer(subnet: str, n: int, btype: str = "host-gw", kind: str = "added") -> PeerEvent:
    attrs = LeaseAttrs(IP(f"192.168.100.{n}"), None, btype, None)
    return PeerEvent(PeerEventKind(kind), PeerLease(net(subnet), attrs))


def via(subnet: str, n: int, oif: int = 2) -> Route:
    return Route(net(subnet), IP(f"192.168.100.{n}"), oif)


@pytest.fixture
def fake() -> FakeNetlink:
    return FakeNetlink()


@pytest.fixture
async def hostgw(fake: FakeNetlink) -> HostGwNetwork:
    network = HostGwNetwork(fake, EXT, CONFIG, resync=10.0)
    own = Lease(OWN, "10.5.1.0-24", network.lease_attrs, 5, None)
    await network.setup(own)
    return network


def test_lease_attrs_encode_to_hostgw_json() -> None:
    network = HostGwNetwork(FakeNetlink(), EXT, CONFIG, 10.0)
    assert encode_lease(network.lease_attrs) == (
        b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}'
    )
    assert network.mtu == 1500


def test_lease_attrs_use_public_ip_override() -> None:
    ext = ExternalInterface("eth0", 2, 9000, IP("10.0.0.5"), IP("203.0.113.9"))
    network = HostGwNetwork(FakeNetlink(), ext, CONFIG, 10.0)
    assert network.lease_attrs.public_ip == IP("203.0.113.9")
    assert network.mtu == 9000


async def test_register_network(tmp_path: Path) -> None:
    backend = HostGwBackend(BackendContext(FakeNetlink(), EXT, 3.0, tmp_path, "subnet.env"))
    assert backend.name == "host-gw"
    network = await backend.register_network(CONFIG)
    assert isinstance(network, HostGwNetwork)
    assert network.config == CONFIG
    assert network.resync == 3.0


async def test_not_ready_before_first_sync(fake: FakeNetlink) -> None:
    network = HostGwNetwork(fake, EXT, CONFIG, 10.0)
    assert network.ready() is False


async def test_added_peers_get_routes_via_public_ip(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    assert hostgw.ready() is True
    await hostgw.apply([peer("10.5.2.0/24", 2), peer("10.5.3.0/24", 3)])
    assert fake.table == {
        net("10.5.2.0/24"): via("10.5.2.0/24", 2),
        net("10.5.3.0/24"): via("10.5.3.0/24", 3),
    }
    assert all(r.oif == 2 and not r.onlink for r in fake.table.values())
    assert hostgw.ready() is True
    assert hostgw.route_errors == 0


async def test_peers_of_other_backend_type_ignored(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply(
        [peer("10.5.2.0/24", 2, "vxlan"), peer("10.5.3.0/24", 3, ""), peer("10.5.4.0/24", 4)]
    )
    assert set(fake.table) == {net("10.5.4.0/24")}


async def test_peer_switching_backend_loses_its_route(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2)])
    assert net("10.5.2.0/24") in fake.table
    await hostgw.apply([peer("10.5.2.0/24", 2, "vxlan")])
    assert net("10.5.2.0/24") not in fake.table


async def test_removal_deletes(hostgw: HostGwNetwork, fake: FakeNetlink) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2), peer("10.5.3.0/24", 3)])
    await hostgw.apply([peer("10.5.2.0/24", 2, kind="removed")])
    assert set(fake.table) == {net("10.5.3.0/24")}
    assert ("delete", via("10.5.2.0/24", 2)) in fake.calls


async def test_peer_address_change_replaces_route(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2)])
    await hostgw.apply([peer("10.5.2.0/24", 22)])
    assert fake.table == {net("10.5.2.0/24"): via("10.5.2.0/24", 22)}


async def test_own_subnet_is_never_routed(hostgw: HostGwNetwork, fake: FakeNetlink) -> None:
    await hostgw.apply([peer(str(OWN), 9)])
    assert fake.table == {}


async def test_route_removed_by_hand_comes_back_on_sync(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2), peer("10.5.3.0/24", 3)])
    assert await hostgw.sync() is False  # nothing to do
    del fake.table[net("10.5.2.0/24")]
    fake.calls.clear()
    assert await hostgw.sync() is True
    assert fake.table[net("10.5.2.0/24")] == via("10.5.2.0/24", 2)
    assert fake.calls == [("replace", via("10.5.2.0/24", 2))]


async def test_route_changed_by_hand_is_put_back(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2)])
    fake.table[net("10.5.2.0/24")] = via("10.5.2.0/24", 99)
    assert await hostgw.sync() is True
    assert fake.table[net("10.5.2.0/24")] == via("10.5.2.0/24", 2)


async def test_routes_not_owned_are_never_deleted(fake: FakeNetlink) -> None:
    foreign = [
        via("10.5.0.0/16", 50),  # another prefix length
        via("10.5.7.0/25", 51),  # another prefix length, inside Network
        via("10.6.1.0/24", 52),  # outside Network
        via("10.5.8.0/24", 53, oif=3),  # another interface
        Route(net("10.5.9.0/24"), None, 2),  # no gateway (e.g. a device route)
        Route(net("0.0.0.0/0"), IP("192.168.100.254"), 2),
        via(str(OWN), 54),  # our own subnet
    ]
    for r in foreign:
        fake.table[r.dst] = r
    stale = via("10.5.10.0/24", 55)  # looks like ours: peer-sized, in Network, via eth0
    fake.table[stale.dst] = stale
    network = HostGwNetwork(fake, EXT, CONFIG, 10.0)
    await network.setup(Lease(OWN, "10.5.1.0-24", network.lease_attrs, 5, None))
    await network.apply([peer("10.5.2.0/24", 2)])
    await network.sync()
    for r in foreign:
        assert fake.table.get(r.dst) == r, r
    assert stale.dst not in fake.table
    assert [c for c in fake.calls if c[0] == "delete"] == [("delete", stale)]


async def test_kernel_errors_counted_and_not_ready_then_recover(
    hostgw: HostGwNetwork, fake: FakeNetlink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    bad = net("10.5.3.0/24")
    unreachable = "ENETUNREACH (101): Network is unreachable"
    fake.fail = lambda op, r: unreachable if r.dst == bad else None
    await hostgw.apply([peer("10.5.2.0/24", 2), peer("10.5.3.0/24", 3)])
    assert hostgw.route_errors == 1
    assert hostgw.ready() is False
    assert set(fake.table) == {net("10.5.2.0/24")}

    await hostgw.sync()  # same failure again: counted again, logged once
    assert hostgw.route_errors == 2
    assert hostgw.ready() is False
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and "10.5.3.0/24" in r.getMessage()
    ]
    assert len(errors) == 1
    assert "10.5.3.0/24" in errors[0].getMessage()
    assert "ENETUNREACH" in errors[0].getMessage()

    fake.fail = lambda op, r: None
    assert await hostgw.sync() is True
    assert hostgw.ready() is True
    assert fake.table[bad] == via("10.5.3.0/24", 3)
    assert hostgw.route_errors == 2


async def test_delete_error_counted(hostgw: HostGwNetwork, fake: FakeNetlink) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2)])
    fake.fail = lambda op, r: "EPERM" if op == "delete" else None
    await hostgw.apply([peer("10.5.2.0/24", 2, kind="removed")])
    assert hostgw.route_errors == 1
    assert hostgw.ready() is False
    fake.fail = lambda op, r: None
    await hostgw.sync()
    assert hostgw.ready() is True
    assert fake.table == {}


async def test_setup_with_new_lease_drops_route_to_own_subnet(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.2.0/24", 2)])
    # We moved to 10.5.2.0/24 (say the peer left and we took it): no route to ourselves.
    await hostgw.setup(Lease(net("10.5.2.0/24"), "10.5.2.0-24", hostgw.lease_attrs, 9, None))
    assert net("10.5.2.0/24") not in hostgw.peers


async def test_run_resyncs_periodically(fake: FakeNetlink) -> None:
    network = HostGwNetwork(fake, EXT, CONFIG, resync=0.05)
    await network.setup(Lease(OWN, "10.5.1.0-24", network.lease_attrs, 5, None))
    await network.apply([peer("10.5.2.0/24", 2)])
    task = asyncio.create_task(network.run())
    try:
        del fake.table[net("10.5.2.0/24")]

        async def repaired() -> None:
            while True:
                if net("10.5.2.0/24") in fake.table:
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(repaired(), 5.0)
        assert network.resyncs >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_route_to_peer_of_other_length_is_removed_with_it(
    hostgw: HostGwNetwork, fake: FakeNetlink
) -> None:
    await hostgw.apply([peer("10.5.7.0/25", 7)])
    assert fake.table.get(net("10.5.7.0/25")) == via("10.5.7.0/25", 7)
    await hostgw.apply([peer("10.5.7.0/25", 7, kind="removed")])
    assert net("10.5.7.0/25") not in fake.table
