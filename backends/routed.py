"""What the routed backends (host-gw, vxlan) share: the peer set, route ownership, and the
KernelSync that brings the kernel to what they want.

Both program one set of kernel entries per peer lease of their own BackendType (`peers`),
remember every peer subnet they ever programmed (`installed`, so that a route of a peer
that left is still known as ours), and hold deletions back until the first batch of peers
has arrived (`peers_known`). A subclass says what the kernel should hold for `peers`
(`_plan`), may create devices for our lease first (`_prepare`) and may refuse a peer whose
lease it cannot use (`_usable`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import ClassVar, TypeVar

from agent.config import NetworkConfig
from agent.lease import Lease, PeerEvent, PeerEventKind
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Netlink, Route

T = TypeVar("T")


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


class RoutedNetwork:
    """A network that routes each peer's subnet: the peer bookkeeping and the kernel sync."""

    #: The BackendType of the peer leases this network programs. Others are skipped: a
    #: host-gw route cannot reach a vxlan or udp peer (flanneld skips them too).
    backend_type: ClassVar[str]
    lease_attrs: LeaseAttrs
    mtu: int

    def __init__(
        self, netlink: Netlink, ext: ExternalInterface, config: NetworkConfig, resync: float
    ) -> None:
        self.netlink = netlink
        self.ext = ext
        self.config = config
        self.own: ipaddress.IPv4Network | None = None
        self.peers: dict[ipaddress.IPv4Network, LeaseAttrs] = {}
        # Every peer subnet ever desired (a superset of self.peers).
        self.installed: set[ipaddress.IPv4Network] = set()
        # Until the first batch of peers arrives, the entries of the last run are the best
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
        self.peers.pop(lease.subnet, None)
        await self._prepare(lease)
        await self.sync()

    async def _prepare(self, lease: Lease) -> None:
        """Devices and addresses for our lease, made before the first sync; none here."""

    def _usable(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> bool:
        """Whether a peer lease of our BackendType can be programmed (a subclass that
        says no logs why)."""
        return True

    async def apply(self, events: list[PeerEvent]) -> None:
        self.peers_known = True
        for ev in events:
            subnet, attrs = ev.lease.subnet, ev.lease.attrs
            if (ev.kind is PeerEventKind.REMOVED or attrs.backend_type != self.backend_type
                    or subnet == self.own or not self._usable(subnet, attrs)):
                self.peers.pop(subnet, None)
                continue
            self.peers[subnet] = attrs
            self.installed.add(subnet)
        await self.sync()

    def _owns(self, r: Route, oif: int) -> bool:
        """A route on `oif` this network manages (see owns_peer_route)."""
        return owns_peer_route(r, self.config, oif, self.own, self.installed)

    def _deletions(self, entries: Sequence[T]) -> list[T]:
        """`entries` to delete, once the peers are known; none before (see peers_known)."""
        return list(entries) if self.peers_known else []

    async def _plan(self) -> ChangeSet:
        """Read the kernel (through `self.kernel.view`, never `self.netlink`: the reads
        are cached between drifts); the changes that make it hold what `peers` needs."""
        raise NotImplementedError

    async def sync(self) -> bool:
        """Diff the desired entries against the kernel and apply the difference; True if
        anything had to change."""
        return await self.kernel.sync()

    def ready(self) -> bool:
        return self.kernel.ready()

    async def run(self) -> None:
        await self.kernel.run()

    def counters(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        return None
