"""Unit tests for agent.metrics: a daemon driven through MemoryRegistry and FakeNetlink is
scraped, and the values must follow what the fakes did; names follow Prometheus'
conventions and every metric is documented in docs/metrics.md."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import platform
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.cli import Options
from agent.config import parse_config
from agent.daemon import Daemon
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.lease_manager import LeaseManager
from agent.metrics import iptables_families, render, udp_families
from agent.registry import MemoryRegistry, RegistryUnavailable
from backends.external_iface import ExternalInterface
from backends.hostgw import HostGwNetwork
from backends.kernel.fake import FakeNetlink

IP = ipaddress.IPv4Address
CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
EXT = ExternalInterface("eth0", 2, 1500, IP("192.168.100.1"), IP("192.168.100.1"))
OWN = ipaddress.IPv4Network("10.5.1.0/24")
DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
TIMEOUT = 5.0


def parse(text: str) -> dict[str, float]:
    """Exposition text as {'name{a="x",b="y"}': value} (labels sorted)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(d: object) -> dict[str, float]:
    return parse(render(d).decode())


async def until(pred: Callable[[], object], what: str) -> None:
    end = time.monotonic() + TIMEOUT
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {TIMEOUT} s")
        await asyncio.sleep(0.01)


class Rig:
    """A Daemon wired to a MemoryRegistry and a host-gw network over FakeNetlink."""

    def __init__(self, tmp: Path) -> None:
        self.reg = MemoryRegistry()
        self.fake = FakeNetlink()
        self.d = Daemon(Options(subnet_file=str(tmp / "subnet.env")))
        self.network = HostGwNetwork(self.fake, EXT, CONFIG, resync=3600.0)  # type: ignore[arg-type]
        self.d.registry = self.reg  # type: ignore[assignment]
        self.d.config = CONFIG
        self.d.network = self.network
        # Our subnet is fixed so that the peers' subnets below never collide with it.
        self.d.manager = LeaseManager(self.reg, CONFIG, self.network.lease_attrs, ttl=600,
                                      previous=OWN)
        self.watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        m = self.d.manager
        assert m is not None
        lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
        self.d._write_subnet_file(lease)
        await self.network.setup(lease)
        self.watch = asyncio.create_task(m.watch(self.d._on_batch, self.d._on_listed))
        await until(lambda: self.d.peers_listed, "first listing")

    async def stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        await r.stop()


def peer_value(n: int) -> bytes:
    return encode_lease(LeaseAttrs(IP(f"192.168.100.{n}"), None, "host-gw", None))


async def test_scrape_before_anything_says_not_ready_and_has_build_info(rig: Rig) -> None:
    rig.d.config = None
    m = scrape(rig.d)
    assert m[f'tweed_build_info{{python="{platform.python_version()}",'
             f'version="{__version__}"}}'] == 1
    assert m["tweed_ready"] == 0
    # The process collector is there too (CPU, memory, file descriptors).
    assert m["process_resident_memory_bytes"] > 0


async def test_lease_and_etcd_series_follow_the_registry(rig: Rig) -> None:
    before = time.time()
    await rig.start()
    m = scrape(rig.d)
    lease = rig.d.manager.lease  # type: ignore[union-attr]
    assert lease is not None
    assert m["tweed_ready"] == 1
    assert m["tweed_backend_programmed"] == 1
    assert m[f'tweed_lease_info{{backend="host-gw",public_ip="192.168.100.1",'
             f'reservation="false",subnet="{lease.subnet}"}}'] == 1
    expiry = m["tweed_lease_expiry_timestamp_seconds"]
    assert before + 600 - 1 <= expiry <= time.time() + 600 + 1
    assert m['tweed_lease_acquisitions_total{result="ok"}'] == 1
    assert m['tweed_lease_acquisitions_total{result="etcd_error"}'] == 0
    assert m["tweed_etcd_reachable"] == 1
    assert m['tweed_etcd_requests_total{operation="create_subnet",result="ok"}'] == 1
    lists = m['tweed_etcd_requests_total{operation="list_subnets",result="ok"}']
    assert lists == 2  # one to choose a subnet, one to start the watch
    assert m["tweed_watch_relists_total"] == 1
    assert m['tweed_peers{backend="host-gw"}'] == 0  # a series even with no peers

    # etcd goes away: a request fails and is counted as such.
    rig.reg.available = False
    with pytest.raises(RegistryUnavailable):
        await rig.reg.get_config()
    await until(lambda: not rig.d.manager.etcd_reachable, "watch notices")  # type: ignore[union-attr]
    m = scrape(rig.d)
    assert m['tweed_etcd_requests_total{operation="get_config",result="error"}'] == 1
    assert m["tweed_etcd_reachable"] == 0
    assert m["tweed_watch_reconnects_total"] >= 1
    # The kernel keeps what it had: still ready while the lease has not run out.
    assert m["tweed_ready"] == 1


