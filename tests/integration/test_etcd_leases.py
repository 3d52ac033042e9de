"""The lease manager and the etcd registry against a real etcd (Debian's etcd-server)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random

import pytest
from etcd3aio import Etcd3Client

from agent.config import parse_config
from agent.daemon import wait_for_config
from agent.etcd_registry import EtcdRegistry, EtcdSettings
from agent.lease import PeerEvent
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from tests.support.aio import background, until

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(f"192.168.100.{n}"), None, "host-gw", None)


def peer_json(n: int) -> str:
    return encode_lease(attrs(n)).decode()


def registry_for(url: str) -> EtcdRegistry:
    return EtcdRegistry(EtcdSettings((url,), PREFIX))


@contextlib.asynccontextmanager
async def manager(url: str, n: int, config=None, seed: int | None = None, **kw):
    reg = registry_for(url)
    m = LeaseManager(reg, config or parse_config(json.dumps(CONFIG)), attrs(n),
                     rng=random.Random(n if seed is None else seed), backoff_cap=0.5, **kw)
    try:
        yield m
    finally:
        await reg.close()


def lease_of(etcd, key: str) -> int:
    out = json.loads(etcd.etcdctl("get", key, "-w", "json"))
    return int(out["kvs"][0].get("lease", 0)) if out.get("kvs") else -1


async def test_acquire_writes_flannel_json_with_a_24h_lease(etcd):
    async with manager(etcd.client_url, 1) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
    key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24"
    assert etcd.get(key) == '{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}'
    lease_id = lease_of(etcd, key)
    assert lease_id > 0
    ttl = json.loads(etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json"))
    assert 86000 < ttl["ttl"] <= 86400
    assert lease.subnet.subnet_of(ipaddress.IPv4Network("10.5.0.0/16"))
    assert lease.subnet != ipaddress.IPv4Network("10.5.0.0/24")  # SubnetMin skips the first


async def test_restart_reuses_the_same_subnet_with_a_fresh_lease(etcd):
    async with manager(etcd.client_url, 1) as m:
        first = await asyncio.wait_for(m.acquire(), 10)
    key = f"{PREFIX}/subnets/{first.subnet.network_address}-24"
    old_lease = lease_of(etcd, key)
    async with manager(etcd.client_url, 1) as m2:
        second = await asyncio.wait_for(m2.acquire(), 10)
    assert second.subnet == first.subnet
    assert lease_of(etcd, key) not in (old_lease, 0)
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 1


async def test_previous_subnet_from_subnet_env_is_taken_when_free(etcd):
    want = ipaddress.IPv4Network("10.5.77.0/24")
    async with manager(etcd.client_url, 1, previous=want) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
    assert lease.subnet == want
    # Taken by another host: the previous subnet is not stolen.
    async with manager(etcd.client_url, 2, previous=want) as m2:
        other = await asyncio.wait_for(m2.acquire(), 10)
    assert other.subnet != want


async def test_reservation_is_reused_and_never_given_a_ttl(etcd):
    key = f"{PREFIX}/subnets/10.5.42.0-24"
    etcd.put(key, '{"PublicIP":"192.168.100.1"}')
    async with manager(etcd.client_url, 1, ttl=60, renew_margin=59.5) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
        assert lease.subnet == ipaddress.IPv4Network("10.5.42.0/24")
        assert lease.reservation
        async with background(m.hold(lambda lease: asyncio.sleep(0))):
            await asyncio.sleep(1.5)  # several renewal margins pass
    assert lease_of(etcd, key) == 0
    assert json.loads(etcd.get(key))["PublicIP"] == "192.168.100.1"
    assert m.counters.renewals == 0


async def test_renewal_rewrites_the_key_with_a_new_lease(etcd):
    async with manager(etcd.client_url, 1, ttl=60, renew_margin=58.0) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
        key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24"
        first = lease_of(etcd, key)
        async with background(m.hold(lambda lease: asyncio.sleep(0))):
            await until(lambda: m.counters.renewals >= 1, limit=15)
    assert lease_of(etcd, key) not in (first, 0, -1)
    assert m.lease is not None and m.lease.subnet == lease.subnet


async def test_own_lease_deleted_is_reacquired(etcd):
    seen = []

    async def on_lease(lease):
        seen.append(lease)

    async with manager(etcd.client_url, 1) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
        key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24"
        async with background(m.watch(lambda b: asyncio.sleep(0)), m.hold(on_lease)):
            await asyncio.sleep(0.3)
            etcd.delete(key)
            await until(lambda: seen, limit=5)
    assert seen[0].subnet == lease.subnet
    assert etcd.get(key) == peer_json(1)
    assert m.counters.reacquisitions == 1


async def test_twenty_agents_at_once_race_and_get_twenty_subnets(etcd):
    """The race is forced, not hoped for: every agent draws from the same seed, and each
    one's first listing waits at a barrier until all twenty have listed, so all twenty
    choose the same free subnet before any of them creates it. Exactly one create wins;
    the nineteen others lose it (a compare on the key's version in etcd), list again and
    retry until each holds a subnet of its own."""
    n = 20
    barrier = asyncio.Barrier(n)
    managers: list[LeaseManager] = []
    choices: list[ipaddress.IPv4Network] = []

    async def one(i):
        async with manager(etcd.client_url, i, seed=0) as m:
            managers.append(m)
            real_list = m.registry.list_subnets
            first = [True]

            async def list_subnets():
                snap = await real_list()
                if first[0]:
                    first[0] = False
                    await barrier.wait()  # nobody creates before everyone has listed
                return snap

            real_create = m.registry.create_subnet

            async def create_subnet(name, value, ttl):
                if len(choices) < n:  # the first round: every agent creates once
                    choices.append(ipaddress.IPv4Network(name.replace("-", "/")))
                return await real_create(name, value, ttl)

            m.registry.list_subnets = list_subnets
            m.registry.create_subnet = create_subnet
            return await asyncio.wait_for(m.acquire(), 60)

    leases = await asyncio.gather(*(one(i) for i in range(1, n + 1)))
    # The first round: all twenty went for one subnet, which one of them holds now.
    assert len(choices) == n and len(set(choices)) == 1, choices
    assert sum(lease.subnet == choices[0] for lease in leases) == 1
    # Every loser counted its lost create and still got a subnet: the race was resolved.
    lost = [m.counters.lost_races for m in managers]
    assert sum(1 for x in lost if x >= 1) == n - 1, lost
    assert all(m.counters.acquisitions == 1 for m in managers)
    assert len({lease.subnet for lease in leases}) == n
    stored = etcd.get_prefix(f"{PREFIX}/subnets/")
    assert len(stored) == n
    assert {json.loads(v)["PublicIP"] for v in stored.values()} == {
        f"192.168.100.{i}" for i in range(1, n + 1)
    }


async def test_exhaustion_is_a_clear_error_and_recovers(etcd, caplog):
    cfg = parse_config('{"Network":"10.9.0.0/28","SubnetLen":30,"Backend":{"Type":"host-gw"}}')
    # /28 in /30s: 4 subnets, SubnetMin skips the first, so 3 can be leased.
    for i, net in enumerate(("10.9.0.4", "10.9.0.8", "10.9.0.12"), start=10):
        etcd.put(f"{PREFIX}/subnets/{net}-30", peer_json(i))
    caplog.set_level(logging.ERROR)
    async with manager(etcd.client_url, 1, config=cfg) as m:
        task = asyncio.create_task(m.acquire())
        try:
            await until(lambda: "out of subnets" in caplog.text, limit=10)
            assert not task.done()
            etcd.delete(f"{PREFIX}/subnets/10.9.0.8-30")
            lease = await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
    assert lease.subnet == ipaddress.IPv4Network("10.9.0.8/30")
    assert caplog.text.count("out of subnets") == 1  # once per state, not once per retry


async def test_peer_watch_snapshot_then_events_in_batches(etcd):
    etcd.put(f"{PREFIX}/subnets/10.5.50.0-24", peer_json(50))
    batches: list[list[PeerEvent]] = []

    async def on_batch(b):
        batches.append(b)

    async with manager(etcd.client_url, 1) as m:
        await asyncio.wait_for(m.acquire(), 10)
        async with background(m.watch(on_batch)):
            await until(lambda: batches)
            assert [(e.kind, str(e.lease.subnet)) for e in batches[0]] == [
                ("added", "10.5.50.0/24")
            ]
            # One transaction with two puts arrives as one batch.
            async with Etcd3Client([etcd.client_url.removeprefix("http://")]) as other:
                await other.kv.txn([], [
                    other.kv.txn_op_put(f"{PREFIX}/subnets/10.5.51.0-24", peer_json(51)),
                    other.kv.txn_op_put(f"{PREFIX}/subnets/10.5.52.0-24", peer_json(52)),
                ], timeout=10)
            await until(lambda: len(batches) >= 2)
            assert sorted(str(e.lease.subnet) for e in batches[1]) == [
                "10.5.51.0/24", "10.5.52.0/24"
            ]
            etcd.delete(f"{PREFIX}/subnets/10.5.50.0-24")
            await until(lambda: len(batches) >= 3)
            assert [(e.kind, str(e.lease.subnet)) for e in batches[2]] == [
                ("removed", "10.5.50.0/24")
            ]
    assert {str(p.subnet) for p in m.peers()} == {"10.5.51.0/24", "10.5.52.0/24"}


async def test_listing_in_pages_is_one_revision_and_the_watch_resumes_after_it(etcd):
    """2,500 leases in pages of 1,000: each comes back once, all at the first page's
    revision; a put made between two pages is not in that snapshot but comes through
    the watch started at revision + 1."""
    n = 2500
    names = [f"10.{6 + i // 256}.{i % 256}.0-24" for i in range(n)]
    async with Etcd3Client([etcd.client_url.removeprefix("http://")]) as other:
        for start in range(0, n, 125):
            await other.kv.txn([], [
                other.kv.txn_op_put(f"{PREFIX}/subnets/{name}", peer_json(2))
                for name in names[start:start + 125]], timeout=10)
        reg = registry_for(etcd.client_url)
        assert reg.page_size == 1000
        calls = []
        # Sorts after every seeded key: a read at the newest revision would list it.
        late = f"{PREFIX}/subnets/10.99.0.0-24"
        real_call = reg._call

        async def call(what, fn, count=True):
            resp = await real_call(what, fn, count)
            if what == "list subnets":
                calls.append((len(resp.kvs), resp.more))
                if len(calls) == 1:  # between the first page and the second
                    await other.kv.put(late, peer_json(3), timeout=10)
            return resp

        reg._call = call
        try:
            snap = await reg.list_subnets()
            assert calls == [(1000, True), (1000, True), (500, False)]
            assert sorted(r.name for r in snap.records) == sorted(names)
            assert snap.revision < etcd.revision()  # the late put came after it
            assert max(r.mod_revision for r in snap.records) <= snap.revision
            stream = reg.watch_subnets(snap.revision + 1)
            async with contextlib.aclosing(stream):
                events = []
                async for batch in stream:
                    events += batch
                    if events:
                        break
            assert [(e.kind, e.name) for e in events] == [("put", "10.99.0.0-24")]
        finally:
            await reg.close()


async def test_watch_survives_an_etcd_restart(etcd):
    async with manager(etcd.client_url, 1) as m:
        await asyncio.wait_for(m.acquire(), 10)
        async with background(m.watch(lambda b: asyncio.sleep(0))):
            await asyncio.sleep(0.3)
            etcd.stop()
            await until(lambda: not m.etcd_reachable, limit=30)
            etcd.restart()
            etcd.put(f"{PREFIX}/subnets/10.5.60.0-24", peer_json(60))
            await until(lambda: any(str(p.subnet) == "10.5.60.0/24" for p in m.peers()),
                        limit=30)
    assert m.counters.watch_reconnects >= 1


async def test_no_event_lost_while_cut_off_from_etcd(etcd, tcp_proxy):
    host, port = etcd.client_url.removeprefix("http://").split(":")
    proxy = tcp_proxy(host, int(port))
    for n in (70, 71):
        etcd.put(f"{PREFIX}/subnets/10.5.{n}.0-24", peer_json(n))
    events: list[tuple[str, str]] = []

    async def on_batch(b):
        events.extend((e.kind, str(e.lease.subnet)) for e in b)

    async with manager(f"http://{proxy.address}", 1) as m:
        await asyncio.wait_for(m.acquire(), 10)
        async with background(m.watch(on_batch)):
            await until(lambda: len(events) == 2)
            proxy.cut()
            await until(lambda: not m.etcd_reachable, limit=30)
            # Another client changes the peers while we are cut off.
            etcd.delete(f"{PREFIX}/subnets/10.5.70.0-24")
            etcd.put(f"{PREFIX}/subnets/10.5.72.0-24", peer_json(72))
            etcd.put(f"{PREFIX}/subnets/10.5.73.0-24", peer_json(73))
            etcd.delete(f"{PREFIX}/subnets/10.5.73.0-24")
            proxy.restore()
            await until(lambda: {str(p.subnet) for p in m.peers()}
                        == {"10.5.71.0/24", "10.5.72.0/24"}, limit=30)
    # Every change made during the cut reached us, in order, from the resumed watch.
    assert events[2:] == [
        ("removed", "10.5.70.0/24"),
        ("added", "10.5.72.0/24"),
        ("added", "10.5.73.0/24"),
        ("removed", "10.5.73.0/24"),
    ]
    assert m.counters.relists == 1  # resumed from the last revision, no re-list


async def test_compaction_while_cut_off_relists_and_diffs(etcd, tcp_proxy):
    host, port = etcd.client_url.removeprefix("http://").split(":")
    proxy = tcp_proxy(host, int(port))
    etcd.put(f"{PREFIX}/subnets/10.5.80.0-24", peer_json(80))
    events: list[tuple[str, str]] = []

    async def on_batch(b):
        events.extend((e.kind, str(e.lease.subnet)) for e in b)

    async with manager(f"http://{proxy.address}", 1) as m:
        await asyncio.wait_for(m.acquire(), 10)
        async with background(m.watch(on_batch)):
            await until(lambda: events)
            proxy.cut()
            await until(lambda: not m.etcd_reachable, limit=30)
            etcd.delete(f"{PREFIX}/subnets/10.5.80.0-24")
            etcd.put(f"{PREFIX}/subnets/10.5.81.0-24", peer_json(81))
            etcd.put("/unrelated", "x")
            etcd.compact(etcd.revision())
            proxy.restore()
            await until(lambda: {str(p.subnet) for p in m.peers()} == {"10.5.81.0/24"},
                        limit=30)
    assert ("removed", "10.5.80.0/24") in events
    assert m.counters.relists == 2


async def test_invalid_config_waits_for_a_valid_one(etcd, caplog):
    caplog.set_level(logging.WARNING)
    etcd.put(f"{PREFIX}/config", '{"Network":"10.5.0.0/16","SubnetLen":31}')
    reg = registry_for(etcd.client_url)
    try:
        task = asyncio.create_task(wait_for_config(reg, f"{PREFIX}/config"))
        await until(lambda: "SubnetLen" in caplog.text, limit=10)
        assert not task.done()
        etcd.put(f"{PREFIX}/config", '{"Network":"10.6.0.0/16"}')
        cfg = await asyncio.wait_for(task, 10)
    finally:
        await reg.close()
    assert str(cfg.network) == "10.6.0.0/16" and cfg.backend_type == "udp"
    assert caplog.text.count("invalid network config") == 1


async def test_unreachable_etcd_is_logged_once_per_state(caplog):
    caplog.set_level(logging.WARNING)
    # Nothing listens on this loopback port.
    reg = registry_for("http://127.0.0.1:1")
    m = LeaseManager(reg, parse_config(json.dumps(CONFIG)), attrs(1), backoff_cap=0.2)
    task = asyncio.create_task(m.acquire())
    try:
        await asyncio.sleep(3)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reg.close()
    lines = [r for r in caplog.records if "acquiring a subnet lease" in r.getMessage()]
    assert len(lines) == 1
