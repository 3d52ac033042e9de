"""Registry: the small interface between the lease manager and the store of leases.

The store is etcd in production (`agent.etcd_registry`); `MemoryRegistry` here is an
in-memory twin with the same semantics (revisions, TTL leases, compare-version creates,
watches that resume from a revision and can be compacted) for fast tests without etcd.
Keys are subnet key names (`10.5.30.0-24`), not full etcd paths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Protocol


class RegistryUnavailable(ConnectionError):
    """The store could not be reached, or did not answer in time. Retry later."""


class Compacted(RuntimeError):
    """The watch's start revision has been compacted away: re-list and diff."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch history compacted up to revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class Record:
    """One key under `subnets/` as stored. A listing holds one per lease (20,000 at
    scale): slots, no instance dict."""

    name: str
    value: bytes
    lease_id: int  # 0: no TTL (a reservation)
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    """A change to one key under `subnets/`."""

    kind: str  # "put" or "delete"
    name: str
    value: bytes
    lease_id: int
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """All keys under `subnets/` at one revision."""

    records: list[Record]
    revision: int


class Registry(Protocol):
    """What the lease manager needs from the store.

    The watches are async generators, so a caller can close one it leaves early
    (contextlib.aclosing) and the stream behind it is released at once.
    """

    #: (operation, "ok" | "error") -> count, for tweed_etcd_requests_total.
    requests: dict[tuple[str, str], int]
    #: why ("no_leader" | "unreachable") -> how often calls moved to another etcd member,
    #: for tweed_etcd_member_switches_total (a store of one member never moves).
    member_switches: dict[str, int]

    async def get_config(self) -> tuple[bytes | None, int]:
        """The config value (None if absent) and the store revision."""
        ...

    def watch_config(
        self, start_revision: int
    ) -> AsyncGenerator[tuple[bytes | None, int], None]:
        """Yield (value, revision) each time the config changes (value None: deleted)."""
        ...

    async def list_subnets(self) -> Snapshot:
        """Every key under subnets/ and the revision they were read at."""
        ...

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> int | None:
        """Create `name` if it does not exist, with a fresh TTL lease (ttl=0: none).

        Returns the store revision, or None if the key already exists (a lost race).
        """
        ...

    async def update_subnet(
        self, name: str, value: bytes, ttl: int, if_mod_revision: int
    ) -> int | None:
        """Rewrite `name` with a fresh TTL lease (ttl=0: none, a reservation stays one).

        Only if the key is unchanged since `if_mod_revision`; returns the new revision, or
        None if the key is gone or was changed by someone else.
        """
        ...

    async def delete_subnet(self, name: str) -> None:
        """Delete a key (used for our own leases that no longer fit the config)."""
        ...

    def watch_subnets(self, start_revision: int) -> AsyncGenerator[list[Event], None]:
        """Yield batches of events from `start_revision` on (all events of one response).

        An empty batch says the stream is (re)established and carries no events.

        Raises Compacted if the revision is gone, RegistryUnavailable if the stream breaks.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass
class _Entry:
    value: bytes
    lease_id: int
    mod_revision: int


class MemoryRegistry:
    """An in-memory Registry: same revision, TTL and watch semantics as etcd."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.revision = 1
        self.compacted = 0
        self.config: bytes | None = None
        self._subnets: dict[str, _Entry] = {}
        self._log: list[Event] = []
        self._leases: dict[int, float] = {}  # lease id -> expiry time
        self._next_lease = 1000
        self._changed = asyncio.Condition()
        self.available = True  # set False to simulate an outage
        #: (operation, "ok" | "error") -> count, as EtcdRegistry keeps for metrics.
        self.requests: dict[tuple[str, str], int] = {}
        self.member_switches: dict[str, int] = {}  # one member: never moves

    # -- helpers for tests ---------------------------------------------------------
    def _check(self, op: str | None = None) -> None:
        """Raise if unavailable; count the request `op` (unary calls only) either way."""
        if op is not None:
            key = (op, "ok" if self.available else "error")
            self.requests[key] = self.requests.get(key, 0) + 1
        if not self.available:
            raise RegistryUnavailable("memory registry is set unavailable")

    def _bump(self) -> int:
        self.revision += 1
        return self.revision

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_change(self) -> None:
        # A short timeout so that flipping `available` is noticed without a notify.
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), 0.05)
            except TimeoutError:
                pass

    async def put(self, name: str, value: bytes, ttl: int = 0) -> None:
        """Write a key as another client would (ttl 0 = no lease)."""
        lease = self._grant(ttl) if ttl else 0
        rev = self._bump()
        self._subnets[name] = _Entry(value, lease, rev)
        self._log.append(Event("put", name, value, lease, rev))
        await self._notify()

    async def delete(self, name: str) -> None:
        """Delete a key as another client would."""
        if name in self._subnets:
            rev = self._bump()
            entry = self._subnets.pop(name)
            self._log.append(Event("delete", name, entry.value, entry.lease_id, rev))
            await self._notify()

    async def expire(self) -> None:
        """Drop the keys whose leases have run out (etcd does this by itself)."""
        now = self._clock()
        for lease, expiry in list(self._leases.items()):
            if expiry <= now:
                del self._leases[lease]
                for name in [n for n, e in self._subnets.items() if e.lease_id == lease]:
                    await self.delete(name)

    def compact(self, revision: int) -> None:
        self.compacted = revision
        self._log = [e for e in self._log if e.revision > revision]

    async def set_config(self, value: bytes | None) -> None:
        self.config = value
        self._bump()
        await self._notify()

    def _grant(self, ttl: int) -> int:
        self._next_lease += 1
        self._leases[self._next_lease] = self._clock() + ttl
        return self._next_lease

    # -- Registry ----------------------------------------------------------------
    async def get_config(self) -> tuple[bytes | None, int]:
        self._check("get_config")
        return self.config, self.revision

    async def watch_config(
        self, start_revision: int
    ) -> AsyncGenerator[tuple[bytes | None, int], None]:
        last = self.config
        while True:
            self._check()
            await self._wait_change()
            self._check()
            if self.config != last:
                last = self.config
                yield last, self.revision

    async def list_subnets(self) -> Snapshot:
        self._check("list_subnets")
        await self.expire()
        records = [
            Record(n, e.value, e.lease_id, e.mod_revision) for n, e in self._subnets.items()
        ]
        return Snapshot(records, self.revision)

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> int | None:
        self._check("create_subnet")
        await self.expire()
        if name in self._subnets:
            return None
        await self.put(name, value, ttl)
        return self.revision

    async def update_subnet(
        self, name: str, value: bytes, ttl: int, if_mod_revision: int
    ) -> int | None:
        self._check("update_subnet")
        await self.expire()
        entry = self._subnets.get(name)
        if entry is None or entry.mod_revision != if_mod_revision:
            return None
        await self.put(name, value, ttl)
        return self.revision

    async def delete_subnet(self, name: str) -> None:
        self._check("delete_subnet")
        await self.delete(name)

    async def watch_subnets(self, start_revision: int) -> AsyncGenerator[list[Event], None]:
        nxt = start_revision
        while True:
            self._check()
            if nxt <= self.compacted:
                raise Compacted(self.compacted)
            batch = [e for e in self._log if e.revision >= nxt]
            if batch:
                # One batch per revision, as etcd never splits a revision across responses.
                first = [e for e in batch if e.revision == batch[0].revision]
                nxt = first[-1].revision + 1
                yield first
                continue
            await self._wait_change()

    async def close(self) -> None:
        return None
