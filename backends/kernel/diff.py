"""Desired-table diff: the entries we want against the kernel's, as one set of changes.

Pure logic, no I/O (Calico Felix's shape: keep the desired table, diff on every event
batch and on every periodic resync). Works for routes (keyed by destination), neighbours
(keyed by IP) and FDB entries (keyed by MAC). Only entries the caller says it owns are
ever deleted, so entries made by others are left alone. `diff_keys` is the same diff over
some keys only, for a plan that knows which keys changed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
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
    return diff_keys(desired, desired.keys() | have.keys(), lambda k: have.get(k, []), owned)


def diff_keys(
    desired: Mapping[K, T],
    keys: Iterable[K],
    have: Callable[[K], Sequence[T]],
    owned: Callable[[T], bool],
) -> Diff[T]:
    """The same diff as `diff_entries`, for `keys` only, with the kernel's entries under a
    key from `have`: what a plan needs when only those keys can have changed."""
    replace: list[T] = []
    delete: list[T] = []
    for k in sorted_keys(keys):
        items = have(k)
        want = desired.get(k)
        if want is not None and (len(items) != 1 or items[0] != want):
            replace.append(want)
        for item in items:
            # A differing owned entry under a desired key is replaced, not deleted, unless
            # there are several (then the extras go).
            if owned(item) and (want is None or (item != want and len(items) > 1)):
                delete.append(item)
    return Diff(tuple(replace), tuple(delete))


def diff_routes(
    desired: Mapping[ipaddress.IPv4Network, Route],
    actual: Iterable[Route],
    owned: Callable[[Route], bool],
) -> Diff[Route]:
    """Routes to replace (missing or different) and to delete (owned but not desired)."""
    return diff_entries(desired, actual, lambda r: r.dst, owned)


def _network_order(n: ipaddress.IPv4Network) -> tuple[int, int]:
    return int(n.network_address), n.prefixlen


def sorted_keys(keys: Iterable[K]) -> list[K]:
    """`keys` in their natural order (that of the ipaddress types for networks and
    addresses), sorted on plain integers: IPv4Network's own comparison runs in Python and
    made sorting 20,000 routes take 90 ms instead of 11."""
    out = list(keys)
    if out and isinstance(out[0], ipaddress.IPv4Network):
        out.sort(key=_network_order)  # type: ignore[arg-type]
    elif out and isinstance(out[0], ipaddress.IPv4Address):
        out.sort(key=int)  # type: ignore[arg-type]
    else:
        out.sort()
    return out
