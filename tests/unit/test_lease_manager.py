"""Unit tests for agent.lease_manager against MemoryRegistry: acquire, hold, renew, watch."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random

import pytest

from agent.config import parse_config
from agent.lease import Lease, PeerEvent
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from agent.registry import MemoryRegistry, Record
from tests.support.aio import background, until

TIMEOUT = 5.0
CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
DAY = 86400


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(f"192.168.100.{n}"), None, "host-gw", None)


def value(n: int) -> bytes:
    return encode_lease(attrs(n))


def manager(reg: MemoryRegistry, n: int = 1, config=CONFIG, **kw) -> LeaseManager:
    kw.setdefault("rng", random.Random(n))
    kw.setdefault("backoff_cap", 0.1)
    return LeaseManager(reg, config, attrs(n), **kw)


async def record(reg: MemoryRegistry, name: str) -> Record | None:
    snap = await reg.list_subnets()
    return next((r for r in snap.records if r.name == name), None)


class Collector:
    """An on_batch callback that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[PeerEvent]] = []

    async def __call__(self, batch: list[PeerEvent]) -> None:
        assert batch, "empty batches are not handed out"
        self.batches.append(batch)

    def events(self) -> list[tuple[str, str, str]]:
        return [
            (e.kind, str(e.lease.subnet), str(e.lease.attrs.public_ip))
            for b in self.batches
            for e in b
        ]


class LeaseLog:
    """An on_lease callback that keeps every lease."""

    def __init__(self) -> None:
        self.leases: list[Lease] = []

    async def __call__(self, lease: Lease) -> None:
        self.leases.append(lease)


# -- acquire -------------------------------------------------------------------------------


async def test_acquire_creates_key_with_exact_lease_json() -> None:
    reg = MemoryRegistry()
    now = [1000.0]
    m = manager(reg, clock=lambda: now[0])
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert CONFIG.subnet_fits(lease.subnet)
    assert lease.name == f"{lease.subnet.network_address}-24"
    rec = await record(reg, lease.name)
    assert rec is not None
    assert rec.value == b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert rec.lease_id != 0
    assert rec.mod_revision == lease.mod_revision
    assert lease.reservation is False
    assert lease.expires_at == 1000.0 + DAY
    assert m.lease == lease
    assert m.counters.acquisitions == 1
    assert m.etcd_reachable is True


async def test_acquire_uses_ttl() -> None:
    t = [0.0]
    reg = MemoryRegistry(clock=lambda: t[0])
    m = manager(reg, ttl=100)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    t[0] = 99.0
    assert await record(reg, lease.name) is not None
    t[0] = 101.0
    assert await record(reg, lease.name) is None  # expired


async def test_second_host_gets_a_different_subnet() -> None:
    reg = MemoryRegistry()
    a = await asyncio.wait_for(manager(reg, 1, rng=random.Random(0)).acquire(), TIMEOUT)
    b = await asyncio.wait_for(manager(reg, 2, rng=random.Random(0)).acquire(), TIMEOUT)
    assert a.subnet != b.subnet
    snap = await reg.list_subnets()
    assert {r.name for r in snap.records} == {a.name, b.name}


async def test_same_public_ip_reuses_existing_lease() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.42.0-24", value(1), ttl=DAY)
    before = await record(reg, "10.5.42.0-24")
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert lease.subnet == net("10.5.42.0/24")
    assert lease.name == "10.5.42.0-24"
    after = await record(reg, "10.5.42.0-24")
    assert after is not None and before is not None
    assert after.mod_revision > before.mod_revision  # rewritten with a fresh lease
    assert after.lease_id not in (0, before.lease_id)
    assert lease.reservation is False
    assert len((await reg.list_subnets()).records) == 1


async def test_reuse_rewrites_value_of_other_backend() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.42.0-24", b'{"PublicIP":"192.168.100.1","PublicIPv6":null}', ttl=DAY)
    lease = await asyncio.wait_for(manager(reg).acquire(), TIMEOUT)
    assert lease.name == "10.5.42.0-24"
    rec = await record(reg, lease.name)
    assert rec is not None and rec.value == value(1)


