"""LeaseManager: acquires this host's subnet lease, keeps it, and watches the peers' leases.

State machine, in flanneld's terms:
- acquire: list the leases, let the allocator choose, write with a compare transaction
  (create: key version 0; reuse: key unchanged since we listed it); a lost race lists again.
- hold: renew at expiry minus the margin (a reservation, a key with no etcd lease, is never
  renewed nor given a TTL); if our key is deleted, expires or is taken, acquire again,
  preferring the same subnet.
- watch: one snapshot, then one watch from snapshot revision + 1. After a disconnect the
  watch resumes from the last revision seen, so no event is lost; after compaction the
  leases are listed again and diffed against what we knew. Peer changes leave as batches
  of PeerEvents: one etcd response, or all those that arrived while the previous batch
  was being applied (so an agent whose kernel writes are slow catches up instead of
  falling behind).
etcd being away is never fatal: each step retries with capped backoff and logs once per
state change.

Families: the manager leases the address families it is given (`families`: those the
config enables that the backend carries). A dual-stack lease is one key
`10.5.30.0-24&fd00:12:13::-56`, an IPv6-only one `fd00:12:13::-56`. A peer's IPv6 part is
handed on only when IPv6 is leased here; a peer without one is an IPv4 peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from agent.allocator import Existing, OutOfSubnets, choose_subnet
from agent.backoff import Backoff, OutageLog
from agent.config import NetworkConfig, config_families
from agent.lease import NO_IPV4, Lease, PeerEvent, PeerLease, diff_peers
from agent.lease_codec import (
    LeaseAttrs,
    LeaseDecodeError,
    SubnetKey,
    decode_lease,
    encode_lease,
    format_subnet_key,
    parse_subnet_key,
)
from agent.registry import Compacted, Event, Registry, RegistryUnavailable, Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

#: flanneld's lease lifetime: 24 hours.
DEFAULT_TTL = 24 * 3600


BatchHandler = Callable[[list[PeerEvent]], Awaitable[None]]
LeaseHandler = Callable[[Lease], Awaitable[None]]


@dataclass
class Counters:
    """What the manager has done, for metrics and tests."""

    acquisitions: int = 0
    renewals: int = 0
    reacquisitions: int = 0
    lost_races: int = 0
    relists: int = 0
    watch_reconnects: int = 0
    events: int = 0
    bad_keys: int = 0
    bad_values: int = 0
    outside_network: int = 0  # leases whose subnet is not in the network config
    acquire_errors: int = 0  # attempts that failed because etcd was unreachable
    no_free_subnet: int = 0  # attempts that found the network full
    renewal_errors: int = 0  # renewal attempts that failed because etcd was unreachable
    renewals_lost: int = 0  # renewals that found our key gone or taken
    events_put: int = 0
    events_delete: int = 0


class LeaseManager:
    """Acquire and hold this host's lease; stream the peers' leases as batches."""

    def __init__(
        self,
        registry: Registry,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        previous: ipaddress.IPv4Network | None = None,
        previous6: ipaddress.IPv6Network | None = None,
        families: frozenset[int] | None = None,
        ttl: int = DEFAULT_TTL,
        renew_margin: float = 3600.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_cap: float = 10.0,
    ) -> None:
        self.registry = registry
        self.config = config
        self.attrs = attrs
        self.value = encode_lease(attrs)
        self.previous = previous
        self.previous6 = previous6
        #: The families leased: IPv4 ({4}), IPv6 only ({6}) or dual stack ({4, 6}).
        self.families = config_families(config) if families is None else families
        self.ttl = ttl
        self.renew_margin = min(renew_margin, ttl * 0.9)
        self.rng = rng or random.Random()
        self.clock = clock
        self.backoff_cap = backoff_cap
        self.lease: Lease | None = None
        self.counters = Counters()
        self.etcd_reachable = False
        #: When the batch being handed to `on_batch` reached us (time.monotonic(), not
        #: `clock`): the start of the event-to-kernel delay.
        self.batch_received = 0.0
        self._lost = asyncio.Event()
        self._peers: dict[str, PeerLease] = {}
        self._warned: set[tuple[str, str]] = set()
        #: The listing the first acquire decoded, kept for the watch's first snapshot so
        #: that a start lists and decodes every lease once, not twice.
        self._first_listing: _Listing | None = None
        self._watching = False

    # -- decoding --------------------------------------------------------------------
    def _warn_once(self, name: str, problem: str) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            log.warning("skipping subnets/%s: %s", name, problem)

    def _checked(
        self, name: str, decode: Callable[[], T], bad: Literal["bad_keys", "bad_values"]
    ) -> T | None:
        """decode()'s result, or None when subnets/`name` does not decode: counted under
        `bad` and logged once per name and problem."""
        try:
            return decode()
        except LeaseDecodeError as exc:
            setattr(self.counters, bad, getattr(self.counters, bad) + 1)
            self._warn_once(name, str(exc))
            return None

    def _parse_key(self, name: str) -> SubnetKey | None:
        return self._checked(name, lambda: parse_subnet_key(name), "bad_keys")

    def _decode(self, name: str, value: bytes) -> LeaseAttrs | None:
        return self._checked(name, lambda: decode_lease(value), "bad_values")

    async def _etcd_away(
        self, exc: RegistryUnavailable, outage: OutageLog, backoff: Backoff
    ) -> None:
        """etcd did not answer: mark it unreachable, log (once per outage), back off."""
        self.etcd_reachable = False
        outage.fail(str(exc))
        await backoff.wait()

    # -- acquire ---------------------------------------------------------------------
    async def acquire(self, prefer: ipaddress.IPv4Network | None = None,
                      prefer6: ipaddress.IPv6Network | None = None) -> Lease:
        """Lease a subnet; retries (never gives up) until it holds one."""
        backoff = Backoff(cap=self.backoff_cap, rng=self.rng)
        outage = OutageLog(log, "acquiring a subnet lease")
        previous = prefer if prefer is not None else self.previous
        previous6 = prefer6 if prefer6 is not None else self.previous6
        while True:
            try:
                lease = await self._try_acquire(previous, previous6)
            except RegistryUnavailable as exc:
                self.counters.acquire_errors += 1
                await self._etcd_away(exc, outage, backoff)
                continue
            except OutOfSubnets as exc:
                self.etcd_reachable = True
                self.counters.no_free_subnet += 1
                outage.fail(str(exc), logging.ERROR)
                await backoff.wait()
                continue
            self.etcd_reachable = True
            if lease is None:
                self.counters.lost_races += 1
                log.info("another host took the subnet we chose; listing again")
                # Spread the retries of hosts that raced for the same subnet.
                await asyncio.sleep(self.rng.uniform(0, 0.05))
                continue
            outage.ok()
            self.counters.acquisitions += 1
            self.lease = lease
            self._lost.clear()
            kind = "reservation" if lease.reservation else f"lease for {self.ttl} s"
            log.info("holding subnet %s (%s)", lease.describe(), kind)
            return lease

    async def _try_acquire(self, previous: ipaddress.IPv4Network | None,
                           previous6: ipaddress.IPv6Network | None) -> Lease | None:
        snap = await self.registry.list_subnets()
        existing: list[Existing] = []
        decoded: dict[str, tuple[SubnetKey, LeaseAttrs | None]] = {}
        for rec in snap.records:
            key = self._parse_key(rec.name)
            if key is None:
                continue
            attrs = self._decode(rec.name, rec.value)
            existing.append(Existing(key.ipv4, attrs, rec.lease_id != 0, rec.name,
                                     rec.mod_revision, key.ipv6))
            decoded[rec.name] = (key, attrs)
        # Only before the watch starts: later acquisitions (a lost lease) run beside it.
        self._first_listing = None if self._watching else _Listing(snap, decoded)
        choice = choose_subnet(self.config, self.attrs.public_ip, existing, previous, self.rng,
                               families=self.families, public_ipv6=self.attrs.public_ipv6,
                               previous6=previous6)
        for stale in choice.stale:
            log.info("deleting our old lease %s: it does not fit the network config", stale.name)
            await self.registry.delete_subnet(stale.name)
        start = self.clock()
        if choice.reuse is not None:
            name = choice.reuse.name
            ttl = self.ttl if choice.reuse.ttl else 0
            rev = await self.registry.update_subnet(
                name, self.value, ttl, choice.reuse.mod_revision
            )
        else:
            name = format_subnet_key(SubnetKey(choice.subnet, choice.ipv6))
            ttl = self.ttl
            rev = await self.registry.create_subnet(name, self.value, ttl)
        if rev is None:
            return None
        expires = start + ttl if ttl else None
        subnet = choice.subnet if choice.subnet is not None else NO_IPV4
        return Lease(subnet, name, self.attrs, rev, expires, choice.ipv6)

    # -- hold ------------------------------------------------------------------------
    async def hold(self, on_lease: LeaseHandler) -> None:
        """Renew before expiry; re-acquire when the lease is lost. Runs forever."""
        while True:
            lease = self.lease
            assert lease is not None, "acquire() first"
            timeout = None
            if not lease.reservation:
                assert lease.expires_at is not None
                timeout = max(0.0, lease.expires_at - self.renew_margin - self.clock())
            try:
                await asyncio.wait_for(self._lost.wait(), timeout)
            except TimeoutError:
                renewed = await self._renew(lease)
                if renewed is not None:
                    self.lease = renewed
                    continue
            log.warning("lost our lease on %s; acquiring a subnet again", lease.describe())
            self.counters.reacquisitions += 1
            new = await self.acquire(prefer=lease.subnet if lease.has_ipv4 else None,
                                     prefer6=lease.ipv6_subnet)
            if (new.subnet, new.ipv6_subnet) != (lease.subnet, lease.ipv6_subnet):
                log.warning("subnet changed from %s to %s", lease.describe(), new.describe())
            await on_lease(new)

    async def _renew(self, lease: Lease) -> Lease | None:
        """Rewrite our key with a fresh TTL; None when it is gone or no longer ours."""
        backoff = Backoff(cap=self.backoff_cap, rng=self.rng)
        outage = OutageLog(log, f"renewing the lease on {lease.describe()}")
        while not self._lost.is_set():
            start = self.clock()
            try:
                current = self.lease or lease
                rev = await self.registry.update_subnet(
                    lease.name, self.value, self.ttl, current.mod_revision
                )
            except RegistryUnavailable as exc:
                self.counters.renewal_errors += 1
                await self._etcd_away(exc, outage, backoff)
                continue
            self.etcd_reachable = True
            outage.ok()
            if rev is None:
                self.counters.renewals_lost += 1
                self._lost.set()  # for lease_lost until acquire() holds a new one
                return None
            self.counters.renewals += 1
            log.info("renewed the lease on %s for %d s", lease.describe(), self.ttl)
            return dataclasses.replace(lease, mod_revision=rev, expires_at=start + self.ttl)
        return None

    # -- watch -----------------------------------------------------------------------
    def _ours(self, attrs: LeaseAttrs | None) -> bool:
        """Our own lease: its PublicIP is ours (its PublicIPv6 when IPv4 is not leased:
        every IPv6-only lease says PublicIP 0.0.0.0)."""
        if attrs is None:
            return False
        if 4 in self.families:
            return attrs.public_ip == self.attrs.public_ip
        return (self.attrs.public_ipv6 is not None
                and attrs.public_ipv6 == self.attrs.public_ipv6)

    def _own_event(self, ev_kind: str, attrs: LeaseAttrs | None, mod_revision: int) -> None:
        lease = self.lease
        if lease is None:
            return
        if mod_revision < lease.mod_revision:
            return  # older than our own write: a listing made before it (the acquire's)
        if ev_kind == "delete" or not self._ours(attrs):
            self._lost.set()
        else:
            # Our own write coming back, or an operator rewriting our key: track its revision
            # so the next renewal's compare matches.
            self.lease = dataclasses.replace(lease, mod_revision=mod_revision)

    def _peer_of(
        self, name: str, value: bytes,
        known: tuple[SubnetKey, LeaseAttrs | None] | None = None,
    ) -> PeerLease | None:
        if known is not None:
            key, attrs = known  # decoded (and any problem counted) by the acquire
        else:
            parsed = self._parse_key(name)
            if parsed is None:
                return None
            key, attrs = parsed, self._decode(name, value)
        if attrs is None:
            return None
        if self._ours(attrs):
            return None
        fams, config = self.families, self.config
        v4 = key.ipv4 if 4 in fams else None
        v6 = key.ipv6 if 6 in fams else None
        if v4 is None and v6 is None:
            # Nothing this host routes: an IPv6-only key in an IPv4 cluster, or the reverse.
            self.counters.outside_network += 1
            missing = "IPv4" if 4 in fams else "IPv6"
            self._warn_once(name, f"the key has no {missing} part, and this host leases"
                                  f" only IPv{min(fams)}")
            return None
        if v4 is not None and config.network is not None and not _inside(v4, config.network):
            self.counters.outside_network += 1
            self._warn_once(name, f"subnet is outside the network {config.network}")
            return None
        if (v6 is not None and config.ipv6_network is not None
                and not _inside(v6, config.ipv6_network)):
            self.counters.outside_network += 1
            self._warn_once(name, f"IPv6 subnet {v6} is outside the IPv6Network"
                                  f" {config.ipv6_network}")
            return None
        if v6 is not None and attrs.public_ipv6 is None:
            # Nowhere to send its IPv6 traffic: the peer is an IPv4 peer here.
            self._warn_once(name, "the key has an IPv6 part but the lease no PublicIPv6;"
                                  " only its IPv4 subnet is used")
            if v4 is None:
                self.counters.bad_values += 1
                return None
            v6 = None
        return PeerLease(v4 if v4 is not None else NO_IPV4, attrs, v6)

    def _apply_snapshot(
        self, snap: Snapshot,
        decoded: dict[str, tuple[SubnetKey, LeaseAttrs | None]] | None = None,
    ) -> list[PeerEvent]:
        """The peer events that take the known peers to those of `snap`; `decoded` holds
        the records the acquire decoded (then `snap` is its listing)."""
        lease = self.lease
        fresh: dict[str, PeerLease] = {}
        own_seen = False
        for rec in snap.records:
            known = decoded.get(rec.name) if decoded is not None else None
            if decoded is not None and known is None:
                continue  # its key did not parse: the acquire said so and counted it
            if lease is not None and rec.name == lease.name:
                attrs = known[1] if known is not None else self._decode(rec.name, rec.value)
                self._own_event("put", attrs, rec.mod_revision)
                if self._ours(attrs) or rec.mod_revision < lease.mod_revision:
                    own_seen = True
                    continue
                # Another host holds our old key now: it is a peer like any other.
            peer = self._peer_of(rec.name, rec.value, known)
            if peer is not None:
                fresh[rec.name] = peer
        # A listing older than our own write (the acquire's) cannot show it: the watch,
        # from the revision after the listing, does.
        if lease is not None and not own_seen and lease.mod_revision <= snap.revision:
            self._lost.set()
        events = diff_peers(self._peers, fresh)
        self._peers = fresh
        return events

    def _apply_events(self, batch: list[Event]) -> list[PeerEvent]:
        out: list[PeerEvent] = []
        for ev in batch:
            self.counters.events += 1
            if ev.kind == "delete":
                self.counters.events_delete += 1
            else:
                self.counters.events_put += 1
            lease = self.lease
            if lease is not None and ev.name == lease.name:
                attrs = self._decode(ev.name, ev.value) if ev.kind == "put" else None
                self._own_event(ev.kind, attrs, ev.revision)
                if ev.kind == "delete" or attrs is None or self._ours(attrs):
                    continue
                # Another host took our key: we move, and it becomes a peer.
            old = self._peers.pop(ev.name, None)
            new = self._peer_of(ev.name, ev.value) if ev.kind == "put" else None
            if new is not None:
                self._peers[ev.name] = new
            # The same rule as for a listing, over the one name this event is about.
            out += diff_peers(_only(ev.name, old), _only(ev.name, new))
        return out

    @property
    def lease_lost(self) -> bool:
        """Our key was deleted, expired or taken, and no new lease is held yet."""
        return self._lost.is_set()

    def peers(self) -> list[PeerLease]:
        """The peers as currently known."""
        return list(self._peers.values())

    async def watch(
        self, on_batch: BatchHandler, on_listed: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Snapshot then watch the leases forever, handing peer changes to `on_batch`.

        `on_listed` is awaited after each full listing has been handed over (at start and
        after a compaction), even when it changed nothing: from then on the peer set is
        complete, which a backend needs to know before it removes entries of peers that
        are gone (at start the kernel still holds what the last run programmed).
        """
        backoff = Backoff(cap=self.backoff_cap, rng=self.rng)
        outage = OutageLog(log, "watching subnet leases")
        next_rev: int | None = None
        while True:
            try:
                if next_rev is None:
                    first, self._first_listing = self._first_listing, None
                    self._watching = True
                    if first is not None:
                        snap, decoded = first.snap, first.decoded
                    else:
                        snap, decoded = await self.registry.list_subnets(), None
                    self.counters.relists += 1  # the start's listing counts, made once
                    del first
                    self.batch_received = time.monotonic()
                    events = self._apply_snapshot(snap, decoded)
                    next_rev = snap.revision + 1
                    # This frame lives as long as the watch: keeping the listing (every
                    # value as bytes, ~300 bytes a peer) would hold it until the next one.
                    del snap, decoded
                    self.etcd_reachable = True
                    outage.ok()
                    backoff.reset()
                    if events:
                        await on_batch(events)
                    del events  # one PeerEvent per peer, as for the listing above
                    if on_listed is not None:
                        await on_listed()
                follow = _Follow(next_rev)
                try:
                    await self._follow(follow, on_batch, outage, backoff)
                finally:
                    next_rev = follow.next_rev
            except Compacted as exc:
                log.warning("%s; listing the leases again", exc)
                next_rev = None
            except RegistryUnavailable as exc:
                self.counters.watch_reconnects += 1
                await self._etcd_away(exc, outage, backoff)

    async def _follow(
        self, follow: _Follow, on_batch: BatchHandler, outage: OutageLog, backoff: Backoff
    ) -> None:
        """Watch from follow.next_rev and hand the changes over, until the stream fails.

        The stream is read by a task of its own, so that responses arriving while
        `on_batch` runs (the kernel being programmed) wait in a list and go over together
        next time: one kernel sync for all of them instead of one each. Handed over one
        response at a time, an agent with a sync of 20 ms fell behind 100 changes per
        second, and ever further. Raises what the stream raised, once everything received
        before it has been handed over (follow.next_rev says where to resume).
        """
        pending: list[tuple[float, list[Event]]] = []
        arrived = asyncio.Event()
        failed: list[Exception] = []

        async def read() -> None:
            try:
                stream = self.registry.watch_subnets(follow.next_rev)
                async with contextlib.aclosing(stream):
                    async for batch in stream:
                        self.etcd_reachable = True
                        outage.ok()
                        backoff.reset()
                        if batch:
                            pending.append((time.monotonic(), batch))
                            arrived.set()
            except Exception as exc:  # handed to the caller, after what came before it
                failed.append(exc)
            else:
                failed.append(RegistryUnavailable("the watch stream ended"))
            arrived.set()

        reader = asyncio.create_task(read(), name="lease-watch-reader")
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                if pending:
                    group = pending[:]
                    del pending[:]
                    # The delay of a group is that of its oldest change.
                    self.batch_received = group[0][0]
                    events: list[PeerEvent] = []
                    for _, batch in group:
                        follow.next_rev = batch[-1].revision + 1
                        events += self._apply_events(batch)
                    del group
                    if events:
                        await on_batch(events)
                    del events
                    continue  # more may have arrived meanwhile; the reader set `arrived`
                if failed:
                    raise failed[0]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@dataclass
class _Listing:
    """A listing and what of it was decoded: subnets/ name -> (subnet, attrs or None)."""

    snap: Snapshot
    decoded: dict[str, tuple[SubnetKey, LeaseAttrs | None]]


@dataclass
class _Follow:
    """Where a watch resumes: the revision after the last change handed over."""

    next_rev: int


def _inside(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network,
            network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """subnet.subnet_of(network) without its side effect: subnet_of caches the broadcast
    address in the subnet's instance dict, and the subnet is kept for as long as the peer
    (about 110 bytes per peer)."""
    return (subnet.prefixlen >= network.prefixlen
            and int(subnet.network_address) & int(network.netmask)
            == int(network.network_address))


def _only(name: str, peer: PeerLease | None) -> dict[str, PeerLease]:
    """`name` -> `peer` as a listing of one, or an empty one when there is no peer."""
    return {} if peer is None else {name: peer}
