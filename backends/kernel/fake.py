"""FakeNetlink: the `Netlink` protocol in memory, for tests without root.

Keeps routes, neighbours, FDB entries and vxlan devices, records every call, and fails on
demand (`fail(op, item)` returns an error text or None; `link_error` makes device calls
raise an exception that, like pyroute2's NetlinkError, is no OSError). `delete_link` does
what `ip link del` does to a vxlan device and the entries on it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from backends.kernel.types import (
    ChangeSet,
    Fdb,
    KernelError,
    Link,
    Neigh,
    Route,
    VxlanDevice,
    VxlanSpec,
)


class FakeNetlinkError(Exception):
    """What pyroute2's NetlinkError is: an Exception with an errno, and no OSError."""


class FakeNetlink:
    """In-memory stand-in for Netlink: keeps routes, neighbours and FDB entries, records
    calls, fails on demand (`fail(what, op, item)` returns an error text or None)."""

    def __init__(self, links: Iterable[Link] = ()) -> None:
        self._links = list(links)
        self.table: dict[ipaddress.IPv4Network, Route] = {}
        self.neigh: set[Neigh] = set()
        self.fdb: set[Fdb] = set()
        self.vxlan: dict[str, VxlanDevice] = {}
        self.calls: list[tuple[str, object]] = []
        self.fail: Callable[[str, object], str | None] = lambda op, item: None
        #: When set, ensure_vxlan raises FakeNetlinkError with this text.
        self.link_error: str | None = None

    async def links(self) -> list[Link]:
        return list(self._links)

    async def route_get_oif(self, dst: ipaddress.IPv4Address) -> int | None:
        for link in self._links:
            if any(dst in a.network for a in link.addresses):
                return link.index
        return await self.default_route_oif()

    async def default_route_oif(self) -> int | None:
        return self._links[0].index if self._links else None

    async def routes(self, oif: int | None = None) -> list[Route]:
        return [r for r in self.table.values() if oif is None or r.oif == oif]

    async def neighbours(self, index: int) -> list[Neigh]:
        return sorted(n for n in self.neigh if n.index == index)

    async def fdb_entries(self, index: int) -> list[Fdb]:
        return sorted(f for f in self.fdb if f.index == index)

    async def find_vxlan(self, name: str) -> VxlanDevice | None:
        return self.vxlan.get(name)

    async def configure_link(
        self, name: str, address: ipaddress.IPv4Interface, mtu: int, txqlen: int
    ) -> int:
        self.calls.append(("configure_link", (name, address, mtu, txqlen)))
        return 200

    def delete_link(self, name: str) -> int:
        """`ip link del name`: the vxlan device goes, and every entry on it; its index."""
        index = self.vxlan.pop(name).index
        self.table = {k: r for k, r in self.table.items() if r.oif != index}
        self.neigh = {n for n in self.neigh if n.index != index}
        self.fdb = {f for f in self.fdb if f.index != index}
        return index

    async def ensure_vxlan(
        self, spec: VxlanSpec, mac: str, mtu: int, address: ipaddress.IPv4Interface
    ) -> VxlanDevice:
        if self.link_error is not None:
            self.calls.append(("ensure_vxlan_failed", spec))
            raise FakeNetlinkError(self.link_error)
        old = self.vxlan.get(spec.name)
        index = old.index if old is not None and old.spec == spec else 100 + len(self.calls)
        dev = VxlanDevice(spec, index, mac, mtu, True, (address,))
        self.vxlan[spec.name] = dev
        self.calls.append(("ensure_vxlan", dev))
        return dev

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        do: dict[tuple[str, str], Callable[[Any], object]] = {
            ("route", "delete"): lambda r: self.table.pop(r.dst, None),
            ("neigh", "delete"): lambda n: self.neigh.discard(n),
            ("fdb", "delete"): lambda f: self.fdb.discard(f),
            ("fdb", "replace"): self._fdb_replace,
            ("neigh", "replace"): self._neigh_replace,
            ("route", "replace"): lambda r: self.table.__setitem__(r.dst, r),
        }
        errors: list[KernelError] = []
        for what, op, items in cs.steps():
            for item in items:
                self.calls.append((op, item))
                problem = self.fail(op, item)
                if problem:
                    errors.append(KernelError(what, op, item, problem))
                else:
                    do[(what, op)](item)
        return errors

    def _neigh_replace(self, n: Neigh) -> None:
        self.neigh = {x for x in self.neigh if (x.ip, x.index) != (n.ip, n.index)} | {n}

    def _fdb_replace(self, f: Fdb) -> None:
        self.fdb = {x for x in self.fdb if (x.mac, x.index) != (f.mac, f.index)} | {f}

    async def close(self) -> None:
        return None
