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
    """Entries to replace (missing or different) and to delete (owned, not desired).

    The same diff as `diff_keys` over every key of either side, without a list per key,
    a set of all keys or a sorted copy of them: at a full read of 5,000 peers those were
    about 1 MB of objects per table made and dropped at once, which left the allocator's
    high-water mark (RSS) higher after each backstop resync. Only the changes are sorted."""
    have: dict[K, T | _Many[T]] = {}
    for item in actual:
        k = key(item)
        old = have.get(k)
        if old is None:
            have[k] = item
        elif isinstance(old, _Many):
            old.append(item)
        else:
            have[k] = _Many((old, item))
    replace: list[tuple[K, T]] = []
    delete: list[tuple[K, T]] = []
    for k, want in desired.items():
        slot = have.get(k)
        if slot is None:
            replace.append((k, want))
        elif not isinstance(slot, _Many):
            if slot != want:
                replace.append((k, want))  # a differing entry is replaced, not deleted
        else:
            replace.append((k, want))
            # Several under a desired key: the extras go (all but one equal to `want`).
            delete += ((k, item) for item in slot if owned(item) and item != want)
    for k, slot in have.items():
        if k not in desired:
            delete += ((k, item) for item in _slot_items(slot) if owned(item))
    return Diff(_in_key_order(replace), _in_key_order(delete))


class _Many(list[T]):
    """Several entries under one key of `diff_entries`' index (rare: most keys hold one)."""

    __slots__ = ()


def _slot_items(slot: T | _Many[T]) -> Sequence[T]:
    return slot if isinstance(slot, _Many) else (slot,)


def _in_key_order(pairs: list[tuple[K, T]]) -> tuple[T, ...]:
    """The entries of (key, entry) pairs in `sorted_keys`' order of their keys; entries
    under one key stay in the order given (the sort is stable)."""
    if not pairs:
        return ()
    order = _order_of(pairs[0][0])
    if order is None:
        pairs.sort(key=lambda p: p[0])
    else:
        pairs.sort(key=lambda p: order(p[0]))
    return tuple(item for _, item in pairs)


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


def _order_of(k: object) -> Callable[[Any], Any] | None:
    """A sort key for keys like `k` giving their natural order on plain integers (None:
    their own comparison is fast enough)."""
    if isinstance(k, ipaddress.IPv4Network):
        return _network_order
    if isinstance(k, ipaddress.IPv4Address):
        return int
    return None


def sorted_keys(keys: Iterable[K]) -> list[K]:
    """`keys` in their natural order (that of the ipaddress types for networks and
    addresses), sorted on plain integers: IPv4Network's own comparison runs in Python and
    made sorting 20,000 routes take 90 ms instead of 11."""
    out = list(keys)
    order = _order_of(out[0]) if out else None
    if order is None:
        out.sort()
    else:
        out.sort(key=order)
    return out