async def test_reservation_is_reused_and_stays_a_reservation() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.50.0-24", value(1), ttl=0)
    m = manager(reg, ttl=10, renew_margin=9.5)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert lease.subnet == net("10.5.50.0/24")
    assert lease.reservation is True
    assert lease.expires_at is None
    rec = await record(reg, "10.5.50.0-24")
    assert rec is not None and rec.lease_id == 0
    # hold() never renews a reservation, nor gives it a TTL.
    async with background(m.hold(LeaseLog())):
        await asyncio.sleep(1.2)  # a TTL lease would have been renewed after ~1 s
    after = await record(reg, "10.5.50.0-24")
    assert after is not None
    assert after.lease_id == 0
    assert after.mod_revision == rec.mod_revision
    assert m.counters.renewals == 0


async def test_reservation_preferred_over_own_ttl_lease() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.3.0-24", value(1), ttl=DAY)
    await reg.put("10.5.60.0-24", value(1), ttl=0)
    lease = await asyncio.wait_for(manager(reg).acquire(), TIMEOUT)
    assert lease.name == "10.5.60.0-24"
    assert lease.reservation


async def test_previous_subnet_preferred() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.1.0-24", value(2), ttl=DAY)
    m = manager(reg, previous=net("10.5.77.0/24"))
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert lease.subnet == net("10.5.77.0/24")


async def test_previous_subnet_taken_is_not_used() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.77.0-24", value(2), ttl=DAY)
    m = manager(reg, previous=net("10.5.77.0/24"))
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert lease.subnet != net("10.5.77.0/24")
    rec = await record(reg, "10.5.77.0-24")
    assert rec is not None and rec.value == value(2)  # the other host's lease is untouched


async def test_own_lease_that_does_not_fit_is_deleted() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.0.0-24", value(1), ttl=DAY)  # the first subnet is below SubnetMin
    lease = await asyncio.wait_for(manager(reg).acquire(), TIMEOUT)
    assert lease.subnet != net("10.5.0.0/24")
    names = {r.name for r in (await reg.list_subnets()).records}
    assert names == {lease.name}


async def test_undecodable_lease_counts_as_taken() -> None:
    config = parse_config(
        '{"Network":"10.5.0.0/16","SubnetMin":"10.5.40.0","SubnetMax":"10.5.41.0"}'
    )
    reg = MemoryRegistry()
    await reg.put("10.5.40.0-24", b"garbage", ttl=DAY)
    await reg.put("bogus-key", value(3), ttl=DAY)
    m = manager(reg, config=config)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert lease.subnet == net("10.5.41.0/24")
    assert m.counters.bad_values >= 1
    assert m.counters.bad_keys >= 1


