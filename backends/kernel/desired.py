"""DesiredTables: the routes, neighbours and FDB entries a routed backend wants, kept per
peer change, with the keys each change touched.

Pure, no I/O. Rebuilding every peer's entries and diffing all of them against the kernel
after each batch of lease changes costs ~100 ms of Python at 5,000 peers; a batch of one
changed peer touches one route, one neighbour and one FDB entry. So a backend `put`s the
entries of a peer that arrived and `drop`s those of a peer that left or changed, and the
next plan diffs only the keys `take_dirty` returns (when KernelSync says the kernel is as
the last plan left it) or everything (otherwise).

Two peers may want the same key (two leases with the same VtepMAC, a misconfiguration).
Which entry then wins must not depend on the order the changes arrived in, so the tables
count such keys and mark themselves `stale`: the next plan rebuilds them from all peers
(`load`, in subnet order, the last one winning, as a rebuild always did) and diffs in full.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backends.kernel.types import Fdb, Neigh, Route


@dataclass(frozen=True, slots=True)
class PeerEntries:
    """What the kernel holds for one peer: a route, and on vxlan a neighbour and FDB entry."""

    route: Route
    neigh: Neigh | None = None
    fdb: Fdb | None = None


@dataclass
class Dirty:
    """Keys whose desired entry changed since the last plan, per table."""

    routes: set[ipaddress.IPv4Network]
    neigh: set[ipaddress.IPv4Address]
    fdb: set[str]


class DesiredTables:
    """The three desired tables, the keys changed since `take_dirty`, and whether they must
    be rebuilt from the peers (`stale`)."""

    __slots__ = ("_dirty", "_shared", "fdb", "neigh", "routes", "stale")

    def __init__(self) -> None:
        self.routes: dict[ipaddress.IPv4Network, Route] = {}
        self.neigh: dict[ipaddress.IPv4Address, Neigh] = {}
        self.fdb: dict[str, Fdb] = {}
        #: The tables may not say what a rebuild from the peers would: rebuild, diff all.
        self.stale = False
        self._dirty = Dirty(set(), set(), set())
        # (table, key) -> how many peers want it, for keys wanted by more than one.
        self._shared: dict[tuple[str, object], int] = {}

    def put(self, e: PeerEntries) -> None:
        """A peer's entries join the tables."""
        self._put("route", self.routes, self._dirty.routes, e.route.dst, e.route)
        if e.neigh is not None:
            self._put("neigh", self.neigh, self._dirty.neigh, e.neigh.ip, e.neigh)
        if e.fdb is not None:
            self._put("fdb", self.fdb, self._dirty.fdb, e.fdb.mac, e.fdb)

    def drop(self, e: PeerEntries) -> None:
        """The entries a peer wanted (as `put` then) leave the tables."""
        self._drop("route", self.routes, self._dirty.routes, e.route.dst)
        if e.neigh is not None:
            self._drop("neigh", self.neigh, self._dirty.neigh, e.neigh.ip)
        if e.fdb is not None:
            self._drop("fdb", self.fdb, self._dirty.fdb, e.fdb.mac)

    def _put(
        self, name: str, table: dict[Any, Any], dirty: set[Any], key: object, value: object
    ) -> None:
        # One lookup, not `in` then a store: an IPv4Network hashes in Python (~0.5 us),
        # and a cold start puts 20,000 of them.
        if table.setdefault(key, value) is not value:
            self._shared[(name, key)] = self._shared.get((name, key), 1) + 1
            self.stale = True
            return
        dirty.add(key)

    def _drop(
        self, name: str, table: dict[Any, Any], dirty: set[Any], key: object
    ) -> None:
        users = self._shared.get((name, key)) if self._shared else None
        if users is not None:
            if users > 2:
                self._shared[(name, key)] = users - 1
            else:
                del self._shared[(name, key)]
            self.stale = True
            return
        if table.pop(key, None) is not None:
            dirty.add(key)

    def load(self, peers: Iterable[PeerEntries]) -> None:
        """Rebuild from every peer's entries, in the order given (the last wins a shared
        key); every key counts as changed, and the tables are no longer stale."""
        for table in (self.routes, self.neigh, self.fdb):
            table.clear()
        self._shared.clear()
        for e in peers:
            self._load("route", self.routes, e.route.dst, e.route)
            if e.neigh is not None:
                self._load("neigh", self.neigh, e.neigh.ip, e.neigh)
            if e.fdb is not None:
                self._load("fdb", self.fdb, e.fdb.mac, e.fdb)
        self._dirty = Dirty(set(self.routes), set(self.neigh), set(self.fdb))
        self.stale = False

    def _load(self, name: str, table: dict[Any, Any], key: object, value: object) -> None:
        if key in table:
            self._shared[(name, key)] = self._shared.get((name, key), 1) + 1
        table[key] = value

    def take_dirty(self) -> Dirty:
        """The keys changed since the last call (and forget them)."""
        dirty, self._dirty = self._dirty, Dirty(set(), set(), set())
        return dirty