async def test_peer_events_count_kernel_operations_and_the_event_to_kernel_delay(
    rig: Rig,
) -> None:
    await rig.start()
    m0 = scrape(rig.d)
    assert m0["tweed_event_to_kernel_seconds_count"] == 0
    await rig.reg.put("10.5.7.0-24", peer_value(7), ttl=600)
    peer = ipaddress.IPv4Network("10.5.7.0/24")
    await until(lambda: peer in rig.fake.table, "route to the peer")
    m = scrape(rig.d)
    assert m['tweed_watch_events_total{type="put"}'] == 1
    assert m['tweed_peers{backend="host-gw"}'] == 1
    assert m['tweed_kernel_operations_total{kind="route",op="replace",result="ok"}'] == 1
    assert m['tweed_kernel_operations_total{kind="route",op="delete",result="ok"}'] == 0
    assert m["tweed_event_to_kernel_seconds_count"] == 1
    assert 0 <= m["tweed_event_to_kernel_seconds_sum"] < TIMEOUT
    assert m['tweed_event_to_kernel_seconds_bucket{le="+Inf"}'] == 1

    await rig.reg.delete("10.5.7.0-24")
    await until(lambda: peer not in rig.fake.table, "route removed")
    m = scrape(rig.d)
    assert m['tweed_watch_events_total{type="delete"}'] == 1
    assert m['tweed_peers{backend="host-gw"}'] == 0
    assert m['tweed_kernel_operations_total{kind="route",op="delete",result="ok"}'] == 1
    assert m["tweed_event_to_kernel_seconds_count"] == 2


async def test_a_refused_change_is_an_error_and_its_delay_waits_for_the_repair(rig: Rig) -> None:
    await rig.start()
    rig.fake.fail = lambda op, item: "EPERM" if op == "replace" else None
    await rig.reg.put("10.5.8.0-24", peer_value(8), ttl=600)
    key = 'tweed_kernel_operations_total{kind="route",op="replace",result="error"}'
    await until(lambda: scrape(rig.d)[key] == 1, "refused replace counted")
    m = scrape(rig.d)
    assert m["tweed_backend_programmed"] == 0
    assert m["tweed_ready"] == 0
    assert m["tweed_event_to_kernel_seconds_count"] == 0  # not programmed: not observed
    await asyncio.sleep(0.3)
    rig.fake.fail = lambda op, item: None
    assert await rig.network.kernel.sync() is True  # what the periodic resync does
    m = scrape(rig.d)
    assert m['tweed_kernel_operations_total{kind="route",op="replace",result="ok"}'] == 1
    assert m["tweed_event_to_kernel_seconds_count"] == 1
    # The delay runs until the kernel was really programmed, not until the first try.
    assert m["tweed_event_to_kernel_seconds_sum"] >= 0.3
    assert m['tweed_event_to_kernel_seconds_bucket{le="0.25"}'] == 0
    assert m["tweed_ready"] == 1


async def test_periodic_resyncs_are_counted_by_result(rig: Rig) -> None:
    await rig.start()
    rig.network.kernel.resync = 0.02
    task = asyncio.create_task(rig.network.run())
    try:
        await until(lambda: rig.network.kernel.resyncs["clean"] >= 2, "clean resyncs")
        # A route deleted behind our back is put back by the resync: a repair.
        await rig.reg.put("10.5.9.0-24", peer_value(9), ttl=600)
        peer = ipaddress.IPv4Network("10.5.9.0/24")
        await until(lambda: peer in rig.fake.table, "route")
        del rig.fake.table[peer]
        await until(lambda: peer in rig.fake.table, "route repaired")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    m = scrape(rig.d)
    assert m['tweed_kernel_resyncs_total{result="repaired"}'] == 1
    assert m['tweed_kernel_resyncs_total{result="clean"}'] >= 2
    assert m['tweed_kernel_resyncs_total{result="failed"}'] == 0


async def test_renewals_by_result_and_a_lost_lease(rig: Rig) -> None:
    await rig.start()
    m_ = rig.d.manager
    assert m_ is not None and m_.lease is not None
    renewed = await m_._renew(m_.lease)
    assert renewed is not None
    m_.lease = renewed
    assert scrape(rig.d)['tweed_lease_renewals_total{result="ok"}'] == 1
    # Another client deletes our key: the renewal finds it gone.
    await rig.reg.delete(renewed.name)
    assert await m_._renew(renewed) is None
    m = scrape(rig.d)
    assert m['tweed_lease_renewals_total{result="lost"}'] == 1
    assert m["tweed_ready"] == 0
    assert "lost the lease" in (rig.d.not_ready_reason() or "")
    assert not any(k.startswith("tweed_lease_info") for k in m)  # we hold nothing now


