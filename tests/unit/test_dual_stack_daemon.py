"""Dual stack and IPv6-only through the real daemon (issue 14), over a MemoryRegistry and a
FakeNetlink (tests/support/daemon_rig.py), and the external interface's IPv6 choice.

The families a backend carries are its capability (`families`, backends/base.py): every
backend carries IPv4 only today, so a dual-stack config runs on IPv4 and an IPv6-only one
waits, naming the backend. A fake backend whose `families` is {4, 6} (host-gw's network,
flipped) shows what flipping the attribute does: both subnets leased under flanneld's key,
both in subnet.env, the IPv6 subnet handed to setup() and the peers' IPv6 parts to apply().
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

import backends
from agent.lease import PeerEvent
from agent.lease_codec import LeaseAttrs, decode_lease, encode_lease, parse_subnet_key
from agent.subnet_file import parse_subnet_env
from backends.base import DEFAULT_FAMILIES, carried_families
from backends.external_iface import InterfaceError, choose_interface
from backends.hostgw import HostGwBackend, HostGwNetwork
from backends.kernel.types import Link
from tests.support.daemon_rig import DaemonRig

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
IP6 = ipaddress.IPv6Address
ETH0_V6 = [IP6("fe80::1"), IP6("fd00:100::1"), IP6("fd00:100::99")]
DUAL = json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/48",
                   "Backend": {"Type": "host-gw"}}).encode()
V6_ONLY = json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:5::/48",
                      "Backend": {"Type": "host-gw"}}).encode()


class DualNetwork(HostGwNetwork):
    """host-gw's network, recording what the daemon hands it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.setups: list[object] = []
        self.batches: list[list[PeerEvent]] = []

    async def setup(self, lease):  # type: ignore[no-untyped-def]
        self.setups.append(lease)
        await super().setup(lease)

    async def apply(self, events: list[PeerEvent]) -> None:
        self.batches.append(events)
        # Only the IPv4 parts go to the kernel: this fake carries IPv6 in name only.
        await super().apply([e for e in events if e.lease.has_ipv4])


class DualBackend(HostGwBackend):
    """A backend that says it carries both families (the one attribute a backend flips)."""

    families = frozenset({4, 6})
    built: list[DualNetwork] = []

    async def register_network(self, config):  # type: ignore[no-untyped-def]
        net = DualNetwork(self.ctx.netlink, self.ctx.ext, config, self.ctx.resync)
        DualBackend.built.append(net)
        return net


@pytest.fixture
def dual_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[DualBackend]]:
    """host-gw's Backend.Type built as DualBackend."""
    monkeypatch.setitem(backends.REGISTRY, "host-gw",
                        "tests.unit.test_dual_stack_daemon:DualBackend")
    DualBackend.built = []
    yield DualBackend


def _rig(tmp_path: Path, addrs6: Mapping[int, Sequence[IP6]] | None = None,
         **opts: object) -> DaemonRig:
    rig = DaemonRig(tmp_path, **opts)
    reads: list[int] = []

    async def read() -> Mapping[int, Sequence[IP6]]:
        reads.append(1)
        return addrs6 if addrs6 is not None else {2: ETH0_V6}

    rig.daemon._ipv6_addresses = read
    rig.v6_reads = reads  # type: ignore[attr-defined]
    return rig


async def test_capability_defaults_to_ipv4_and_every_backend_carries_ipv4_only() -> None:
    assert DEFAULT_FAMILIES == {4}
    for btype in backends.REGISTRY:
        assert carried_families(backends.backend_class(btype)) == {4}, btype
    assert carried_families(DualBackend) == {4, 6}


async def test_dual_stack_config_on_an_ipv4_backend_runs_on_ipv4_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = _rig(tmp_path)
    try:
        await rig.serve_ready(DUAL)
        snap = await rig.reg.list_subnets()
        [rec] = snap.records
        assert rec.name == "10.5.1.0-24"  # no IPv6 part
        assert rec.value == (b'{"PublicIP":"192.168.100.1","PublicIPv6":null,'
                             b'"BackendType":"host-gw"}')
        env = rig.subnet_file.read_text()
        assert "IPV6" not in env
        assert rig.v6_reads == []  # the host's IPv6 addresses are not even read
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings.count("EnableIPv6: the host-gw backend does not carry IPv6 yet; only"
                              " the IPv4 Network 10.5.0.0/16 is leased, the lease has no"
                              " IPv6 part and subnet.env no FLANNEL_IPV6_* lines") == 1
    finally:
        await rig.stop()


