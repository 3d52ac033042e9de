"""KernelSync: bring the kernel to a backend's desired state, now and every resync period.

A backend supplies `plan()`, which reads the kernel and returns the ChangeSet that makes it
match the desired tables. KernelSync runs one plan/apply at a time (after each event batch
and every `resync` seconds), logs each change it makes, logs each refused change once per
distinct error, counts them, and says whether the last sync left the kernel as desired.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from backends.netlink import ChangeSet, KernelError, Netlink

log = logging.getLogger(__name__)


def describe(what: str, item: object) -> str:
    """A short `ip`-like description of a route, neighbour or FDB entry."""
    if what == "route":
        r = item
        via = f" via {r.gateway}" if r.gateway is not None else ""  # type: ignore[attr-defined]
        onlink = " onlink" if r.onlink else ""  # type: ignore[attr-defined]
        return f"route {r.dst}{via} oif {r.oif}{onlink}"  # type: ignore[attr-defined]
    if what == "neigh":
        return f"neigh {item.ip} lladdr {item.mac} dev {item.index}"  # type: ignore[attr-defined]
    return f"fdb {item.mac} dst {item.dst} dev {item.index}"  # type: ignore[attr-defined]


class KernelSync:
    """One desired state, applied on demand and periodically."""

    def __init__(
        self, netlink: Netlink, plan: Callable[[], Awaitable[ChangeSet]], resync: float
    ) -> None:
        self.netlink = netlink
        self.plan = plan
        self.resync = resync
        self.errors = 0
        self.repairs = 0
        self._lock = asyncio.Lock()
        self._ok = False
        self._reported: set[tuple[str, str]] = set()

    def ready(self) -> bool:
        return self._ok

    async def sync(self) -> bool:
        """Plan and apply; True if anything had to change."""
        async with self._lock:
            cs = await self.plan()
            if not cs:
                self._ok = True
                return False
            errors = await self.netlink.apply(cs)
            failed = {id(e.item) for e in errors}
            for what, op, items in (
                ("route", "delete", cs.route_delete), ("neigh", "delete", cs.neigh_delete),
                ("fdb", "delete", cs.fdb_delete), ("fdb", "replace", cs.fdb_replace),
                ("neigh", "replace", cs.neigh_replace), ("route", "replace", cs.route_replace),
            ):
                for item in items:
                    if id(item) not in failed:
                        log.info("%s %s", "removed" if op == "delete" else "set",
                                 describe(what, item))
            self._report(errors)
            self._ok = not errors
            return True

    def _report(self, errors: list[KernelError]) -> None:
        for e in errors:
            self.errors += 1
            text = describe(e.what, e.item)
            if (text, e.error) not in self._reported:
                self._reported.add((text, e.error))
                log.error("cannot %s %s: %s", e.op, text, e.error)

    async def run(self) -> None:
        """Resync forever; a kernel state changed behind our back is put right."""
        while True:
            await asyncio.sleep(self.resync)
            try:
                if await self.sync():
                    self.repairs += 1
                    log.info("resync repaired the kernel state")
            except OSError as exc:
                log.error("resync failed: %s", exc)