async def test_lost_race_retries_with_a_fresh_list(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = MemoryRegistry()
    original = reg.create_subnet
    tried: list[str] = []

    async def racing_create(name: str, val: bytes, ttl: int) -> int | None:
        tried.append(name)
        if len(tried) == 1:
            # Another host creates the very key we chose, between our list and our create.
            await reg.put(name, value(9), ttl=DAY)
        return await original(name, val, ttl)

    monkeypatch.setattr(reg, "create_subnet", racing_create)
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert m.counters.lost_races == 1
    assert len(tried) == 2
    assert lease.name == tried[1] != tried[0]
    first = await record(reg, tried[0])
    assert first is not None and first.value == value(9)  # the winner's lease is left alone
    ours = await record(reg, lease.name)
    assert ours is not None and ours.value == value(1)


async def test_registry_unavailable_then_restored() -> None:
    reg = MemoryRegistry()
    reg.available = False
    m = manager(reg)
    task = asyncio.create_task(m.acquire())
    try:
        await asyncio.sleep(0.4)
        assert not task.done()
        assert m.etcd_reachable is False
        assert m.lease is None
        reg.available = True
        lease = await asyncio.wait_for(task, TIMEOUT)
    finally:
        task.cancel()
    assert m.etcd_reachable is True
    assert await record(reg, lease.name) is not None


async def test_out_of_subnets_retries_until_one_is_free() -> None:
    config = parse_config(
        '{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.9.0"}'
    )
    reg = MemoryRegistry()
    await reg.put("10.5.9.0-24", value(2), ttl=DAY)
    m = manager(reg, config=config)
    task = asyncio.create_task(m.acquire())
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        await reg.delete("10.5.9.0-24")
        lease = await asyncio.wait_for(task, TIMEOUT)
    finally:
        task.cancel()
    assert lease.subnet == net("10.5.9.0/24")


# -- hold: renewal and loss ------------------------------------------------------------------


async def test_renewal_rewrites_the_key() -> None:
    reg = MemoryRegistry()
    m = manager(reg, ttl=10, renew_margin=9.5)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    first = await record(reg, lease.name)
    assert first is not None
    on_lease = LeaseLog()
    async with background(m.hold(on_lease)):
        await until(lambda: m.counters.renewals >= 1, 3.0)
    after = await record(reg, lease.name)
    assert after is not None
    assert after.mod_revision > first.mod_revision
    assert after.lease_id not in (0, first.lease_id)
    assert after.value == value(1)
    assert m.lease is not None and m.lease.name == lease.name
    assert m.lease.mod_revision == after.mod_revision
    assert m.counters.reacquisitions == 0
    assert on_lease.leases == []


async def test_renewal_waits_out_an_outage() -> None:
    reg = MemoryRegistry()
    m = manager(reg, ttl=10, renew_margin=9.5)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    reg.available = False
    async with background(m.hold(LeaseLog())):
        await asyncio.sleep(1.5)  # the renewal is due after ~1 s
        assert m.counters.renewals == 0
        assert m.etcd_reachable is False
        reg.available = True
        await until(lambda: m.counters.renewals >= 1, 3.0)
    assert m.counters.reacquisitions == 0
    assert m.lease is not None and m.lease.name == lease.name


async def test_own_lease_deleted_is_reacquired() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    on_lease = LeaseLog()
    async with background(m.watch(Collector()), m.hold(on_lease)):
        await until(lambda: m.counters.relists >= 1)
        await reg.delete(lease.name)
        await until(lambda: on_lease.leases)
        assert on_lease.leases[0].subnet == lease.subnet
        assert m.counters.reacquisitions == 1
    rec = await record(reg, lease.name)
    assert rec is not None and rec.value == value(1) and rec.lease_id != 0
    assert m.lease is not None and m.lease.subnet == lease.subnet


async def test_own_lease_expired_is_reacquired() -> None:
    t = [0.0]
    reg = MemoryRegistry(clock=lambda: t[0])
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    on_lease = LeaseLog()
    async with background(m.watch(Collector()), m.hold(on_lease)):
        await until(lambda: m.counters.relists >= 1)
        t[0] = DAY + 1
        await reg.expire()
        await until(lambda: on_lease.leases)
    assert on_lease.leases[0].subnet == lease.subnet
    assert await record(reg, lease.name) is not None


async def test_own_lease_taken_by_another_host_moves_us() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    on_lease = LeaseLog()
    async with background(m.watch(Collector()), m.hold(on_lease)):
        await until(lambda: m.counters.relists >= 1)
        await reg.put(lease.name, value(7), ttl=DAY)
        await until(lambda: on_lease.leases)
    new = on_lease.leases[0]
    assert new.subnet != lease.subnet
    rec = await record(reg, lease.name)
    assert rec is not None and rec.value == value(7)


async def test_host_that_took_our_subnet_becomes_a_peer() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    on_lease = LeaseLog()
    batches = Collector()
    async with background(m.watch(batches), m.hold(on_lease)):
        await until(lambda: m.counters.relists >= 1)
        await reg.put(lease.name, value(7), ttl=DAY)
        await until(lambda: on_lease.leases)
        await asyncio.sleep(0.3)
        assert (str(lease.subnet), "192.168.100.7") in {
            (str(p.subnet), str(p.attrs.public_ip)) for p in m.peers()
        }


# -- watch ---------------------------------------------------------------------------------


async def test_watch_snapshot_then_events() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    await reg.put("10.5.3.0-24", value(3), ttl=DAY)
    m = manager(reg)
    await asyncio.wait_for(m.acquire(), TIMEOUT)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        assert sorted(got.events()) == [
            ("added", "10.5.2.0/24", "192.168.100.2"),
            ("added", "10.5.3.0/24", "192.168.100.3"),
        ]
        assert len(got.batches) == 1
        got.batches.clear()

        await reg.put("10.5.4.0-24", value(4), ttl=DAY)
        await until(lambda: got.batches)
        assert got.events() == [("added", "10.5.4.0/24", "192.168.100.4")]
        got.batches.clear()

        await reg.delete("10.5.2.0-24")
        await until(lambda: got.batches)
        assert got.events() == [("removed", "10.5.2.0/24", "192.168.100.2")]
        got.batches.clear()

        # A peer changing its address is an "added" (upsert) with the new attrs.
        await reg.put("10.5.3.0-24", value(33), ttl=DAY)
        await until(lambda: got.batches)
        assert got.events() == [("added", "10.5.3.0/24", "192.168.100.33")]

    assert {str(p.subnet) for p in m.peers()} == {"10.5.3.0/24", "10.5.4.0/24"}
    assert m.counters.events >= 3


async def test_peer_renewal_with_same_value_is_not_an_event() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        got.batches.clear()
        await reg.put("10.5.2.0-24", value(2), ttl=DAY)  # the peer renews its lease
        await reg.put("10.5.5.0-24", value(5), ttl=DAY)
        await until(lambda: got.batches)
        await asyncio.sleep(0.1)
    assert got.events() == [("added", "10.5.5.0/24", "192.168.100.5")]


async def test_watch_with_no_peers_sends_nothing() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    await asyncio.wait_for(m.acquire(), TIMEOUT)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: m.counters.relists >= 1)
        await asyncio.sleep(0.2)
    assert got.batches == []
    assert m.peers() == []