async def test_ipv6_only_config_waits_naming_the_backend(tmp_path: Path) -> None:
    rig = _rig(tmp_path, previous=None)
    try:
        await rig.reg.set_config(V6_ONLY)
        rig.start()
        await rig.until(lambda: rig.daemon.waiting_for is not None
                        and "IPv6" in rig.daemon.waiting_for, "waiting for IPv6")
        assert rig.daemon.not_ready_reason() == (
            "invalid network config at /coreos.com/network/config: EnableIPv4 is false (an"
            " IPv6-only network) and the host-gw backend does not carry IPv6 yet; set"
            " EnableIPv4 to true and an IPv4 Network to run on IPv4; waiting for a fix")
        assert (await rig.reg.list_subnets()).records == []
    finally:
        await rig.stop()


async def test_dual_stack_backend_leases_both_writes_both_and_gets_both(
    tmp_path: Path, dual_backend: type[DualBackend]
) -> None:
    rig = _rig(tmp_path)
    # A flanneld dual-stack host, as its Go struct writes its lease, and a v4-only host.
    await rig.reg.put("10.5.9.0-24&fd00:5:0:9::-64", (
        b'{"PublicIP":"192.168.100.9","PublicIPv6":"fd00:100::9","BackendType":"host-gw"}'),
        ttl=600)
    await rig.reg.put("10.5.8.0-24", encode_lease(
        LeaseAttrs(ipaddress.IPv4Address("192.168.100.8"), None, "host-gw")), ttl=600)
    try:
        await rig.serve_ready(DUAL)
        [net] = dual_backend.built
        lease = rig.daemon.manager.lease
        assert lease is not None and lease.subnet == V4("10.5.1.0/24")
        assert lease.ipv6_subnet is not None and lease.ipv6_subnet.prefixlen == 64
        # Our key and value, byte for byte flanneld's dual-stack form.
        ours = {r.name: r for r in (await rig.reg.list_subnets()).records}[lease.name]
        assert lease.name == f"10.5.1.0-24&{lease.ipv6_subnet.network_address}-64"
        assert parse_subnet_key(lease.name).ipv6 == lease.ipv6_subnet
        assert ours.value == (b'{"PublicIP":"192.168.100.1","PublicIPv6":"fd00:100::1",'
                              b'"BackendType":"host-gw"}')
        # subnet.env: both families, in flanneld's order.
        env = rig.subnet_file.read_text()
        gw6 = f"{lease.ipv6_subnet.network_address + 1}/64"
        assert env == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\n"
                       "FLANNEL_IPV6_NETWORK=fd00:5::/48\n"
                       f"FLANNEL_IPV6_SUBNET={gw6}\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")
        # The backend's setup got the IPv6 subnet; its peers, their IPv6 parts.
        assert net.setups[-1].ipv6_subnet == lease.ipv6_subnet
        peers = {e.lease.subnet: e.lease for b in net.batches for e in b}
        assert peers[V4("10.5.9.0/24")].ipv6_subnet == V6("fd00:5:0:9::/64")
        assert peers[V4("10.5.9.0/24")].attrs.public_ipv6 == IP6("fd00:100::9")
        assert peers[V4("10.5.8.0/24")].ipv6_subnet is None  # a v4-only peer is fine
        # The interface's first global IPv6 address, the link-local one skipped.
        assert rig.daemon.manager.attrs.public_ipv6 == IP6("fd00:100::1")
        # /metrics: the lease's IPv6 part.
        from agent.metrics import render
        text = render(rig.daemon).decode()
        assert (f'ipv6_subnet="{lease.ipv6_subnet}",public_ip="192.168.100.1",'
                f'public_ipv6="fd00:100::1"') in text
    finally:
        await rig.stop()