async def test_readyz_reasons_follow_the_daemon_state(rig: Rig) -> None:
    d = rig.d
    m = d.manager
    assert m is not None
    lease = await asyncio.wait_for(m.acquire(), TIMEOUT)
    assert d.not_ready_reason() == "subnet file not written"
    d._write_subnet_file(lease)
    assert d.not_ready_reason() == "backend not programmed"
    await rig.network.setup(lease)
    assert d.not_ready_reason() == "peer leases not listed and programmed yet"
    await d._on_listed()
    assert d.not_ready_reason() is None
    # A new subnet whose subnet.env is not written yet.
    other = ipaddress.IPv4Network("10.5.200.0/24")
    m.lease = type(lease)(other, "10.5.200.0-24", lease.attrs, 1, lease.expires_at)
    assert "not yet rewritten" in (d.not_ready_reason() or "")
    m.lease = lease
    # Renewals failed until the TTL ran out.
    m.clock = lambda: lease.expires_at + 1  # type: ignore[operator,assignment,return-value]
    assert "expired" in (d.not_ready_reason() or "")


class _Families:
    """A collector that yields given metric families."""

    def __init__(self, fams: Iterable[object]) -> None:
        self.fams = list(fams)

    def collect(self) -> Iterator[object]:
        return iter(self.fams)


def expose(fams: Iterable[object]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(fams))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


UDP_VALUES = {"tx_packets": 5, "rx_packets": 6, "tx_bytes": 500, "rx_bytes": 600,
              "rx_datagrams": 7, "rx_drop_spoofed_source": 2, "tx_drop_no_route": 3,
              "gso_sends": 1, "gro_receives": 1, "coalesced_writes": 1, "tso_reads": 1,
              "icmp_unreachable_sent": 1, "offload_udp_gso": 1}


def test_udp_counters_are_exported_whatever_keys_the_datapath_reports() -> None:
    values = {**UDP_VALUES, "offload_new_mode": 0, "some_new_counter": 9}
    m = parse(expose(udp_families(values)))
    assert m['tweed_udp_packets_total{direction="tx"}'] == 5
    assert m['tweed_udp_bytes_total{direction="rx"}'] == 600
    assert m["tweed_udp_rx_datagrams_total"] == 7
    assert m['tweed_udp_drops_total{direction="rx",reason="spoofed_source"}'] == 2
    assert m['tweed_udp_drops_total{direction="tx",reason="no_route"}'] == 3
    assert m['tweed_udp_offload{offload="udp_gso"}'] == 1
    assert m['tweed_udp_offload{offload="new_mode"}'] == 0
    assert m["tweed_udp_some_new_counter_total"] == 9  # a key added later still shows
    assert "tweed_udp_tx_packets_total" not in m  # carried by the direction label instead
    assert parse(expose(udp_families({}))) == {}  # no datapath yet: nothing


def test_iptables_counters() -> None:
    m = parse(expose(iptables_families(
        {"checks": 4, "errors": 1, "repairs": 2, "repairs_rule_missing": 2}, True)))
    assert m["tweed_iptables_ok"] == 1
    assert m["tweed_iptables_checks_total"] == 4
    assert m["tweed_iptables_errors_total"] == 1
    assert m['tweed_iptables_repairs_total{kind="rule_missing"}'] == 2


async def test_names_follow_prometheus_conventions_and_are_all_documented(rig: Rig) -> None:
    await rig.start()
    # The udp and iptables families appear only with those features: added here.
    text = (render(rig.d).decode() + expose(udp_families(UDP_VALUES))
            + expose(iptables_families({"checks": 1, "repairs_rule_missing": 0}, True)))
    families = list(text_string_to_metric_families(text))
    suffix = {"counter": "_total", "info": "_info"}
    exposed = {f.name + suffix.get(f.type, "") for f in families if f.name.startswith("tweed_")}
    documented = set(re.findall(r"^\| `(tweed_[a-z_]+)`", DOC.read_text(), re.M))
    assert not exposed - documented, f"not in docs/metrics.md: {sorted(exposed - documented)}"
    assert not documented - exposed, f"documented, not exported: {sorted(documented - exposed)}"
    for fam in families:
        assert fam.name.startswith(("tweed_", "process_")), fam.name
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam.name
        if "seconds" in fam.name or "timestamp" in fam.name:
            assert fam.name.endswith("_seconds"), fam.name
        assert fam.documentation, fam.name
