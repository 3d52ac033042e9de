"""host-gw backend: the kernel routes each peer's subnet straight to the peer's address.

On the wire: nothing is added; container packets cross the underlay as they are, so every
host must share one L2 segment. In the kernel: per peer lease with BackendType "host-gw",
`route <peer subnet> via <peer PublicIP> dev <iface>` in the main table. The desired table
is diffed against the kernel after every event batch, soon after a kernel notification
shows one of our routes deleted or changed (so a route deleted by hand comes back within
a fraction of a second), and every `resync` seconds as a backstop. The kernel flushes
every route through the interface when it goes down, without a route notification: the
link's own notification wakes a sync, refused while the link is down and retried until it
is up (KernelSync), so the routes are back as soon as it is. Our lease says only
`"BackendType":"host-gw"`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from agent.config import NetworkConfig
from agent.lease_codec import LeaseAttrs
from backends.base import BackendContext
from backends.external_iface import ExternalInterface
from backends.kernel.desired import PeerEntries
from backends.kernel.types import Netlink, Route
from backends.routed import RoutedNetwork

TYPE = "host-gw"


class HostGwNetwork(RoutedNetwork):
    """Routes to every host-gw peer through the external interface."""

    backend_type = TYPE

    def __init__(
        self, netlink: Netlink, ext: ExternalInterface, config: NetworkConfig, resync: float
    ) -> None:
        super().__init__(netlink, ext, config, resync)
        self.lease_attrs = LeaseAttrs(ext.public_ip, None, TYPE, None)
        self.mtu = ext.mtu

    def _entries(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> PeerEntries:
        return PeerEntries(Route(subnet, attrs.public_ip, self.ext.index))


class HostGwBackend:
    """Builds HostGwNetworks."""

    name = TYPE

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @staticmethod
    def check_options(backend: dict[str, Any]) -> None:
        """host-gw has no options."""

    async def register_network(self, config: NetworkConfig) -> HostGwNetwork:
        return HostGwNetwork(self.ctx.netlink, self.ctx.ext, config, self.ctx.resync)
