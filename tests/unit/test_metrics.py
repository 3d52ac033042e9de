"""Unit tests for agent.metrics: a real Daemon over MemoryRegistry and FakeNetlink
(tests.support.daemon_rig) is scraped, and the values must follow what the fakes did; names
follow Prometheus' conventions and every metric is documented in docs/metrics.md."""

from __future__ import annotations

import asyncio
import ipaddress
import platform
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.daemon import Daemon
from agent.metrics import iptables_families, render, udp_families
from tests.support.daemon_rig import OWN, DaemonRig, peer_value

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


def scrape(d: Daemon) -> dict[str, float]:
    return parse(render(d).decode())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[DaemonRig]:
    r = DaemonRig(tmp_path)
    try:
        yield r
    finally:
        await r.stop()


async def test_scrape_before_anything_says_not_ready_and_has_build_info(rig: DaemonRig) -> None:
    m = scrape(rig.daemon)  # not served yet: no config, no registry
    assert m[f'tweed_build_info{{python="{platform.python_version()}",'
             f'version="{__version__}"}}'] == 1
    assert m["tweed_ready"] == 0
    assert not any(k.startswith(("tweed_etcd_", "tweed_lease", "tweed_network_config")) for k in m)
    # The process collector is there too (CPU, memory, file descriptors).
    assert m["process_resident_memory_bytes"] > 0


async def test_lease_and_etcd_series_follow_the_registry(rig: DaemonRig) -> None:
    before = time.time()
    await rig.serve_ready()
    d = rig.daemon
    m = scrape(d)
    assert d.manager is not None
    lease = d.manager.lease
    assert lease is not None and lease.subnet == OWN
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
    # One listing: it chooses a subnet, and the watch starts from it (decoded once).
    assert lists == 1
    assert m['tweed_etcd_requests_total{operation="get_config",result="error"}'] == 0
    assert m["tweed_watch_relists_total"] == 1
    assert m['tweed_peers{backend="host-gw"}'] == 0  # a series even with no peers
    assert m['tweed_network_config_state{state="running"}'] == 1

    # etcd goes away: the daemon's requests fail and are counted as such.
    rig.reg.available = False
    key = 'tweed_etcd_requests_total{operation="get_config",result="error"}'
    await rig.until(lambda: scrape(d)[key] >= 1, "a failed get_config counted")
    await rig.until(lambda: not d.manager.etcd_reachable, "watch notices")  # type: ignore[union-attr]
    m = scrape(d)
    assert m["tweed_etcd_reachable"] == 0
    assert m["tweed_watch_reconnects_total"] >= 1
    # The kernel keeps what it had: still ready while the lease has not run out.
    assert m["tweed_ready"] == 1


async def test_peer_events_count_kernel_operations_and_the_event_to_kernel_delay(
    rig: DaemonRig,
) -> None:
    await rig.serve_ready()
    key = 'tweed_watch_events_total{type="put"}'
    # The watch starts from the acquire's listing, so it sees our own create first.
    await rig.until(lambda: scrape(rig.daemon)[key] == 1, "our own create watched")
    m0 = scrape(rig.daemon)
    assert m0["tweed_event_to_kernel_seconds_count"] == 0
    await rig.reg.put("10.5.7.0-24", peer_value(7), ttl=600)
    peer = ipaddress.IPv4Network("10.5.7.0/24")
    await rig.until(lambda: peer in rig.fake.table, "route to the peer")
    m = scrape(rig.daemon)
    assert m[key] == 2
    assert m['tweed_peers{backend="host-gw"}'] == 1
    assert m['tweed_kernel_operations_total{kind="route",op="replace",result="ok"}'] == 1
    assert m['tweed_kernel_operations_total{kind="route",op="delete",result="ok"}'] == 0
    assert m["tweed_event_to_kernel_seconds_count"] == 1
    assert 0 <= m["tweed_event_to_kernel_seconds_sum"] < TIMEOUT
    assert m['tweed_event_to_kernel_seconds_bucket{le="+Inf"}'] == 1

    await rig.reg.delete("10.5.7.0-24")
    await rig.until(lambda: peer not in rig.fake.table, "route removed")
    m = scrape(rig.daemon)
    assert m['tweed_watch_events_total{type="delete"}'] == 1
    assert m['tweed_peers{backend="host-gw"}'] == 0
    assert m['tweed_kernel_operations_total{kind="route",op="delete",result="ok"}'] == 1
    assert m["tweed_event_to_kernel_seconds_count"] == 2


