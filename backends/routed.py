"""What the routed backends (host-gw, vxlan) share: the peer set, route ownership, the
desired tables, and the plan KernelSync runs to bring the kernel to them.

Both program one set of kernel entries per peer lease of their own BackendType (`peers`),
remember every peer subnet of another length than the config's SubnetLen they ever
programmed (`installed`, so that a route of such a peer that left is still known as ours),
and hold deletions back until the first batch of peers has arrived (`peers_known`). A
subclass says what the kernel should hold for one peer (`_entries`), on which devices
(`_route_oifs`, `_neigh_index`), may create devices for our lease first (`_prepare`) and
may refuse a peer whose lease it cannot use (`_usable`).

The desired tables change with each peer event (DesiredTables), so that a plan after a
batch diffs only the entries that batch touched while the kernel is known to be as the
last plan left it (`KernelSync.trusted`); every other plan diffs all of them.

A peer whose lease is deleted keeps its entries for `removal_grace` seconds (`leaving`):
an operator's `etcdctl del` of a live host's lease is followed by that host leasing the
same subnet again within a second or two, and its peers must not remove its route only to
add it back (a gap in which its containers are unreachable). A lease that comes back in
time cancels the removal; a peer that really left is removed when the time is up (the
plan that runs then, asked for with `KernelSync.sync_at`); a lease of another host or
backend for the subnet replaces the entries at once as before.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import ClassVar, TypeVar

from agent.config import NetworkConfig
from agent.lease import Lease, PeerEvent, PeerEventKind
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.kernel.desired import DesiredTables, Dirty, PeerEntries
from backends.kernel.diff import Diff, diff_entries, diff_keys, diff_routes, sorted_keys
from backends.kernel.monitor import Desired, written_index
from backends.kernel.sync import KernelSync
from backends.kernel.types import ChangeSet, Fdb, Neigh, Netlink, Route

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a deleted peer lease's entries stay in the kernel in case the lease comes back:
#: longer than a host takes to lease its subnet again after an operator deleted it (the
#: 2 s the lab allows it, measured well under 0.1 s), short against anything a peer that
#: really left could be missed for (its lease had expired, or it was decommissioned).
REMOVAL_GRACE = 3.0


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
        # Every peer subnet ever desired whose length is not the SubnetLen (those are owned
        # anyway: a set of all of them cost ~100 bytes a peer).
        self.installed: set[ipaddress.IPv4Network] = set()
        # Until the first batch of peers arrives, the entries of the last run are the best
        # guess there is: a restart must not remove them (and drop traffic) only to add
        # them back a moment later, so deletions wait for the peer set.
        self.peers_known = False
        #: What the kernel should hold for `peers`, kept per peer event.
        self.tables = DesiredTables()
        self.kernel = KernelSync(netlink, self._plan, resync)
        #: Deleted peers whose entries stay until then (KernelSync's clock); see the top.
        self.leaving: dict[ipaddress.IPv4Network, float] = {}
        self.removal_grace = REMOVAL_GRACE
        #: Our lease, once set up (a device made again is made for it).
        self.lease: Lease | None = None
        #: The next plan diffs every entry (the first listing is in: deletions may go).
        self._diff_all = False

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
        self.lease = lease
        self.leaving.pop(lease.subnet, None)
        old = self.peers.pop(lease.subnet, None)
        if old is not None:
            self._drop(lease.subnet, old)
        await self._prepare(lease)
        self.tables.stale = True  # entries depend on the devices _prepare made
        await self.sync()

    async def _prepare(self, lease: Lease) -> None:
        """Devices and addresses for our lease, made before the first sync; none here."""

    def _usable(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> bool:
        """Whether a peer lease of our BackendType can be programmed (a subclass that
        says no logs why)."""
        return True

    def _entries(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> PeerEntries | None:
        """What the kernel should hold for one usable peer (pure); None: nothing yet."""
        raise NotImplementedError

    def _route_oifs(self) -> tuple[int, ...]:
        """The devices whose routes this network manages."""
        return (self.ext.index,)

    def _neigh_index(self) -> int:
        """The device whose permanent neighbours and FDB entries are all ours; 0: none."""
        return 0

    def _links(self) -> dict[int, str]:
        """The devices this network uses, index -> name (a deleted one is reported)."""
        return {self.ext.index: self.ext.name}

    def _owned_route(self, r: Route) -> bool:
        """A route on one of `_route_oifs` this network manages (see owns_peer_route)."""
        return self._owns(r, r.oif) if r.oif in self._route_oifs() else False

    def _put(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> None:
        e = self._entries(subnet, attrs)
        if e is not None:
            self.tables.put(e)

    def _drop(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs) -> None:
        e = self._entries(subnet, attrs)
        if e is not None:
            self.tables.drop(e)

    async def apply(self, events: list[PeerEvent]) -> None:
        if not self.peers_known:
            # The start's one INFO line between the lease and the kernel's: from here on
            # the time is the kernel part of a start (tests/bench_scale.py reads it).
            log.info("first peer listing: %d leases; programming the kernel", len(events))
            self.peers_known = True
            # Deletions were held back: diff everything once. The tables themselves are
            # up to date (a rebuild sorted and rebuilt 20,000 peers' entries at a cold
            # start only to get the same tables).
            self._diff_all = True
        now = self.kernel.clock()
        for ev in events:
            subnet, attrs = ev.lease.subnet, ev.lease.attrs
            if (ev.kind is PeerEventKind.REMOVED and subnet in self.peers
                    and self.removal_grace > 0):
                if subnet not in self.leaving:
                    self.leaving[subnet] = now + self.removal_grace
                    self.kernel.sync_at(self.leaving[subnet])
                    log.debug("the lease of %s was deleted; its entries go in %g s unless "
                              "it comes back", subnet, self.removal_grace)
                continue
            if self.leaving and self.leaving.pop(subnet, None) is not None:
                same = self.peers.get(subnet) == attrs and ev.kind is PeerEventKind.ADDED
                # INFO only for what the grace is for (a lease deleted and written again as
                # it was); a subnet leased anew at once is ordinary churn.
                log.log(logging.INFO if same else logging.DEBUG,
                        "the lease of %s came back %s; its entries %s", subnet,
                        "unchanged" if same else "changed",
                        "stayed in place" if same else "follow it")
            old = self.peers.pop(subnet, None)
            if old is not None:
                self._drop(subnet, old)
            if (ev.kind is PeerEventKind.REMOVED or attrs.backend_type != self.backend_type
                    or subnet == self.own or not self._usable(subnet, attrs)):
                continue
            self.peers[subnet] = attrs
            if subnet.prefixlen != self.config.subnet_len:
                self.installed.add(subnet)
            self._put(subnet, attrs)
        await self.sync()

    def _owns(self, r: Route, oif: int) -> bool:
        """A route on `oif` this network manages (see owns_peer_route)."""
        return owns_peer_route(r, self.config, oif, self.own, self.installed)

    def _deletions(self, entries: Sequence[T]) -> list[T]:
        """`entries` to delete, once the peers are known; none before (see peers_known)."""
        return list(entries) if self.peers_known else []

    def _ready_to_plan(self) -> bool:
        """Whether the devices the entries live on exist (vxlan: after _prepare)."""
        return True

    def _expire(self) -> None:
        """Drop the deleted peers whose grace is over (see `leaving`)."""
        if not self.leaving:
            return
        now = self.kernel.clock()
        for subnet in [s for s, t in self.leaving.items() if t <= now]:
            del self.leaving[subnet]
            attrs = self.peers.pop(subnet, None)
            if attrs is not None:
                self._drop(subnet, attrs)
        if self.leaving:
            self.kernel.sync_at(min(self.leaving.values()))

    async def _plan(self) -> ChangeSet:
        """The changes that make the kernel hold what `peers` needs: only for the keys the
        tables changed since the last plan when the kernel is trusted to be as that plan
        left it, for every entry otherwise. Reads go through `self.kernel.view`, never
        `self.netlink`: they are cached between drifts."""
        self._expire()
        if not self._ready_to_plan():
            return ChangeSet()
        t = self.tables
        # A rebuild may drop keys no change marked (and held-back deletions, entries of a
        # device made anew): only a full diff finds what the kernel holds under them.
        full = t.stale or self._diff_all or not self.kernel.trusted
        self._diff_all = False
        if t.stale:
            t.load(e for s in sorted_keys(self.peers)
                   if (e := self._entries(s, self.peers[s])) is not None)
        neigh_dev = self._neigh_index()
        self.kernel.desired = Desired(t.routes, self._owned_route, neigh_dev, t.neigh, t.fdb,
                                      self._links())
        dirty = t.take_dirty()
        diffs = None if full else self._diff_changed(dirty)
        if diffs is None:
            self.kernel.plans["full"] += 1
            view = self.kernel.view
            actual: list[Route] = []
            for oif in self._route_oifs():
                actual += await view.routes(oif=oif)
            rdiff = diff_routes(t.routes, actual, self._owned_route)
            ndiff: Diff[Neigh] = Diff((), ())
            fdiff: Diff[Fdb] = Diff((), ())
            if neigh_dev:
                ndiff = diff_entries(t.neigh, await view.neighbours(neigh_dev),
                                     lambda n: n.ip, lambda n: True)
                fdiff = diff_entries(t.fdb, await view.fdb_entries(neigh_dev),
                                     lambda f: f.mac, lambda f: True)
            view.adopt(t.routes, t.neigh, t.fdb)
        else:
            self.kernel.plans["changed"] += 1
            rdiff, ndiff, fdiff = diffs
        cs = ChangeSet(
            route_replace=list(rdiff.replace),
            route_delete=self._deletions(rdiff.delete),
            neigh_replace=list(ndiff.replace),
            neigh_delete=self._deletions(ndiff.delete),
            fdb_replace=list(fdiff.replace),
            fdb_delete=self._deletions(fdiff.delete),
        )
        # The monitor knows the echoes of these from their raw fields (monitor.drifted).
        self.kernel.desired.written = written_index(cs.route_replace)
        return cs

    def _diff_changed(
        self, dirty: Dirty
    ) -> tuple[Diff[Route], Diff[Neigh], Diff[Fdb]] | None:
        """The diff of the changed keys against the view's cache; None if a table it needs
        is not cached (a refused change dropped it): then only a full diff will do."""
        view, t = self.kernel.view, self.tables
        oifs = self._route_oifs()
        dev = self._neigh_index()
        have_routes: dict[ipaddress.IPv4Network, list[Route]] = {}
        for dst in dirty.routes:
            found: list[Route] = []
            for oif in oifs:
                got = view.cached_routes(oif, dst)
                if got is None:
                    return None
                found += got
            have_routes[dst] = found
        have_neigh: dict[ipaddress.IPv4Address, list[Neigh]] = {}
        have_fdb: dict[str, list[Fdb]] = {}
        if dev:
            for ip in dirty.neigh:
                n = view.cached_neighbours(dev, ip)
                if n is None:
                    return None
                have_neigh[ip] = n
            for mac in dirty.fdb:
                f = view.cached_fdb(dev, mac)
                if f is None:
                    return None
                have_fdb[mac] = f
        return (diff_keys(t.routes, dirty.routes, have_routes.__getitem__, self._owned_route),
                diff_keys(t.neigh, have_neigh, have_neigh.__getitem__, lambda n: True),
                diff_keys(t.fdb, have_fdb, have_fdb.__getitem__, lambda f: True))

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
