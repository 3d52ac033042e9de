"""KernelView: the kernel reads of a KernelSync, cached between real dumps.

A backend's plan reads every route, neighbour and FDB entry tweed may own and diffs its
desired tables against them; with thousands of peers that dump costs tens of milliseconds
per sync, after every batch of lease changes. While a KernelMonitor reports drift, the kernel
holds what was last read plus what was applied since, so the view keeps each dump per
(kind, device) after the first real read and updates it entry by entry from every applied
ChangeSet, with the kernel's own keys: `route replace` replaces the route to that
destination in the main table whatever its device; a neighbour is keyed by (IP, device);
an FDB entry by (MAC, device). A change the kernel refused drops that device's cache.

A full read keeps no second copy of what the plan already holds: the view's `known` (set
by KernelSync from the desired tables) hands back the desired entry itself wherever a
dumped one equals it, and a netlink that can (`SharedDumps`: the real one) does so while
each part of the dump is decoded, so that 15,000 dumped entries are never all alive at
once (at 5,000 vxlan peers they were ~3.5 MB made and dropped at every backstop resync,
which raised the allocator's high-water mark, RSS, by as much).

KernelSync drops the whole cache (`invalidate`) on drift, on lost notifications, at every
backstop resync and after any exception, so none of those can be hidden: the next read
is a real dump. Until `enabled` (KernelSync sets it while its monitor runs) every read is a
real dump and nothing is kept: without notifications there is nothing to trust a cache by.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar, cast, runtime_checkable

from backends.kernel.types import ChangeSet, Entry, Fdb, KernelError, Neigh, Netlink, Route

T = TypeVar("T", Route, Fdb)
K = TypeVar("K", bound=Hashable)
S = TypeVar("S")
#: A key's entries: one (nearly always), or a list of several. A list per key cost about
#: 90 bytes a peer per table.
Slot: TypeAlias = "T | list[T]"
#: An entry the caller already holds that equals the one given, or the one given.
Known: TypeAlias = Callable[[Entry], Entry]


@runtime_checkable
class SharedDumps(Protocol):
    """A Netlink whose dumps pass each entry through `known` as it is decoded
    (backends.kernel.netlink.IPRouteNetlink)."""

    async def dump(self, what: str, key: int | None, known: Known | None) -> list[Entry]:
        """Routes ("route", key: the oif or None), neighbours or FDB entries ("neigh",
        "fdb", key: the device), as the three reads of `Netlink` return them."""
        ...


def _items(slot: Slot[T] | None) -> list[T]:
    if slot is None:
        return []
    return slot if isinstance(slot, list) else [slot]


def _route_key(r: Route) -> ipaddress.IPv4Network:
    return r.dst


def _neigh_key(n: Neigh) -> ipaddress.IPv4Address:
    return n.ip


def _fdb_key(f: Fdb) -> str:
    return f.mac


def _index(items: Iterable[T], key: Callable[[T], K]) -> dict[K, Slot[T]]:
    out: dict[K, Slot[T]] = {}
    for item in items:
        k = key(item)
        old = out.get(k)
        if old is None:
            out[k] = item
        else:
            many = _items(old)[:]
            many.append(item)
            out[k] = many
    return out


def _remove(table: dict[K, Slot[T]], k: K, item: T) -> None:
    slot = table.get(k)
    if slot is None:
        return
    if not isinstance(slot, list):
        if slot == item:
            del table[k]
        return
    if item in slot:
        slot.remove(item)
        if len(slot) == 1:
            table[k] = slot[0]
        elif not slot:
            del table[k]


class KernelView:
    """The read half of `Netlink` (routes, neighbours, fdb_entries) over a real netlink,
    served from a cache kept equal to the kernel by `applied` and `invalidate`."""

    def __init__(self, netlink: Netlink, enabled: bool = False) -> None:
        self.netlink = netlink
        self.enabled = enabled
        #: Real dumps done and reads served from the cache, by kind (route, neigh, fdb).
        self.dumps: dict[str, int] = {"route": 0, "neigh": 0, "fdb": 0}
        self.cached: dict[str, int] = {"route": 0, "neigh": 0, "fdb": 0}
        self._routes: dict[int | None, dict[ipaddress.IPv4Network, Slot[Route]]] = {}
        self._neigh: dict[int, dict[ipaddress.IPv4Address, Neigh]] = {}
        self._fdb: dict[int, dict[str, Slot[Fdb]]] = {}
        #: See the module's docstring; None: dumped entries are kept as they come.
        self.known: Known | None = None
        self._shared = netlink if isinstance(netlink, SharedDumps) else None
        # Bumped by every invalidation: a dump that was under way meanwhile may predate the
        # change that caused it, so it is returned but not kept.
        self._generation = 0

    def invalidate(self) -> None:
        """Forget everything: the next read of each (kind, device) is a real dump."""
        self._generation += 1
        self._routes.clear()
        self._neigh.clear()
        self._fdb.clear()

    @property
    def hits(self) -> int:
        """Reads served from the cache, of every kind."""
        return sum(self.cached.values())

    @property
    def generation(self) -> int:
        """Bumped by every `invalidate`: equal across two instants, nothing was dropped."""
        return self._generation

    # -- lookups in the cache only (None: that device's table is not cached) -----------
    # A lookup is made for a key whose desired entry changed: a peer that left and came
    # back, or changed, has new, equal entries in the plan's tables while the cache still
    # holds the old ones (and their keys), which nothing else references any more. Each
    # lookup hands the cache the plan's own entry instead (`_share`): without it, churn
    # kept a copy of every peer it touched until the next full read (+0.75 MB over 5
    # minutes at 5,000 vxlan peers and 100 changes/s, level only once all were touched).
    def cached_routes(self, oif: int, dst: ipaddress.IPv4Network) -> list[Route] | None:
        table = self._routes.get(oif) if self.enabled else None
        return None if table is None else _items(self._share(table, dst, _route_key))

    def cached_neighbours(self, index: int, ip: ipaddress.IPv4Address) -> list[Neigh] | None:
        table = self._neigh.get(index) if self.enabled else None
        if table is None:
            return None
        n = self._share(table, ip, _neigh_key)
        return [] if n is None else [n]

    def cached_fdb(self, index: int, mac: str) -> list[Fdb] | None:
        table = self._fdb.get(index) if self.enabled else None
        return None if table is None else _items(self._share(table, mac, _fdb_key))

    def _share(self, table: dict[K, Any], k: K, key: Callable[[S], K]) -> Any:
        """table[k] (an entry, a list of several, or None), an entry replaced (key and
        entry) by the equal one `known` holds, if any."""
        slot = table.get(k)
        known = self.known
        if slot is None or known is None or isinstance(slot, list):
            return slot
        want = cast(S, known(cast(Entry, slot)))
        if want is not slot:
            del table[k]  # the old key object goes too: a new key is not kept by `=`
            table[key(want)] = want
        return want

    async def routes(self, oif: int | None = None) -> list[Route]:
        """IPv4 routes of the main table on `oif` (all of them if None: never cached)."""
        table = self._routes.get(oif) if self.enabled and oif is not None else None
        if table is not None:
            self.cached["route"] += 1
            return [r for slot in table.values() for r in _items(slot)]
        gen = self._generation
        self.dumps["route"] += 1
        got = cast(list[Route], await self._dump("route", oif))
        if self.enabled and oif is not None and gen == self._generation:
            self._routes[oif] = _index(got, lambda r: r.dst)
        return got

    async def neighbours(self, index: int) -> list[Neigh]:
        """Permanent IPv4 neighbours of device `index`."""
        table = self._neigh.get(index) if self.enabled else None
        if table is not None:
            self.cached["neigh"] += 1
            return list(table.values())
        gen = self._generation
        self.dumps["neigh"] += 1
        got = cast(list[Neigh], await self._dump("neigh", index))
        if self.enabled and gen == self._generation:
            self._neigh[index] = {n.ip: n for n in got}
        return got

    async def fdb_entries(self, index: int) -> list[Fdb]:
        """Forwarding entries of device `index`."""
        table = self._fdb.get(index) if self.enabled else None
        if table is not None:
            self.cached["fdb"] += 1
            return [f for slot in table.values() for f in _items(slot)]
        gen = self._generation
        self.dumps["fdb"] += 1
        got = cast(list[Fdb], await self._dump("fdb", index))
        if self.enabled and gen == self._generation:
            self._fdb[index] = _index(got, lambda f: f.mac)
        return got

    async def _dump(self, what: str, key: int | None) -> list[Entry]:
        """A real read, its entries passed through `known`: by the netlink as it decodes
        (no more than one part of the dump is ever alive twice), else afterwards."""
        known = self.known
        if known is not None and self._shared is not None:
            return await self._shared.dump(what, key, known)
        got: Sequence[Entry]
        if what == "route":
            got = await self.netlink.routes(key)
        elif what == "neigh":
            assert key is not None
            got = await self.netlink.neighbours(key)
        else:
            assert key is not None
            got = await self.netlink.fdb_entries(key)
        return list(got) if known is None else [known(e) for e in got]

    def adopt(
        self,
        routes: Mapping[ipaddress.IPv4Network, Route],
        neigh: Mapping[ipaddress.IPv4Address, Neigh],
        fdb: Mapping[str, Fdb],
    ) -> None:
        """Keep the desired entries themselves where a dump found their equals: after a
        full read the cache would otherwise hold a second copy of every entry (3 MB at
        5,000 vxlan peers). With `known` set the dump already did; identity is checked
        first, so that this costs no comparison then."""
        for table in self._routes.values():
            for dst, slot in table.items():
                want = routes.get(dst)
                if want is not None and slot is not want and slot == want:
                    table[dst] = want
        for ntable in self._neigh.values():
            for ip, n in ntable.items():
                nwant = neigh.get(ip)
                if nwant is not None and n is not nwant and n == nwant:
                    ntable[ip] = nwant
        for ftable in self._fdb.values():
            for mac, fslot in ftable.items():
                fwant = fdb.get(mac)
                if fwant is not None and fslot is not fwant and fslot == fwant:
                    ftable[mac] = fwant

    def applied(self, cs: ChangeSet, errors: Sequence[KernelError]) -> None:
        """`cs` went to the kernel and `errors` came back: keep the cache equal to what the
        kernel now holds (in the order the changes were applied)."""
        refused = {id(e.item) for e in errors}
        for _what, op, items in cs.steps():
            for item in items:
                if id(item) in refused:
                    self._drop(item)
                elif isinstance(item, Route):
                    self._route(op, item)
                elif isinstance(item, Neigh):
                    self._neighbour(op, item)
                else:
                    self._forward(op, item)

    def _drop(self, item: Route | Neigh | Fdb) -> None:
        # The kernel said no: what it holds for that device is no longer known.
        if isinstance(item, Route):
            self._routes.pop(item.oif, None)
        elif isinstance(item, Neigh):
            self._neigh.pop(item.index, None)
        else:
            self._fdb.pop(item.index, None)

    def _route(self, op: str, r: Route) -> None:
        if op == "delete":
            table = self._routes.get(r.oif)
            if table is not None:
                _remove(table, r.dst, r)
            return
        # Replace keys on the destination in the main table: the route leaves whatever
        # device it was on.
        for table in self._routes.values():
            table.pop(r.dst, None)
        table = self._routes.get(r.oif)
        if table is not None:
            table[r.dst] = r

    def _neighbour(self, op: str, n: Neigh) -> None:
        table = self._neigh.get(n.index)
        if table is None:
            return
        # The kernel deletes by (IP, device), whatever the MAC. A replace pops first: an
        # assignment to a present key keeps the old key object (and with it the old entry's
        # address) alive.
        table.pop(n.ip, None)
        if op != "delete":
            table[n.ip] = n

    def _forward(self, op: str, f: Fdb) -> None:
        table = self._fdb.get(f.index)
        if table is None:
            return
        if op == "delete":
            _remove(table, f.mac, f)
        else:
            table.pop(f.mac, None)  # not only `=`: the old key string would stay
            table[f.mac] = f