async def test_own_public_ip_is_not_a_peer() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    await reg.put("10.5.8.0-24", value(1), ttl=DAY)  # another key with our PublicIP
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        await reg.put("10.5.9.0-24", value(1), ttl=DAY)
        await reg.put("10.5.10.0-24", value(10), ttl=DAY)
        await until(lambda: len(got.batches) >= 2)
        await asyncio.sleep(0.1)
    ips = {ip for _, _, ip in got.events()}
    assert ips == {"192.168.100.2", "192.168.100.10"}
    assert "192.168.100.1" not in {str(p.attrs.public_ip) for p in m.peers()}


async def test_own_acquire_is_not_a_peer_event() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: m.counters.relists >= 1)
        await asyncio.wait_for(m.acquire(), TIMEOUT)
        await reg.put("10.5.200.0-24", value(2), ttl=DAY)
        await until(lambda: got.batches)
        await asyncio.sleep(0.1)
    assert got.events() == [("added", "10.5.200.0/24", "192.168.100.2")]


async def test_peer_outside_network_is_skipped() -> None:
    reg = MemoryRegistry()
    await reg.put("10.6.2.0-24", value(2), ttl=DAY)
    await reg.put("10.5.3.0-24", value(3), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        await asyncio.sleep(0.1)
    assert got.events() == [("added", "10.5.3.0/24", "192.168.100.3")]


async def test_changes_arriving_while_a_batch_is_applied_go_over_together() -> None:
    """A slow on_batch (the kernel being programmed) does not make the watch fall one
    response behind per change: what arrived meanwhile is the next batch, in order."""
    reg = MemoryRegistry()
    m = manager(reg)
    await asyncio.wait_for(m.acquire(), TIMEOUT)
    batches: list[list[PeerEvent]] = []
    release = asyncio.Event()

    async def slow(batch: list[PeerEvent]) -> None:
        batches.append(batch)
        if len(batches) == 1:
            await release.wait()

    async with background(m.watch(slow)):
        await reg.put("10.5.2.0-24", value(2), ttl=DAY)
        await until(lambda: batches)
        # Five revisions while the first batch is still being applied.
        await reg.put("10.5.3.0-24", value(3), ttl=DAY)
        await reg.put("10.5.4.0-24", value(4), ttl=DAY)
        await reg.delete("10.5.3.0-24")
        await reg.put("10.5.2.0-24", value(5), ttl=DAY)
        await reg.put("10.5.6.0-24", value(6), ttl=DAY)
        await asyncio.sleep(0.05)
        release.set()
        await until(lambda: len(batches) >= 2)
        await asyncio.sleep(0.05)
    assert len(batches) == 2
    assert [(e.kind, str(e.lease.subnet), str(e.lease.attrs.public_ip)) for e in batches[1]] == [
        ("added", "10.5.3.0/24", "192.168.100.3"), ("added", "10.5.4.0/24", "192.168.100.4"),
        ("removed", "10.5.3.0/24", "192.168.100.3"), ("added", "10.5.2.0/24", "192.168.100.5"),
        ("added", "10.5.6.0/24", "192.168.100.6")]
    assert sorted(str(p.subnet) for p in m.peers()) == [
        "10.5.2.0/24", "10.5.4.0/24", "10.5.6.0/24"]


async def test_network_edges_decide_which_peers_are_inside() -> None:
    reg = MemoryRegistry()
    for name in ("10.4.0.0-15", "10.6.0.0-24", "10.4.255.0-24", "10.5.0.0-16", "10.5.255.0-24"):
        await reg.put(name, value(2), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
    # The same answer as ipaddress's subnet_of, for the prefix, the length and the edges.
    assert sorted(e[1] for e in got.events()) == ["10.5.0.0/16", "10.5.255.0/24"]
    assert m.counters.outside_network == 3


async def test_peer_state_is_compact() -> None:
    """Kept per peer for as long as the peer: no instance dicts, BackendData field names
    shared between peers, no cached broadcast address on the subnet."""
    reg = MemoryRegistry()
    for i in (2, 3):
        doc = {"PublicIP": f"192.168.100.{i}", "BackendType": "vxlan",
               "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:00:0{i}"}}
        await reg.put(f"10.5.{i}.0-24", json.dumps(doc).encode(), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
    a, b = sorted(m.peers(), key=lambda p: p.subnet)
    assert not hasattr(a, "__dict__") and not hasattr(a.attrs, "__dict__")
    assert [k for k in a.attrs.backend_data] == ["VNI", "VtepMAC"]
    assert all(x is y for x, y in zip(a.attrs.backend_data, b.attrs.backend_data, strict=True))
    assert "broadcast_address" not in vars(a.subnet)


async def test_bad_keys_and_values_are_skipped_and_counted() -> None:
    reg = MemoryRegistry()
    await reg.put("bogus", value(2), ttl=DAY)
    await reg.put("10.5.40.1-24", value(4), ttl=DAY)  # host bits
    await reg.put("10.5.41.0-24", b"not json", ttl=DAY)
    await reg.put("10.5.42.0-24", b'{"PublicIP":"nope"}', ttl=DAY)
    await reg.put("10.5.43.0-24", value(3), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)) as (task,):
        await until(lambda: got.batches)
        assert got.events() == [("added", "10.5.43.0/24", "192.168.100.3")]
        assert m.counters.bad_keys == 2
        assert m.counters.bad_values == 2
        got.batches.clear()
        # More junk through the watch: still no crash, and later events still arrive.
        await reg.put("junk-0", value(5), ttl=DAY)
        await reg.put("10.5.44.0-24", b"[]", ttl=DAY)
        await reg.put("10.5.45.0-24", value(6), ttl=DAY)
        await until(lambda: got.batches)
        assert not task.done()
    assert got.events() == [("added", "10.5.45.0/24", "192.168.100.6")]
    assert m.counters.bad_keys == 3
    assert m.counters.bad_values == 3


async def test_peer_value_turning_bad_removes_it() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        got.batches.clear()
        await reg.put("10.5.2.0-24", b"garbage", ttl=DAY)
        await until(lambda: got.batches)
    assert got.events() == [("removed", "10.5.2.0/24", "192.168.100.2")]
    assert m.peers() == []


async def test_outage_without_compaction_loses_no_event() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    await reg.put("10.5.3.0-24", value(3), ttl=DAY)
    m = manager(reg)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        reg.available = False
        await until(lambda: m.counters.watch_reconnects >= 1)
        assert m.etcd_reachable is False
        await reg.delete("10.5.2.0-24")
        await reg.put("10.5.4.0-24", value(4), ttl=DAY)
        reg.available = True
        await until(lambda: {str(p.subnet) for p in m.peers()} == {"10.5.3.0/24", "10.5.4.0/24"})
        assert m.etcd_reachable is True
    assert ("removed", "10.5.2.0/24", "192.168.100.2") in got.events()
    assert ("added", "10.5.4.0/24", "192.168.100.4") in got.events()
    assert m.counters.relists == 1  # resumed from the last revision, no re-list


async def test_compaction_during_outage_relists_and_diffs() -> None:
    reg = MemoryRegistry()
    await reg.put("10.5.2.0-24", value(2), ttl=DAY)
    await reg.put("10.5.3.0-24", value(3), ttl=DAY)
    await reg.put("10.5.5.0-24", value(5), ttl=DAY)
    m = manager(reg)
    await asyncio.wait_for(m.acquire(), TIMEOUT)
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.batches)
        got.batches.clear()
        reg.available = False
        await until(lambda: m.counters.watch_reconnects >= 1)
        await reg.delete("10.5.2.0-24")  # removed during the outage
        await reg.put("10.5.4.0-24", value(4), ttl=DAY)  # added
        await reg.put("10.5.5.0-24", value(55), ttl=DAY)  # changed
        reg.compact(reg.revision)
        reg.available = True
        want = {
            ("10.5.3.0/24", "192.168.100.3"),
            ("10.5.4.0/24", "192.168.100.4"),
            ("10.5.5.0/24", "192.168.100.55"),
        }
        await until(
            lambda: {(str(p.subnet), str(p.attrs.public_ip)) for p in m.peers()} == want
        )
        await asyncio.sleep(0.1)
    assert m.counters.relists == 2
    assert sorted(got.events()) == [
        ("added", "10.5.4.0/24", "192.168.100.4"),
        ("added", "10.5.5.0/24", "192.168.100.55"),
        ("removed", "10.5.2.0/24", "192.168.100.2"),
    ]
    # Our own lease survived the re-list untouched.
    assert m.lease is not None and m.counters.reacquisitions == 0