async def test_a_refused_change_is_an_error_and_its_delay_waits_for_the_repair(
    rig: DaemonRig,
) -> None:
    await rig.serve_ready()  # resync every 300 s: not within this test
    d = rig.daemon
    rig.fake.fail = lambda op, item: "EPERM" if op == "replace" else None
    await rig.reg.put("10.5.8.0-24", peer_value(8), ttl=600)
    key = 'tweed_kernel_operations_total{kind="route",op="replace",result="error"}'
    await rig.until(lambda: scrape(d)[key] == 1, "refused replace counted")
    m = scrape(d)
    assert m["tweed_backend_programmed"] == 0
    assert m["tweed_ready"] == 0
    assert m["tweed_event_to_kernel_seconds_count"] == 0  # not programmed: not observed
    await asyncio.sleep(0.3)
    rig.fake.fail = lambda op, item: None
    assert d.network is not None
    assert await d.network.kernel.sync() is True  # what the periodic resync does
    m = scrape(d)
    assert m['tweed_kernel_operations_total{kind="route",op="replace",result="ok"}'] == 1
    assert m["tweed_event_to_kernel_seconds_count"] == 1
    # The delay runs until the kernel was really programmed, not until the first try.
    assert m["tweed_event_to_kernel_seconds_sum"] >= 0.3
    assert m['tweed_event_to_kernel_seconds_bucket{le="0.25"}'] == 0
    assert m["tweed_ready"] == 1


async def test_periodic_resyncs_are_counted_by_result(tmp_path: Path) -> None:
    rig = DaemonRig(tmp_path, resync_period=0.02)  # --resync-period
    try:
        await rig.serve_ready()
        d = rig.daemon
        assert d.network is not None
        resyncs = d.network.kernel.resyncs
        await rig.until(lambda: resyncs[("period", "clean")] >= 2, "clean resyncs")
        # A route deleted behind our back is put back by the resync: a repair.
        await rig.reg.put("10.5.9.0-24", peer_value(9), ttl=600)
        peer = ipaddress.IPv4Network("10.5.9.0/24")
        await rig.until(lambda: peer in rig.fake.table, "route")
        del rig.fake.table[peer]
        await rig.until(lambda: peer in rig.fake.table, "route repaired")
        m = scrape(d)
    finally:
        await rig.stop()
    assert m['tweed_kernel_resyncs_total{reason="period",result="repaired"}'] == 1
    assert m['tweed_kernel_resyncs_total{reason="period",result="clean"}'] >= 2
    assert m['tweed_kernel_resyncs_total{reason="period",result="failed"}'] == 0
    # No kernel monitor in this rig: nothing else ran, nothing was read or lost.
    assert m['tweed_kernel_resyncs_total{reason="event",result="repaired"}'] == 0
    assert m['tweed_kernel_events_total{result="drift"}'] == 0
    assert m["tweed_kernel_events_lost_total"] == 0
    # Without notifications the kernel is never trusted: every read a dump, every plan full.
    assert m['tweed_kernel_reads_total{kind="route",source="dump"}'] >= 3
    assert m['tweed_kernel_reads_total{kind="route",source="cache"}'] == 0
    assert m['tweed_kernel_plans_total{scope="full"}'] >= 3
    assert m['tweed_kernel_plans_total{scope="changed"}'] == 0


async def test_renewals_by_result_and_a_lost_lease(tmp_path: Path) -> None:
    # A 2 s lease is renewed every 0.2 s (the margin is at most 90% of the TTL). The
    # network has room for our subnet only, so a lost lease cannot be replaced.
    rig = DaemonRig(tmp_path, subnet_lease_ttl=2)
    one_subnet = (b'{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.1.0",'
                  b'"Backend":{"Type":"host-gw"}}')
    try:
        await rig.serve_ready(one_subnet)
        d = rig.daemon
        ok = 'tweed_lease_renewals_total{result="ok"}'
        await rig.until(lambda: scrape(d)[ok] >= 1, "a renewal")
        assert scrape(d)['tweed_lease_renewals_total{result="lost"}'] == 0
        # Another host takes our key, and the watch has not told us yet: the next renewal
        # finds the key changed.
        rig.reg.watch_open.clear()
        await rig.reg.put(f"{OWN.network_address}-24", peer_value(9), ttl=600)
        lost = 'tweed_lease_renewals_total{result="lost"}'
        await rig.until(lambda: scrape(d)[lost] == 1, "the renewal that found the key taken")
        full = 'tweed_lease_acquisitions_total{result="no_free_subnet"}'
        await rig.until(lambda: scrape(d)[full] >= 1, "acquiring again finds no room")
        m = scrape(d)
    finally:
        await rig.stop()
    assert m["tweed_lease_losses_total"] == 1
    assert m["tweed_ready"] == 0
    assert "lost the lease on 10.5.1.0/24" in (d.not_ready_reason() or "")
    assert not any(k.startswith("tweed_lease_info") for k in m)  # we hold nothing now
    assert "tweed_lease_expiry_timestamp_seconds" not in m


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
              "icmp_unreachable_sent": 1, "offload_udp_gso": 1,
              "icmp_time_exceeded_sent": 1, "icmp_rate_limited": 1, "tx_socket_full": 1,
              "tun_lost": 1, "tun_recreated": 1}


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


async def test_names_follow_prometheus_conventions_and_are_all_documented(
    rig: DaemonRig,
) -> None:
    await rig.serve_ready()
    # The udp and iptables families appear only with those features: added here.
    text = (render(rig.daemon).decode() + expose(udp_families(UDP_VALUES))
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
