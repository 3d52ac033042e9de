"""Dual-stack and IPv6-only leases against a real etcd (issue 14): what tweed writes is
flanneld's key and JSON byte for byte, what flanneld writes is decoded, and IPv6-only keys
(tweed's own form) are leased, renewed, watched and kept apart."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random

import pytest

from agent.config import parse_config
from agent.etcd_registry import EtcdRegistry, EtcdSettings
from agent.lease import NO_IPV4, PeerEvent
from agent.lease_codec import NO_PUBLIC_IP, LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from tests.support.aio import background, until

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
IP6 = ipaddress.IPv6Address
DUAL = parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True,
                                "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}}))
V6_ONLY = parse_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                   "IPv6Network": "fd00:5::/48",
                                   "Backend": {"Type": "host-gw"}}))
BOTH = frozenset({4, 6})

#: A flanneld v0.20.2 vxlan host's dual-stack lease as its Go struct (subnet.LeaseAttrs)
#: marshals it: PublicIP, PublicIPv6, then the omitempty BackendType, BackendData and
#: BackendV6Data (the flannel-v6.1 device's VtepMAC).
FLANNELD_VALUE = (
    '{"PublicIP":"192.168.100.9","PublicIPv6":"fd00:100::9","BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:09"},'
    '"BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:69"}}')
FLANNELD_KEY = "10.5.9.0-24&fd00:5:0:9::-64"


def vxlan_attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(ipaddress.IPv4Address(f"192.168.100.{n}"), IP6(f"fd00:100::{n}"),
                      "vxlan", {"VNI": 1, "VtepMAC": f"9a:1b:2c:3d:4e:{n:02x}"},
                      {"VNI": 1, "VtepMAC": f"9a:1b:2c:3d:4e:{0x60 + n:02x}"})


@contextlib.asynccontextmanager
async def manager(url: str, attrs: LeaseAttrs, config=DUAL, families=BOTH, **kw):
    reg = EtcdRegistry(EtcdSettings((url,), PREFIX))
    m = LeaseManager(reg, config, attrs, families=families, rng=random.Random(7),
                     backoff_cap=0.5, **kw)
    try:
        yield m
    finally:
        await reg.close()


async def test_dual_stack_lease_is_flanneld_key_and_json_byte_for_byte(etcd):
    async with manager(etcd.client_url, vxlan_attrs(1)) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
    assert lease.ipv6_subnet is not None and lease.has_ipv4
    key = (f"{PREFIX}/subnets/{lease.subnet.network_address}-24"
           f"&{lease.ipv6_subnet.network_address}-64")
    stored = etcd.get_prefix(f"{PREFIX}/subnets/")
    assert list(stored) == [key]
    # What flanneld's json.Marshal(&LeaseAttrs{...}) gives for the same values.
    assert stored[key] == (
        '{"PublicIP":"192.168.100.1","PublicIPv6":"fd00:100::1","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:01"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:61"}}')
    assert V6("fd00:5::/48").supernet_of(lease.ipv6_subnet)
    assert lease.ipv6_subnet != V6("fd00:5::/64")  # IPv6SubnetMin skips the first


async def test_flanneld_dual_stack_peer_is_decoded_from_listing_and_watch(etcd):
    etcd.put(f"{PREFIX}/subnets/{FLANNELD_KEY}", FLANNELD_VALUE)
    batches: list[list[PeerEvent]] = []

    async def on_batch(b: list[PeerEvent]) -> None:
        batches.append(b)

    async with manager(etcd.client_url, vxlan_attrs(1)) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
        # Not the flanneld host's subnets, in either family.
        assert lease.subnet != V4("10.5.9.0/24")
        assert lease.ipv6_subnet != V6("fd00:5:0:9::/64")
        async with background(m.watch(on_batch)):
            await until(lambda: batches)
            [ev] = batches[0]
            peer = ev.lease
            assert (ev.kind, peer.subnet, peer.ipv6_subnet) == (
                "added", V4("10.5.9.0/24"), V6("fd00:5:0:9::/64"))
            assert peer.attrs == LeaseAttrs(
                ipaddress.IPv4Address("192.168.100.9"), IP6("fd00:100::9"), "vxlan",
                {"VNI": 1, "VtepMAC": "9a:1b:2c:3d:4e:09"},
                {"VNI": 1, "VtepMAC": "9a:1b:2c:3d:4e:69"})
            # A second flanneld host joins, seen through the watch.
            etcd.put(f"{PREFIX}/subnets/10.5.10.0-24&fd00:5:0:a::-64",
                     FLANNELD_VALUE.replace(".9\"", ".10\"").replace("::9", "::a"))
            await until(lambda: len(batches) >= 2)
            [ev2] = batches[1]
            assert (ev2.lease.subnet, ev2.lease.ipv6_subnet) == (
                V4("10.5.10.0/24"), V6("fd00:5:0:a::/64"))
            assert ev2.lease.attrs.public_ipv6 == IP6("fd00:100::a")


async def test_dual_stack_restart_reuses_both_parts_and_subnet_env_choice(etcd):
    async with manager(etcd.client_url, vxlan_attrs(1)) as m:
        first = await asyncio.wait_for(m.acquire(), 10)
    async with manager(etcd.client_url, vxlan_attrs(1)) as m2:
        second = await asyncio.wait_for(m2.acquire(), 10)
    assert (second.name, second.subnet, second.ipv6_subnet) == (
        first.name, first.subnet, first.ipv6_subnet)
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 1
    # Its key gone: subnet.env's previous subnets (both families) are taken again.
    etcd.delete(f"{PREFIX}/subnets/{first.name}")
    async with manager(etcd.client_url, vxlan_attrs(1), previous=first.subnet,
                       previous6=first.ipv6_subnet) as m3:
        m3.rng = random.Random(99)  # another seed: a random pick would differ
        third = await asyncio.wait_for(m3.acquire(), 10)
    assert (third.subnet, third.ipv6_subnet) == (first.subnet, first.ipv6_subnet)


async def test_ipv6_only_leases_are_keyed_by_the_ipv6_subnet_and_kept_apart(etcd):
    """Three IPv6-only hosts: distinct subnets under `<v6>-<len>` keys with PublicIP
    0.0.0.0; each sees the others as peers, its own lease found again by PublicIPv6."""
    hosts = [LeaseAttrs(NO_PUBLIC_IP, IP6(f"fd00:100::{n}"), "host-gw") for n in (1, 2, 3)]
    leases = []
    for a in hosts:
        async with manager(etcd.client_url, a, V6_ONLY, frozenset({6})) as m:
            leases.append(await asyncio.wait_for(m.acquire(), 10))
    assert len({lease.ipv6_subnet for lease in leases}) == 3
    stored = etcd.get_prefix(f"{PREFIX}/subnets/")
    assert sorted(stored) == sorted(
        f"{PREFIX}/subnets/{lease.ipv6_subnet.network_address}-64" for lease in leases)
    assert all(lease.subnet == NO_IPV4 and not lease.has_ipv4 for lease in leases)
    assert stored[f"{PREFIX}/subnets/{leases[0].name}"] == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:100::1","BackendType":"host-gw"}')
    batches: list[list[PeerEvent]] = []

    async def on_batch(b: list[PeerEvent]) -> None:
        batches.append(b)

    async with manager(etcd.client_url, hosts[0], V6_ONLY, frozenset({6})) as m:
        again = await asyncio.wait_for(m.acquire(), 10)
        assert again.name == leases[0].name and m.counters.acquisitions == 1
        async with background(m.watch(on_batch)):
            await until(lambda: batches)
            assert sorted(str(e.lease.ipv6_subnet) for e in batches[0]) == sorted(
                str(lease.ipv6_subnet) for lease in leases[1:])
            assert all(e.lease.subnet == NO_IPV4 for e in batches[0])


async def test_ipv6_only_key_in_an_ipv4_cluster_is_one_line_counted_and_skipped(
    etcd, caplog
):
    caplog.set_level(logging.WARNING)
    etcd.put(f"{PREFIX}/subnets/fd00:5:0:4::-64", encode_lease(
        LeaseAttrs(NO_PUBLIC_IP, IP6("fd00:100::4"), "host-gw")).decode())
    v4 = parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}))
    batches: list[list[PeerEvent]] = []

    async def on_batch(b: list[PeerEvent]) -> None:
        batches.append(b)

    async with manager(etcd.client_url, vxlan_attrs(1), v4, frozenset({4})) as m:
        lease = await asyncio.wait_for(m.acquire(), 10)
        assert lease.ipv6_subnet is None
        async with background(m.watch(on_batch)):
            await until(lambda: m.counters.outside_network >= 1)
        assert not [e for b in batches for e in b]
    lines = [r.getMessage() for r in caplog.records if "fd00:5:0:4::-64" in r.getMessage()]
    assert lines == ["skipping subnets/fd00:5:0:4::-64: the key has no IPv4 part, and this"
                     " host leases only IPv4"]
