"""Prometheus metrics: read from the agent's live objects at scrape time, never pushed.

A custom collector asks the lease manager and the backend for their counters when
Prometheus scrapes `/metrics`, so the packet path does nothing but bump integer
attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from agent import __version__


class AgentCollector(Collector):
    """Turns the daemon's state into metric families on each scrape."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        yield InfoMetricFamily("tweed_build", "tweed version", value={"version": __version__})
        ready = GaugeMetricFamily("tweed_ready", "1 when /readyz would answer 200")
        ready.add_metric([], 1.0 if d.not_ready_reason() is None else 0.0)
        yield ready
        m = d.manager
        if m is not None:
            up = GaugeMetricFamily("tweed_etcd_reachable", "1 when the last etcd call worked")
            up.add_metric([], 1.0 if m.etcd_reachable else 0.0)
            yield up
            c = m.counters
            for name, help_, value in (
                ("tweed_lease_acquisitions", "subnet leases acquired", c.acquisitions),
                ("tweed_lease_renewals", "subnet leases renewed", c.renewals),
                ("tweed_lease_lost_races", "create transactions lost to another host",
                 c.lost_races),
                ("tweed_watch_events", "lease watch events received", c.events),
                ("tweed_watch_reconnects", "lease watch stream reconnects", c.watch_reconnects),
                ("tweed_watch_relists", "full lease listings (start, compaction)", c.relists),
                ("tweed_bad_subnet_keys", "subnet keys that did not parse", c.bad_keys),
                ("tweed_bad_lease_values", "lease values that did not decode", c.bad_values),
            ):
                fam = CounterMetricFamily(name, help_)
                fam.add_metric([], value)
                yield fam
            peers = GaugeMetricFamily("tweed_peers", "peer leases known", labels=["backend"])
            by_type: dict[str, int] = {}
            for p in m.peers():
                key = p.attrs.backend_type or "udp"
                by_type[key] = by_type.get(key, 0) + 1
            for key, n in sorted(by_type.items()):
                peers.add_metric([key], n)
            yield peers
        counters: Callable[[], dict[str, int]] | None = getattr(d.network, "counters", None)
        if counters is not None:
            yield from udp_families(counters())


def udp_families(values: dict[str, int]) -> Iterator[Any]:
    """The udp datapath's counters as metric families."""
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
    dgrams = CounterMetricFamily("tweed_udp_rx_datagrams", "datagrams received on the port")
    dgrams.add_metric([], values.get("rx_datagrams", 0))
    yield dgrams
    drops = CounterMetricFamily("tweed_udp_drops", "packets dropped, by direction and reason",
                                labels=["direction", "reason"])
    for key, value in sorted(values.items()):
        for direction in ("tx", "rx"):
            prefix = f"{direction}_drop_"
            if key.startswith(prefix):
                drops.add_metric([direction, key[len(prefix):]], value)
    yield drops
    for key, help_ in (("gso_sends", "UDP GSO sends (several datagrams in one call)"),
                       ("gro_receives", "coalesced UDP receives (UDP GRO)"),
                       ("coalesced_writes", "TCP super-packets written to the TUN"),
                       ("tso_reads", "TCP super-packets read from the TUN and cut (TSO)")):
        fam = CounterMetricFamily(f"tweed_udp_{key}", help_)
        fam.add_metric([], values.get(key, 0))
        yield fam
    offload = GaugeMetricFamily("tweed_udp_offload", "1 if the datapath uses this offload now",
                                labels=["offload"])
    for key, value in sorted(values.items()):
        if key.startswith("offload_"):
            offload.add_metric([key[len("offload_"):]], value)
    yield offload
    icmp = CounterMetricFamily("tweed_udp_icmp_unreachable_sent",
                               "ICMP net-unreachable replies written to the TUN")
    icmp.add_metric([], values.get("icmp_unreachable_sent", 0))
    yield icmp


def render(daemon: Any) -> bytes:
    """The Prometheus text exposition of the daemon's metrics."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(daemon))
    return generate_latest(registry)