async def test_own_lease_gone_during_compacted_outage_is_noticed() -> None:
    reg = MemoryRegistry()
    m = manager(reg)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    on_lease = LeaseLog()
    async with background(m.watch(Collector()), m.hold(on_lease)):
        await until(lambda: m.counters.relists >= 1)
        reg.available = False
        await until(lambda: m.counters.watch_reconnects >= 1)
        await reg.delete(lease.name)
        reg.compact(reg.revision)
        reg.available = True
        await until(lambda: on_lease.leases)
    assert on_lease.leases[0].subnet == lease.subnet
    assert await record(reg, lease.name) is not None


def test_renew_margin_capped_below_ttl() -> None:
    m = manager(MemoryRegistry(), ttl=10, renew_margin=9.5)
    assert m.renew_margin == pytest.approx(9.0)
    m = manager(MemoryRegistry(), ttl=DAY, renew_margin=3600)
    assert m.renew_margin == 3600


def test_json_of_manager_value() -> None:
    m = manager(MemoryRegistry())
    assert json.loads(m.value) == {
        "PublicIP": "192.168.100.1",
        "PublicIPv6": None,
        "BackendType": "host-gw",
    }


# -- one listing at start ------------------------------------------------------------------


class CountingRegistry(MemoryRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list_subnets(self):  # type: ignore[no-untyped-def]
        self.lists += 1
        return await super().list_subnets()


@pytest.mark.parametrize("previous", [None, net("10.5.1.0/24")])
async def test_a_start_lists_and_decodes_the_leases_once(previous) -> None:
    """The acquire's listing starts the watch: one list_subnets, each bad value counted
    once, and our own write (made after that listing: a new key, or our old one updated)
    neither seen as lost nor taken back to the listing's older revision."""
    reg = CountingRegistry()
    await reg.put("10.5.3.0-24", value(3), ttl=600)
    await reg.put("10.5.4.0-24", b"{not json", ttl=600)
    if previous is not None:
        await reg.put("10.5.1.0-24", value(1), ttl=600)  # ours, from the last run
    m = manager(reg, previous=previous)
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert (lease.subnet == previous) if previous is not None else True
    got = Collector()
    async with background(m.watch(got)):
        await until(lambda: got.events() == [("added", "10.5.3.0/24", "192.168.100.3")])
        await reg.put("10.5.5.0-24", value(5), ttl=600)
        await until(lambda: len(got.events()) == 2)
        assert reg.lists == 1
        assert m.counters.bad_values == 1
        assert not m.lease_lost
        assert m.lease is not None and m.lease.mod_revision >= lease.mod_revision
    assert m.counters.reacquisitions == 0
    # The revision we hold is our key's: a renewal's compare matches it.
    rec = await record(reg, lease.name)
    assert rec is not None and m.lease.mod_revision == rec.mod_revision
