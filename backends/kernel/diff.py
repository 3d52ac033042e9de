"""Desired-table diff: the entries we want against the kernel's, as one set of changes.

Pure logic, no I/O (Calico Felix's shape: keep the desired table, diff on every event
batch and on every periodic resync). Works for routes (keyed by destination), neighbours
(keyed by IP) and FDB entries (keyed by MAC). Only entries the caller says it owns are
ever deleted, so entries made by others are left alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from backends.kernel.types import Route


class _Key(Hashable, Protocol):
    """A key of a table: hashable, and ordered so that changes come out sorted."""

    def __lt__(self, other: Any, /) -> bool: ...


T = TypeVar("T")
K = TypeVar("K", bound=_Key)


@dataclass(frozen=True)
class Diff(Generic[T]):
    """What to do to the kernel to reach the desired table."""

    replace: tuple[T, ...]
    delete: tuple[T, ...]

    def __bool__(self) -> bool:
        return bool(self.replace or self.delete)


def diff_entries(
    desired: Mapping[K, T],
    actual: Iterable[T],
    key: Callable[[T], K],
    owned: Callable[[T], bool],
) -> Diff[T]:
    """Entries to replace (missing or different) and to delete (owned, not desired)."""
    have: dict[K, list[T]] = {}
    for item in actual:
        have.setdefault(key(item), []).append(item)
    replace = [item for k, item in desired.items() if have.get(k) != [item]]
    delete = [
        item
        for k, items in have.items()
        for item in items
        if owned(item) and (k not in desired or item != desired[k])
        # A differing owned entry under a desired key is replaced, not deleted, unless
        # there are several (then the extras go).
        and (k not in desired or len(items) > 1)
    ]
    return Diff(tuple(sorted(replace, key=key)), tuple(sorted(delete, key=key)))


def diff_routes(
    desired: Mapping[ipaddress.IPv4Network, Route],
    actual: Iterable[Route],
    owned: Callable[[Route], bool],
) -> Diff[Route]:
    """Routes to replace (missing or different) and to delete (owned but not desired)."""
    return diff_entries(desired, actual, lambda r: r.dst, owned)
