"""Route table diff: the desired routes against the kernel's, as one set of changes.

Pure logic, no I/O (Calico Felix's shape: keep the desired table, diff on every event
batch and on every periodic resync). Only routes the caller says it owns are ever
deleted, so routes made by others are left alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from backends.netlink import Route


@dataclass(frozen=True)
class RouteDiff:
    """What to do to the kernel to reach the desired table."""

    replace: tuple[Route, ...]
    delete: tuple[Route, ...]

    def __bool__(self) -> bool:
        return bool(self.replace or self.delete)


def diff_routes(
    desired: Mapping[ipaddress.IPv4Network, Route],
    actual: Iterable[Route],
    owned: Callable[[Route], bool],
) -> RouteDiff:
    """Routes to replace (missing or different) and to delete (owned but not desired)."""
    have: dict[ipaddress.IPv4Network, list[Route]] = {}
    for r in actual:
        have.setdefault(r.dst, []).append(r)
    replace = [r for dst, r in sorted(desired.items()) if have.get(dst) != [r]]
    delete = [
        r
        for dst, routes in sorted(have.items())
        for r in routes
        if owned(r) and dst not in desired
    ]
    return RouteDiff(tuple(replace), tuple(delete))
