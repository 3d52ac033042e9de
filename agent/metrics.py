"""Prometheus metrics: read from the agent's live objects at scrape time, never pushed.

A custom collector asks the daemon, the lease manager, the registry, the kernel sync, the
udp datapath and the iptables keeper for their counters when Prometheus scrapes
`/metrics`, so the code that counts does nothing but bump integers. Every metric is
listed with its type, labels and meaning in docs/metrics.md.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.config import NetworkConfig
from agent.lease_manager import LeaseManager
from agent.state import CONFIG_STATES, AgentState
from backends.base import Network

#: etcd operations always exported (0 until used), so rate() has a series from the start.
ETCD_OPERATIONS = ("get_config", "list_subnets", "grant_lease", "revoke_lease",
                   "create_subnet", "update_subnet", "delete_subnet", "watch_subnets",
                   "watch_config")


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, help_)
    fam.add_metric([], value)
    return fam


def _counters(name: str, help_: str, labels: list[str],
              values: Mapping[Any, float]) -> CounterMetricFamily:
    """A counter family with one series per key of `values`, in key order; a key is the
    label value, or a tuple of them for several labels."""
    fam = CounterMetricFamily(name, help_, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return fam


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, help_)
    fam.add_metric([], value)
    return fam


class AgentCollector(Collector):
    """Turns the daemon's state into metric families on each scrape."""

    def __init__(self, daemon: AgentState) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield InfoMetricFamily("tweed_build", "tweed version and the Python running it",
                               value={"version": __version__,
                                      "python": platform.python_version()})
        yield _gauge("tweed_ready", "1 when /readyz answers 200 (lease held, subnet.env "
                     "written, backend programmed)", 1.0 if d.not_ready_reason() is None else 0.0)
        if d.config is not None:
            fam = GaugeMetricFamily("tweed_network_config_state", "1 for how the network "
                                    "config in etcd compares with the running one",
                                    labels=["state"])
            for s in CONFIG_STATES:
                fam.add_metric([s], 1.0 if s == d.config_state else 0.0)
            yield fam
        yield _gauge("tweed_event_loop_lag_seconds",
                     "how late the event loop ran the last heartbeat timer", d.heartbeat.lag)
        yield _counters("tweed_failures", "failures the running agent retries, by step "
                        "(subnet_file, backend_setup, kernel)", ["step"], d.failures)
        if d.registry is not None:
            yield from etcd_families(d.registry.requests, d.registry.member_switches)
        if d.manager is not None:
            yield from manager_families(d.manager, d.config, d.network)
        if d.network is not None:
            yield from network_families(d.network)
        if d.iptables is not None:
            yield from iptables_families(d.iptables.counters(), d.iptables.ok())


def etcd_families(requests: Mapping[tuple[str, str], int],
                  member_switches: Mapping[str, int] | None = None) -> Iterator[Metric]:
    """etcd requests by operation and result; moves to another etcd member by reason."""
    fam = CounterMetricFamily("tweed_etcd_requests", "etcd requests by operation and result",
                              labels=["operation", "result"])
    keys = {(op, r) for op in ETCD_OPERATIONS for r in ("ok", "error")} | set(requests)
    for op, result in sorted(keys):
        fam.add_metric([op, result], requests.get((op, result), 0))
    yield fam
    switches = member_switches or {}
    fam = CounterMetricFamily("tweed_etcd_member_switches", "times etcd calls moved to the "
                              "next member of --etcd-endpoints, by reason",
                              labels=["reason"])
    for reason in sorted({"no_leader", "unreachable"} | set(switches)):
        fam.add_metric([reason], switches.get(reason, 0))
    yield fam


