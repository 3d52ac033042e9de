"""Kernel value types and the `Netlink` protocol the backends program the kernel through.

Pure: no I/O. Routes, neighbours, FDB entries, links and vxlan devices as frozen values, the
ChangeSet a backend asks for in one hop, the KernelError for a refused change, and the
protocol that both the pyroute2 adapter (`backends.kernel.netlink`) and the in-memory fake
(`backends.kernel.fake`) implement.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

VXLAN_DEFAULT_PORT = 8472


@dataclass(frozen=True, order=True, slots=True)
class Route:
    """An IPv4 route in the main table."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    oif: int
    onlink: bool = False


@dataclass(frozen=True)
class Link:
    """A network interface and its IPv4 addresses."""

    name: str
    index: int
    mtu: int
    up: bool
    addresses: tuple[ipaddress.IPv4Interface, ...]
    kind: str = ""
    mac: str = ""


@dataclass(frozen=True, order=True, slots=True)
class Neigh:
    """A permanent ARP entry: `ip` has hardware address `mac` on device `index`."""

    ip: ipaddress.IPv4Address
    mac: str
    index: int


@dataclass(frozen=True, order=True, slots=True)
class Fdb:
    """A forwarding entry of a vxlan device: frames for `mac` go to the VTEP at `dst`."""

    mac: str
    dst: ipaddress.IPv4Address
    index: int


@dataclass(frozen=True)
class VxlanSpec:
    """What a vxlan device must look like; two specs equal means the device can be reused."""

    name: str
    vni: int
    local: ipaddress.IPv4Address
    link: int  # index of the underlay device
    port: int  # 0: the kernel's default (8472)
    learning: bool = False
    gbp: bool = False


@dataclass(frozen=True)
class VxlanDevice:
    """A vxlan device found in the kernel."""

    spec: VxlanSpec
    index: int
    mac: str
    mtu: int
    up: bool
    addresses: tuple[ipaddress.IPv4Interface, ...]


#: One kernel entry a ChangeSet may hold.
Entry = Route | Neigh | Fdb


@dataclass
class ChangeSet:
    """Kernel changes applied in one hop, in an order that never leaves a route dangling:
    routes are deleted first and added last, after the neighbours and FDB entries."""

    route_replace: list[Route] = field(default_factory=list)
    route_delete: list[Route] = field(default_factory=list)
    neigh_replace: list[Neigh] = field(default_factory=list)
    neigh_delete: list[Neigh] = field(default_factory=list)
    fdb_replace: list[Fdb] = field(default_factory=list)
    fdb_delete: list[Fdb] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.route_replace, self.route_delete, self.neigh_replace,
                    self.neigh_delete, self.fdb_replace, self.fdb_delete))

    def steps(self) -> list[tuple[str, str, Sequence[Entry]]]:
        """(kind, op, entries) in the order they must be applied; the one place that
        order is written (the adapter, the fake and KernelSync's log all follow it)."""
        return [
            ("route", "delete", self.route_delete), ("neigh", "delete", self.neigh_delete),
            ("fdb", "delete", self.fdb_delete), ("fdb", "replace", self.fdb_replace),
            ("neigh", "replace", self.neigh_replace), ("route", "replace", self.route_replace),
        ]


@dataclass(frozen=True)
class KernelError:
    """One change the kernel refused."""

    what: str  # "route", "neigh" or "fdb"
    op: str  # "replace" or "delete"
    item: Entry
    error: str


class Netlink(Protocol):
    """The idempotent kernel calls the backends need."""

    async def links(self) -> list[Link]:
        """Every interface with its IPv4 addresses."""
        ...

    async def route_get_oif(self, dst: ipaddress.IPv4Address) -> int | None:
        """The interface index the kernel would use to reach `dst`."""
        ...

    async def default_route_oif(self) -> int | None:
        """The interface of the IPv4 default route, if any."""
        ...

    async def routes(self, oif: int | None = None) -> list[Route]:
        """IPv4 routes of the main table, on `oif` if given."""
        ...

    async def neighbours(self, index: int) -> list[Neigh]:
        """Permanent IPv4 neighbours of device `index`."""
        ...

    async def fdb_entries(self, index: int) -> list[Fdb]:
        """Forwarding entries (self, with a destination) of device `index`."""
        ...

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        """Apply a change set; the changes the kernel refused come back."""
        ...

    async def configure_link(
        self, name: str, address: ipaddress.IPv4Interface, mtu: int, txqlen: int
    ) -> int:
        """Give device `name` this address, MTU and queue length, up; its index."""
        ...

    async def find_vxlan(self, name: str) -> VxlanDevice | None:
        """The vxlan device of that name, if there is one."""
        ...

    async def ensure_vxlan(
        self, spec: VxlanSpec, mac: str, mtu: int, address: ipaddress.IPv4Interface
    ) -> VxlanDevice:
        """A vxlan device as `spec` says (reused when compatible), up, with `address`."""
        ...

    async def close(self) -> None:
        ...
