"""host-gw backend: the kernel routes each peer's subnet straight to the peer's address.

On the wire: nothing is added; container packets cross the underlay as they are, so every
host must share one L2 segment. In the kernel: per peer lease with BackendType "host-gw",
`route <peer subnet> via <peer PublicIP> dev <iface>` in the main table. The desired table
is diffed against the kernel after every event batch and every `resync` seconds, so a
route deleted by hand comes back within one period. Our lease says only
`"BackendType":"host-gw"`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from agent.config import NetworkConfig
from agent.lease_codec import LeaseAttrs
from agent.lease_manager import Lease, PeerEvent
from backends.external_iface import ExternalInterface
from backends.netlink import Netlink, Route
from backends.route_table import diff_routes

log = logging.getLogger(__name__)

TYPE = "host-gw"


class HostGwNetwork:
    """Routes to every host-gw peer through the external interface."""

    def __init__(
        self, netlink: Netlink, ext: ExternalInterface, config: NetworkConfig, resync: float
    ) -> None:
        self.netlink = netlink
        self.ext = ext
        self.config = config
        self.resync = resync
        self.lease_attrs = LeaseAttrs(ext.public_ip, None, TYPE, None)
        self.mtu = ext.mtu
        self.own: ipaddress.IPv4Network | None = None
        self.desired: dict[ipaddress.IPv4Network, Route] = {}
        self.route_errors = 0
        self.resyncs = 0
        self._lock = asyncio.Lock()
        self._ok = False
        self._reported: set[tuple[ipaddress.IPv4Network, str]] = set()

    async def setup(self, lease: Lease) -> None:
        self.own = lease.subnet
        self.desired.pop(lease.subnet, None)
        await self.sync()

    def _owned(self, r: Route) -> bool:
        """Routes this backend manages: a peer-sized subnet of the Network via a gateway."""
        net = self.config.network
        return (
            net is not None
            and r.gateway is not None
            and r.oif == self.ext.index
            and r.dst.prefixlen == self.config.subnet_len
            and r.dst.subnet_of(net)
            and r.dst != self.own
        )

    async def apply(self, events: list[PeerEvent]) -> None:
        for ev in events:
            subnet = ev.lease.subnet
            if ev.kind == "removed":
                self.desired.pop(subnet, None)
            elif ev.lease.attrs.backend_type != TYPE:
                # vxlan/udp peers cannot be reached by a plain route; flanneld skips them too.
                self.desired.pop(subnet, None)
            elif subnet != self.own:
                self.desired[subnet] = Route(subnet, ev.lease.attrs.public_ip, self.ext.index)
        await self.sync()

    async def sync(self) -> bool:
        """Diff the desired routes against the kernel and apply the difference."""
        async with self._lock:
            actual = await self.netlink.routes(oif=self.ext.index)
            diff = diff_routes(self.desired, actual, self._owned)
            if not diff:
                self._ok = True
                return False
            errors = await self.netlink.apply_routes(diff.replace, diff.delete)
            for r in diff.replace:
                log.info("route %s via %s dev %s", r.dst, r.gateway, self.ext.name)
            for r in diff.delete:
                log.info("removed route %s via %s", r.dst, r.gateway)
            for e in errors:
                self.route_errors += 1
                if (e.route.dst, e.error) not in self._reported:
                    self._reported.add((e.route.dst, e.error))
                    log.error(
                        "cannot %s route %s via %s dev %s: %s",
                        e.op, e.route.dst, e.route.gateway, self.ext.name, e.error,
                    )
            self._ok = not errors
            return True

    def ready(self) -> bool:
        return self._ok

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            try:
                if await self.sync():
                    self.resyncs += 1
                    log.info("resync repaired the route table")
            except OSError as exc:
                log.error("route resync failed: %s", exc)

    async def close(self) -> None:
        return None


class HostGwBackend:
    """Builds HostGwNetworks."""

    name = TYPE

    def __init__(self, netlink: Netlink, ext: ExternalInterface, resync: float = 10.0) -> None:
        self.netlink = netlink
        self.ext = ext
        self.resync = resync

    async def register_network(self, config: NetworkConfig) -> HostGwNetwork:
        return HostGwNetwork(self.netlink, self.ext, config, self.resync)