def manager_families(
    m: LeaseManager, config: NetworkConfig | None, network: Network | None
) -> Iterator[Metric]:
    """The lease manager's state and counters: lease, etcd, watch, peers."""
    yield _gauge("tweed_etcd_reachable", "1 when the last etcd call worked",
                 1.0 if m.etcd_reachable else 0.0)
    lease = m.lease
    if lease is not None and not m.lease_lost:
        backend = config.backend_type if config is not None else ""
        labels = {
            "subnet": str(lease.subnet) if lease.has_ipv4 else "",
            "public_ip": str(lease.attrs.public_ip) if lease.has_ipv4 else "",
            "backend": backend, "reservation": "true" if lease.reservation else "false"}
        if lease.ipv6_subnet is not None:  # dual stack or IPv6-only: the IPv6 part too
            labels["ipv6_subnet"] = str(lease.ipv6_subnet)
            labels["public_ipv6"] = str(lease.attrs.public_ipv6 or "")
        yield InfoMetricFamily("tweed_lease", "the subnet lease this host holds",
                               value=labels)
        if lease.expires_at is not None:
            # expires_at is on the manager's monotonic clock; Prometheus wants wall time.
            expiry = time.time() + (lease.expires_at - m.clock())
            yield _gauge("tweed_lease_expiry_timestamp_seconds",
                         "when our subnet lease expires unless renewed (Unix time)", expiry)
    c = m.counters
    fam = CounterMetricFamily("tweed_lease_acquisitions", "subnet lease acquisition "
                              "attempts by result", labels=["result"])
    for result, value in (("ok", c.acquisitions), ("lost_race", c.lost_races),
                          ("etcd_error", c.acquire_errors),
                          ("no_free_subnet", c.no_free_subnet)):
        fam.add_metric([result], value)
    yield fam
    fam = CounterMetricFamily("tweed_lease_renewals", "subnet lease renewal attempts by "
                              "result", labels=["result"])
    for result, value in (("ok", c.renewals), ("etcd_error", c.renewal_errors),
                          ("lost", c.renewals_lost)):
        fam.add_metric([result], value)
    yield fam
    yield _counter("tweed_lease_losses", "times our lease was lost (deleted, expired, taken)"
                   " and a subnet acquired again", c.reacquisitions)
    fam = CounterMetricFamily("tweed_watch_events", "subnet lease watch events by type",
                              labels=["type"])
    fam.add_metric(["put"], c.events_put)
    fam.add_metric(["delete"], c.events_delete)
    yield fam
    yield _counter("tweed_watch_relists", "full lease listings (start, after a compaction)",
                   c.relists)
    yield _counter("tweed_watch_reconnects", "lease watch streams broken and made again",
                   c.watch_reconnects)
    yield _counter("tweed_bad_subnet_keys", "subnet keys that did not parse", c.bad_keys)
    yield _counter("tweed_bad_lease_values", "lease values that did not decode", c.bad_values)
    yield _counter("tweed_leases_outside_network", "leases for a subnet outside the network",
                   c.outside_network)
    by_type: dict[str, int] = {}
    if config is not None and network is not None:
        by_type[config.backend_type] = 0  # a series from the start, also with no peers
    for p in m.peers():
        key = p.attrs.backend_type or "udp"
        by_type[key] = by_type.get(key, 0) + 1
    peers = GaugeMetricFamily("tweed_peers", "peer leases known, by their backend type",
                              labels=["backend"])
    for key, n in sorted(by_type.items()):
        peers.add_metric([key], n)
    yield peers


def network_families(network: Network) -> Iterator[Metric]:
    """The backend: programmed or not, kernel operations, resyncs, the event-to-kernel
    delay and (udp) the datapath's counters."""
    yield _gauge("tweed_backend_programmed", "1 when the backend's last sync left the kernel "
                 "as desired", 1.0 if network.ready() else 0.0)
    kernel = network.kernel
    yield _counters("tweed_kernel_operations", "kernel changes made by the sync, by kind "
                    "(route, neigh, fdb), operation and result", ["kind", "op", "result"],
                    kernel.ops)
    yield _counters("tweed_kernel_resyncs", "full re-reads of the kernel state by reason "
                    "(period, event, lost, retry, device) and result", ["reason", "result"],
                    kernel.resyncs)
    remade = CounterMetricFamily("tweed_devices_recreated", "devices of tweed's own made "
                                 "again after they were deleted, by device and result (ok, "
                                 "failed)", labels=["device", "result"])
    for device in sorted(kernel.makers):
        for result in ("ok", "failed"):
            remade.add_metric([device, result], kernel.recreated.get((device, result), 0))
    yield remade
    yield _counters("tweed_kernel_events", "kernel notifications read, by what they meant "
                    "(drift: a resync follows; ignored: echoes of tweed's own writes, entries "
                    "of others)", ["result"], kernel.events)
    yield _counter("tweed_kernel_events_lost", "times the kernel dropped notifications "
                   "(ENOBUFS) and a full re-read followed", kernel.lost)
    view = kernel.view
    reads = {**{(k, "dump"): n for k, n in view.dumps.items()},
             **{(k, "cache"): n for k, n in view.cached.items()}}
    yield _counters("tweed_kernel_reads", "reads of the kernel's routes, neighbours and FDB "
                    "entries by a plan, by kind and source (dump: asked of the kernel; cache: "
                    "known from the last dump and the changes applied since)",
                    ["kind", "source"], reads)
    yield _counters("tweed_kernel_plans", "plans of kernel changes by scope (changed: only "
                    "the entries a batch changed; full: every entry; host-gw and vxlan)",
                    ["scope"], kernel.plans)
    h = kernel.delay
    yield HistogramMetricFamily(
        "tweed_event_to_kernel_seconds", "from a batch of lease events reaching tweed to "
        "the kernel (and datapath) programmed for it", buckets=h.cumulative(),
        sum_value=h.sum)
    yield from udp_families(network.counters())


