"""Unit tests for agent.daemon as a whole: a real Daemon built over MemoryRegistry,
FakeNetlink and a stand-in for the iptables commands (its factories), run by its own
serve()/main(), from the config in the registry to routes in the fake kernel and /readyz."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import socket
from pathlib import Path

import pytest

from agent.daemon import Daemon, StartupError
from agent.etcd_registry import EtcdSetupError
from agent.lease_codec import decode_lease
from agent.options import EtcdSettings, Options
from agent.subnet_file import parse_subnet_env
from backends.iptables.plan import NAT
from backends.kernel.fake import FakeNetlink
from tests.support.daemon_rig import (
    CONFIG,
    ETH0,
    OWN,
    PUBLIC_IP,
    DaemonRig,
    no_iptables,
    peer_value,
)
from tests.unit.test_iptables_keeper import FakeIptables

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
PEER = NET("10.5.7.0/24")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_whole_daemon_from_config_to_routes_and_readyz(tmp_path: Path) -> None:
    port = free_port()
    rig = DaemonRig(tmp_path, healthz_port=port)
    d = rig.daemon
    main = rig.start(d.main)  # health server, systemd reporter, serve(), signal handling
    await rig.until(lambda: d.waiting_for, "waiting for a config")
    assert d.not_ready_reason() == (
        "no network config at /coreos.com/network/config yet; waiting for one")
    status, body = await rig.until(
        lambda: _probe(port, "/readyz"), "the health server answers")
    assert (status, body) == (503, "not ready: no network config at "
                                   "/coreos.com/network/config yet; waiting for one\n")

    # The config arrives: a lease on our subnet, subnet.env written, ready.
    await rig.reg.set_config(CONFIG)
    await rig.ready()
    assert d.manager is not None and d.manager.lease is not None
    assert d.manager.lease.subnet == OWN
    snap = await rig.reg.list_subnets()
    (own,) = snap.records
    assert own.name == "10.5.1.0-24" and own.lease_id != 0
    attrs = decode_lease(own.value)
    assert (attrs.public_ip, attrs.backend_type) == (PUBLIC_IP, "host-gw")
    assert parse_subnet_env(rig.subnet_file.read_text()) == {
        "FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.1.1/24",
        "FLANNEL_MTU": "1500", "FLANNEL_IPMASQ": "false"}
    assert await http_get(port, "/readyz") == (200, "ready\n")

    # A peer's lease: its host-gw route, via its PublicIP on eth0.
    await rig.reg.put("10.5.7.0-24", peer_value(7), ttl=600)
    await rig.until(lambda: PEER in rig.fake.table, "the peer's route")
    route = rig.fake.table[PEER]
    assert (route.gateway, route.oif) == (IP("192.168.100.7"), ETH0.index)
    assert d.not_ready_reason() is None
    status, metrics = await http_get(port, "/metrics")
    assert status == 200 and 'tweed_peers{backend="host-gw"} 1.0' in metrics

    # The peer goes: its route goes.
    await rig.reg.delete("10.5.7.0-24")
    await rig.until(lambda: PEER not in rig.fake.table, "the peer's route removed")
    assert await http_get(port, "/readyz") == (200, "ready\n")

    # SIGTERM: a clean stop, exit code 0; the lease stays in the registry.
    signal.raise_signal(signal.SIGTERM)
    assert await asyncio.wait_for(main, 5.0) == 0
    assert [r.name for r in (await rig.reg.list_subnets()).records] == ["10.5.1.0-24"]


async def _probe(port: int, path: str) -> tuple[int, str] | None:
    try:
        return await http_get(port, path)
    except OSError:
        return None


async def test_the_registry_factory_gets_the_etcd_flags(tmp_path: Path) -> None:
    rig = DaemonRig(tmp_path, etcd_endpoints="https://e1:2379,https://e2:2379",
                    etcd_prefix="/my/net", etcd_username="u", etcd_password="pw")
    try:
        await rig.serve_ready()
    finally:
        await rig.stop()
    assert rig.etcd_settings == [EtcdSettings(("https://e1:2379", "https://e2:2379"), "/my/net",
                                              username="u", password="pw")]


async def test_a_registry_that_cannot_be_set_up_is_a_startup_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(settings: EtcdSettings) -> DaemonRig:
        raise EtcdSetupError("--etcd-endpoints: 'ftp://x' is not http(s)://host:port")

    d = Daemon(Options(subnet_file=str(tmp_path / "subnet.env"), healthz_port=0),
               registry_factory=refuse,  # type: ignore[arg-type]
               netlink_factory=lambda: FakeNetlink([ETH0]), iptables_factory=no_iptables)
    with pytest.raises(StartupError, match="is not http"):
        await d.serve()
    caplog.set_level(logging.ERROR)
    assert await asyncio.wait_for(d.main(), 5.0) == 1
    assert "--etcd-endpoints: 'ftp://x' is not http(s)://host:port" in caplog.messages


async def test_ip_masq_runs_the_iptables_factory_s_commands_for_our_subnet(
    tmp_path: Path,
) -> None:
    fake_iptables = FakeIptables()
    made: list[FakeIptables] = []

    def factory() -> FakeIptables:
        made.append(fake_iptables)
        return fake_iptables

    rig = DaemonRig(tmp_path, iptables=factory, ip_masq=True, iptables_resync=1)
    try:
        await rig.serve_ready()
        iptables = rig.daemon.iptables
        assert iptables is not None
        await rig.until(iptables.ok, "iptables rules in place")
    finally:
        await rig.stop()
    assert made == [fake_iptables]
    masq = "\n".join(fake_iptables.rules(NAT, "FLANNEL-POSTRTG"))
    assert "10.5.1.0/24" in masq and "10.5.0.0/16" in masq
    env = parse_subnet_env(rig.subnet_file.read_text())
    assert env["FLANNEL_IPMASQ"] == "true"


async def test_readyz_reasons_follow_the_daemon_state(tmp_path: Path) -> None:
    one_subnet = json.loads(CONFIG)
    one_subnet.update(SubnetMin="10.5.1.0", SubnetMax="10.5.1.0")
    rig = DaemonRig(tmp_path)
    d = rig.daemon
    try:
        # An invalid config is waited out, and said why.
        await rig.reg.set_config(b'{"Network":"10.5.0.0/33"}')
        rig.start()
        await rig.until(lambda: "invalid network config" in (d.not_ready_reason() or ""),
                        "the invalid config reported")
        # A network with no free subnet: no lease.
        await rig.reg.put("10.5.1.0-24", peer_value(9), ttl=600)
        await rig.reg.set_config(json.dumps(one_subnet).encode())
        await rig.until(lambda: d.not_ready_reason() == "no subnet lease yet", "no lease")
        # The kernel refuses the route to a peer: not programmed.
        rig.fake.fail = lambda op, item: "EPERM" if op == "replace" else None
        await rig.reg.delete("10.5.1.0-24")
        await rig.reg.put("10.5.7.0-24", peer_value(7), ttl=600)
        await rig.until(lambda: d.not_ready_reason() == "backend not programmed",
                        "not programmed")
        rig.fake.fail = lambda op, item: None
        assert d.network is not None
        assert await d.network.kernel.sync() is True
        assert d.not_ready_reason() is None
    finally:
        await rig.stop()
    # The states serve() passes through in an instant, judged on what it left behind.
    m = d.manager
    assert m is not None and m.lease is not None
    lease = m.lease
    d.peers_listed = False
    assert d.not_ready_reason() == "peer leases not listed and programmed yet"
    d.peers_listed = True
    d.file_written = False
    assert d.not_ready_reason() == "subnet file not written"
    d.file_written = True
    # A new subnet whose subnet.env is not written yet.
    m.lease = type(lease)(NET("10.5.200.0/24"), "10.5.200.0-24", lease.attrs, 1,
                          lease.expires_at)
    assert "not yet rewritten" in (d.not_ready_reason() or "")
    m.lease = lease
    assert d.not_ready_reason() is None
    # Renewals failed until the TTL ran out.
    assert lease.expires_at is not None
    m.clock = lambda: lease.expires_at + 1  # type: ignore[operator]
    assert "expired" in (d.not_ready_reason() or "")