async def test_dual_stack_restart_keeps_both_subnets_from_the_lease_and_subnet_env(
    tmp_path: Path, dual_backend: type[DualBackend]
) -> None:
    rig = _rig(tmp_path)
    try:
        await rig.serve_ready(DUAL)
        first = rig.daemon.manager.lease
    finally:
        await rig.stop()
    # The same host again (its lease still in etcd): the same key, reused.
    rig2 = _rig(tmp_path, previous=None)  # previous=None: subnet.env left as written
    rig2.reg = rig.reg
    rig2.daemon._registry_factory = lambda settings: rig.reg
    try:
        rig2.start()
        await rig2.ready()
        again = rig2.daemon.manager.lease
        assert (again.name, again.subnet, again.ipv6_subnet) == (
            first.name, first.subnet, first.ipv6_subnet)
    finally:
        await rig2.stop()
    # Its lease gone (expired), a fresh etcd: subnet.env's two subnets are taken again.
    env = parse_subnet_env((tmp_path / "subnet.env").read_text())
    rig3 = _rig(tmp_path, previous=None)
    try:
        await rig3.serve_ready(DUAL)
        third = rig3.daemon.manager.lease
        assert third.subnet == first.subnet and third.ipv6_subnet == first.ipv6_subnet
        assert env["FLANNEL_IPV6_SUBNET"] == f"{first.ipv6_subnet.network_address + 1}/64"
    finally:
        await rig3.stop()


async def test_public_ipv6_flag_wins_for_what_is_advertised(
    tmp_path: Path, dual_backend: type[DualBackend]
) -> None:
    rig = _rig(tmp_path, public_ipv6="fd00:200::7")
    try:
        await rig.serve_ready(DUAL)
        [rec] = (await rig.reg.list_subnets()).records
        assert decode_lease(rec.value).public_ipv6 == IP6("fd00:200::7")
    finally:
        await rig.stop()


async def test_dual_stack_without_an_ipv6_address_is_one_startup_error(
    tmp_path: Path, dual_backend: type[DualBackend], caplog: pytest.LogCaptureFixture
) -> None:
    rig = _rig(tmp_path, addrs6={2: [IP6("fe80::1")]})
    await rig.reg.set_config(DUAL)
    code = await rig.daemon.main()
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["interface eth0 has no global IPv6 address to advertise for the IPv6"
                      " subnet: give it one, or set --public-ipv6"]
    assert (await rig.reg.list_subnets()).records == []


async def test_peer_with_malformed_ipv6_part_is_one_line_counted_and_skipped(
    tmp_path: Path, dual_backend: type[DualBackend], caplog: pytest.LogCaptureFixture
) -> None:
    rig = _rig(tmp_path)
    value = encode_lease(LeaseAttrs(ipaddress.IPv4Address("192.168.100.9"), IP6("fd00::9"),
                                    "host-gw"))
    await rig.reg.put("10.5.9.0-24&fd00:5:0:9::1-64", value)  # host bits in the IPv6 part
    await rig.reg.put("10.5.7.0-24&fd00:6:0:7::-64", value)  # outside the IPv6Network
    try:
        await rig.serve_ready(DUAL)
        [net] = dual_backend.built
        assert not [e for b in net.batches for e in b]
        c = rig.daemon.manager.counters
        # Once each: the watch's first listing is the acquire's, decoded once.
        assert (c.bad_keys, c.outside_network) == (1, 1)
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and r.getMessage().startswith("skipping subnets/")]
        assert lines == [
            "skipping subnets/10.5.9.0-24&fd00:5:0:9::1-64: subnet key"
            " '10.5.9.0-24&fd00:5:0:9::1-64': fd00:5:0:9::1/64 has host bits set",
            "skipping subnets/10.5.7.0-24&fd00:6:0:7::-64: IPv6 subnet fd00:6:0:7::/64 is"
            " outside the IPv6Network fd00:5::/48",
        ]
    finally:
        await rig.stop()


# -- the external interface's IPv6 -----------------------------------------------------------

def _link(name: str, index: int, *addrs: str) -> Link:
    return Link(name, index, 1500, True, tuple(ipaddress.IPv4Interface(a) for a in addrs))


LINKS = [_link("eth0", 2, "192.168.100.1/24"), _link("eth1", 3, "10.0.0.5/24")]
ADDRS6 = {2: [IP6("fe80::1"), IP6("fd00:100::1")], 3: [IP6("fd00:300::5"), IP6("2001:db8::5")]}


def test_ipv6_is_the_interfaces_first_global_address() -> None:
    ext = choose_interface(LINKS, default_oif=2, ipv6=True, addresses6=ADDRS6)
    assert (ext.name, ext.iface_addr6, ext.public_ipv6) == (
        "eth0", IP6("fd00:100::1"), IP6("fd00:100::1"))


def test_iface_given_an_ipv6_address_chooses_that_interface_and_address() -> None:
    ext = choose_interface(LINKS, iface=["2001:db8::5"], default_oif=2, ipv6=True,
                           addresses6=ADDRS6)
    assert (ext.name, ext.iface_addr, ext.iface_addr6) == (
        "eth1", ipaddress.IPv4Address("10.0.0.5"), IP6("2001:db8::5"))


