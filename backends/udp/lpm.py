"""Longest-prefix-match table from IPv4 addresses to values, built for the packet path.

Pure logic, no I/O. One dict per prefix length, keyed by the masked address; a lookup
tries the lengths present, longest first. Peer subnets usually share one length, so a
lookup is typically one mask and one dict probe.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

V = TypeVar("V")


class RouteTable(Generic[V]):
    """subnet -> value, looked up by address with longest-prefix match."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, V]] = {}
        # (mask, table) pairs, longest prefix first; rebuilt on change, read per packet.
        self.levels: list[tuple[int, dict[int, V]]] = []

    def _rebuild(self) -> None:
        self.levels = [
            ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, self._tables[plen])
            for plen in sorted(self._tables, reverse=True)
        ]

    def set(self, subnet: ipaddress.IPv4Network, value: V) -> None:
        table = self._tables.get(subnet.prefixlen)
        if table is None:
            table = self._tables[subnet.prefixlen] = {}
            self._rebuild()
        table[int(subnet.network_address)] = value

    def delete(self, subnet: ipaddress.IPv4Network) -> V | None:
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

    def items(self) -> list[tuple[ipaddress.IPv4Network, V]]:
        return [
            (ipaddress.IPv4Network((net, plen)), value)
            for plen, table in sorted(self._tables.items(), reverse=True)
            for net, value in sorted(table.items())
        ]

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())
