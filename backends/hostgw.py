"""host-gw backend: the kernel routes each peer's subnet straight to the peer's address.

On the wire: nothing is added; container packets cross the underlay as they are, so every
host must share one L2 segment. In the kernel: per peer lease with BackendType "host-gw",
`route <peer subnet> via <peer PublicIP> dev <iface>` in the main table. The desired table
is diffed against the kernel after every event batch and every `resync` seconds, so a
route deleted by hand comes back within one period. Our lease says only
`"BackendType":"host-gw"`.
"""

from __future__ import annotations

import ipaddress

from agent.config import NetworkConfig
from agent.lease import Lease, PeerEvent, PeerEventKind
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.kernel.diff import diff_routes
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Netlink, Route

TYPE = "host-gw"


def owns_peer_route(
    r: Route,
    config: NetworkConfig,
    oif: int,
    own: ipaddress.IPv4Network | None,
    ours: set[ipaddress.IPv4Network] | frozenset[ipaddress.IPv4Network] = frozenset(),
) -> bool:
    """Routes a backend manages on `oif`: via a gateway, inside the Network, never our own
    subnet, and either peer-sized or one we installed in this run (a peer's lease may have
    another length, left from an older config)."""
    net = config.network
    return (
        net is not None
        and r.gateway is not None
        and r.oif == oif
        and (r.dst.prefixlen == config.subnet_len or r.dst in ours)
        and r.dst.subnet_of(net)
        and r.dst != own
    )


class HostGwNetwork:
    """Routes to every host-gw peer through the external interface."""

    def __init__(
        self, netlink: Netlink, ext: ExternalInterface, config: NetworkConfig, resync: float
    ) -> None:
        self.netlink = netlink
        self.ext = ext
        self.config = config
        self.lease_attrs = LeaseAttrs(ext.public_ip, None, TYPE, None)
        self.mtu = ext.mtu
        self.own: ipaddress.IPv4Network | None = None
        self.desired: dict[ipaddress.IPv4Network, Route] = {}
        self.installed: set[ipaddress.IPv4Network] = set()  # every dst ever desired
        # Until the first batch of peers arrives, the routes of the last run are the best
        # guess there is: a restart must not remove them (and drop traffic) only to add
        # them back a moment later, so deletions wait for the peer set.
        self.peers_known = False
        self.kernel = KernelSync(netlink, self._plan, resync)

    @property
    def resync(self) -> float:
        return self.kernel.resync

    @property
    def route_errors(self) -> int:
        return self.kernel.errors

    @property
    def resyncs(self) -> int:
        return self.kernel.repairs

    async def setup(self, lease: Lease) -> None:
        self.own = lease.subnet
        self.desired.pop(lease.subnet, None)
        await self.sync()

    def _owned(self, r: Route) -> bool:
        return owns_peer_route(r, self.config, self.ext.index, self.own, self.installed)

    async def _plan(self) -> ChangeSet:
        actual = await self.netlink.routes(oif=self.ext.index)
        diff = diff_routes(self.desired, actual, self._owned)
        delete = list(diff.delete) if self.peers_known else []
        return ChangeSet(route_replace=list(diff.replace), route_delete=delete)

    async def apply(self, events: list[PeerEvent]) -> None:
        self.peers_known = True
        for ev in events:
            subnet = ev.lease.subnet
            if ev.kind is PeerEventKind.REMOVED or ev.lease.attrs.backend_type != TYPE:
                # vxlan/udp peers cannot be reached by a plain route; flanneld skips them too.
                self.desired.pop(subnet, None)
            elif subnet != self.own:
                self.desired[subnet] = Route(subnet, ev.lease.attrs.public_ip, self.ext.index)
                self.installed.add(subnet)
        await self.sync()

    async def sync(self) -> bool:
        """Diff the desired routes against the kernel and apply the difference."""
        return await self.kernel.sync()

    def ready(self) -> bool:
        return self.kernel.ready()

    async def run(self) -> None:
        await self.kernel.run()

    def counters(self) -> dict[str, int]:
        return {}

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