def test_public_ipv6_wins_for_what_is_advertised() -> None:
    ext = choose_interface(LINKS, default_oif=2, ipv6=True, addresses6=ADDRS6,
                           public_ipv6="fd00:999::1")
    assert (ext.iface_addr6, ext.public_ipv6) == (IP6("fd00:100::1"), IP6("fd00:999::1"))
    # Even on an interface with no global IPv6 address of its own.
    ext = choose_interface(LINKS, default_oif=2, ipv6=True, addresses6={2: [IP6("fe80::1")]},
                           public_ipv6="fd00:999::1")
    assert (ext.iface_addr6, ext.public_ipv6) == (None, IP6("fd00:999::1"))


def test_without_ipv6_nothing_ipv6_is_chosen() -> None:
    ext = choose_interface(LINKS, iface=["2001:db8::5"], ipv6=False, addresses6=ADDRS6,
                           public_ipv6="fd00:999::1")
    assert ext.name == "eth1" and ext.iface_addr6 is None and ext.public_ipv6 is None


def test_no_global_ipv6_address_is_one_error_naming_the_flag() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS, default_oif=2, ipv6=True, addresses6={2: [IP6("fe80::1")]})
    assert str(exc.value) == ("interface eth0 has no global IPv6 address to advertise for"
                              " the IPv6 subnet: give it one, or set --public-ipv6")


def test_iface_ipv6_address_nobody_has() -> None:
    with pytest.raises(InterfaceError, match="--iface fd00::77: no such interface or address"):
        choose_interface(LINKS, iface=["fd00::77"], ipv6=True, addresses6=ADDRS6)


async def test_ip_masq_in_dual_stack_keeps_iptables_and_ip6tables_rules(
    tmp_path: Path, dual_backend: type[DualBackend]
) -> None:
    from tests.unit.test_iptables_keeper import NAT, FakeIptables

    ipt4, ipt6 = FakeIptables(), FakeIptables(family=6)
    rig = _rig(tmp_path, iptables=lambda: ipt4, ip_masq=True, iptables_resync=1)
    rig.daemon._iptables6_factory = lambda: ipt6
    try:
        await rig.serve_ready(DUAL)
        keeper = rig.daemon.iptables
        assert keeper is not None and set(keeper.families) == {4, 6}
        await rig.until(keeper.ok, "both families' rules in place")
        lease = rig.daemon.manager.lease
    finally:
        await rig.stop()
    masq4 = "\n".join(ipt4.rules(NAT, "FLANNEL-POSTRTG"))
    masq6 = "\n".join(ipt6.rules(NAT, "FLANNEL-POSTRTG"))
    assert "10.5.1.0/24" in masq4 and "fd00:5::/48" not in masq4
    assert str(lease.ipv6_subnet) in masq6 and "fd00:5::/48" in masq6
    assert "10.5." not in masq6
    assert parse_subnet_env(rig.subnet_file.read_text())["FLANNEL_IPMASQ"] == "true"


V6_HOST_ETH0 = Link("eth0", 2, 1500, True, ())  # no IPv4 address at all


async def test_ipv6_only_host_with_an_ipv6_only_config_waits_naming_the_backend(
    tmp_path: Path,
) -> None:
    """No IPv4 on the interface (and so no IPv4 default route in practice): the interface
    step does not stop the agent before it has read the config; an IPv6-only config then
    waits like any other, the reason naming the backend."""
    rig = _rig(tmp_path, previous=None, iface=["eth0"])
    rig.fake._links = [V6_HOST_ETH0]
    try:
        await rig.reg.set_config(V6_ONLY)
        rig.start()
        await rig.until(lambda: "does not carry IPv6" in (rig.daemon.waiting_for or ""),
                        "waiting for a backend that carries IPv6")
        assert rig.daemon.manager is None
    finally:
        await rig.stop()


async def test_ipv6_only_host_with_an_ipv4_config_is_one_startup_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _rig(tmp_path, previous=None, iface=["eth0"])
    rig.fake._links = [V6_HOST_ETH0]
    await rig.reg.set_config(DUAL)
    assert await rig.daemon.main() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["no usable interface: --iface eth0: interface eth0 has no IPv4 address"]
    assert (await rig.reg.list_subnets()).records == []