#: Datapath counters exported under their own names below; any other key is exported
#: generically, so counters the datapath gains show up without a change here.
_UDP_NAMED = {"tx_packets", "rx_packets", "tx_bytes", "rx_bytes"}
_UDP_HELP = {
    "rx_datagrams": "datagrams received on the port",
    "gso_sends": "UDP GSO sends (several datagrams in one call)",
    "gro_receives": "coalesced UDP receives (UDP GRO)",
    "coalesced_writes": "TCP super-packets written to the TUN",
    "tso_reads": "TCP super-packets read from the TUN and cut (TSO)",
    "icmp_unreachable_sent": "ICMP net-unreachable replies written to the TUN",
    "icmp_time_exceeded_sent": "ICMP time exceeded answers for TTLs that ran out here",
    "icmp_rate_limited": "ICMP errors not sent: their destination's token bucket was empty",
    "tx_socket_full": "sends that found the UDP socket buffer full",
    "tun_lost": "times flannel0's TUN reported an error or hang-up (device deleted)",
    "tun_recreated": "times flannel0 was made again and handed to the datapath",
}


def udp_families(values: Mapping[str, int]) -> Iterator[Metric]:
    """The udp datapath's counters as metric families (whatever keys it reports)."""
    if not values:
        return
    packets = CounterMetricFamily("tweed_udp_packets", "packets carried", labels=["direction"])
    packets.add_metric(["tx"], values.get("tx_packets", 0))
    packets.add_metric(["rx"], values.get("rx_packets", 0))
    yield packets
    nbytes = CounterMetricFamily("tweed_udp_bytes", "inner bytes carried", labels=["direction"])
    nbytes.add_metric(["tx"], values.get("tx_bytes", 0))
    nbytes.add_metric(["rx"], values.get("rx_bytes", 0))
    yield nbytes
    drops = CounterMetricFamily("tweed_udp_drops", "packets dropped, by direction and reason",
                                labels=["direction", "reason"])
    offload = GaugeMetricFamily("tweed_udp_offload", "1 if the datapath uses this offload now",
                                labels=["offload"])
    others: list[Metric] = []
    for key, value in sorted(values.items()):
        direction, _, rest = key.partition("_drop_")
        if rest and direction in ("tx", "rx"):
            drops.add_metric([direction, rest], value)
        elif key.startswith("offload_"):
            offload.add_metric([key[len("offload_"):]], value)
        elif key not in _UDP_NAMED:
            others.append(_counter(f"tweed_udp_{key}", _UDP_HELP.get(key, f"udp datapath: {key}"),
                                   value))
    yield drops
    yield offload
    yield from others


def iptables_families(values: Mapping[str, int], ok: bool) -> Iterator[Metric]:
    """The iptables keeper (--ip-masq, --iptables-forward-rules): checks and repairs."""
    yield _gauge("tweed_iptables_ok", "1 when the last check found or left the chains as "
                 "planned", 1.0 if ok else 0.0)
    yield _counter("tweed_iptables_checks", "checks of the iptables chains",
                   values.get("checks", 0))
    yield _counter("tweed_iptables_errors", "checks that failed (iptables missing, refused, "
                   "hung)", values.get("errors", 0))
    repairs = CounterMetricFamily("tweed_iptables_repairs", "changes made to chains that had "
                                  "been in place, by kind", labels=["kind"])
    for key, value in sorted(values.items()):
        if key.startswith("repairs_"):
            repairs.add_metric([key[len("repairs_"):]], value)
    yield repairs


def render(daemon: AgentState) -> bytes:
    """The Prometheus text exposition of the daemon's metrics (and the process')."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(daemon))
    ProcessCollector(registry=registry)
    return generate_latest(registry)
