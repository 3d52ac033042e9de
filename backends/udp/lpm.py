"""Longest-prefix-match table from IP addresses (IPv4 or IPv6) to values, built for the
packet path.

Pure logic, no I/O. One dict per prefix length, keyed by the masked address; a lookup
tries the lengths present, longest first. Peer subnets usually share one length, so a
lookup is typically one mask and one dict probe. One table holds one family: its width
(32 or 128 bits) is fixed when it is made, and addresses are plain integers.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

V = TypeVar("V")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteTable(Generic[V]):
    """subnet -> value, looked up by address with longest-prefix match; `width` is 32
    for IPv4 and 128 for IPv6."""

    def __init__(self, width: int = 32) -> None:
        if width not in (32, 128):
            raise ValueError("width: 32 (IPv4) or 128 (IPv6)")
        self.width = width
        self._all = (1 << width) - 1
        self._tables: dict[int, dict[int, V]] = {}
        # (mask, table) pairs, longest prefix first; rebuilt on change, read per packet.
        self.levels: list[tuple[int, dict[int, V]]] = []

    def _rebuild(self) -> None:
        self.levels = [
            ((self._all << (self.width - plen)) & self._all, self._tables[plen])
            for plen in sorted(self._tables, reverse=True)
        ]

    def _check(self, subnet: Network) -> None:
        if subnet.max_prefixlen != self.width:
            raise ValueError(f"{subnet} is not an IPv{4 if self.width == 32 else 6} subnet")

    def set(self, subnet: Network, value: V) -> None:
        self._check(subnet)
        table = self._tables.get(subnet.prefixlen)
        if table is None:
            table = self._tables[subnet.prefixlen] = {}
            self._rebuild()
        table[int(subnet.network_address)] = value

    def delete(self, subnet: Network) -> V | None:
        self._check(subnet)
        table = self._tables.get(subnet.prefixlen)
        if table is None:
            return None
        value = table.pop(int(subnet.network_address), None)
        if not table:
            del self._tables[subnet.prefixlen]
            self._rebuild()
        return value

    def lookup(self, addr: int) -> V | None:
        for mask, table in self.levels:
            value = table.get(addr & mask)
            if value is not None:
                return value
        return None

    def items(self) -> list[tuple[Network, V]]:
        make = ipaddress.IPv4Network if self.width == 32 else ipaddress.IPv6Network
        return [
            (make((net, plen)), value)
            for plen, table in sorted(self._tables.items(), reverse=True)
            for net, value in sorted(table.items())
        ]

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())
