"""KernelSync: bring the kernel to a backend's desired state, now and whenever it drifts.

A backend supplies `plan()`, which reads the kernel through `view` (a KernelView: cached
between real dumps while the monitor runs) and returns the ChangeSet that makes it match the
desired tables (and leaves those tables in `desired`); while `trusted` says the kernel is
as the last plan left it, the plan may diff only what its tables changed since. KernelSync runs one
plan/apply at a time: after each event batch; soon after a kernel notification says an
entry of ours was deleted or changed (a KernelMonitor, debounced so that a burst is one
sync); at once after notifications were lost (ENOBUFS); and, as a backstop, every `resync`
seconds. It logs each change it makes, logs each refused change once per distinct error,
counts them, and says whether the last sync left the kernel as desired.

For metrics it also counts kernel operations by kind and result, resyncs by reason and
outcome, notifications by what they meant, lost notifications, and the delay from a batch
of peer events reaching the agent (`expect`) to the first sync after it that left the
kernel as desired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.histogram import Histogram
from backends.kernel.monitor import Desired, KernelEvent, drifted
from backends.kernel.types import ChangeSet, Entry, KernelError, Neigh, Netlink, Route
from backends.kernel.view import KernelView

log = logging.getLogger(__name__)

#: Bucket bounds (seconds) of the event-to-kernel delay: a batch normally takes a few
#: milliseconds; seconds or more mean refused changes put right by a later resync.
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)
#: Batches waiting for a sync that succeeds; a kernel that refuses a change for days must
#: not grow this without bound (the oldest are kept: they carry the longest delays).
MAX_PENDING = 1024
KINDS = ("route", "neigh", "fdb")
OPS = ("replace", "delete")
#: Why a resync ran: the backstop period, a notification of drift, lost notifications.
REASONS = ("period", "event", "lost")
#: Seconds from the first notification of a burst to the sync that answers it: long enough
#: for `ip -batch` or a flushed device to arrive as one burst, short against the 1 s goal.
DEBOUNCE = 0.1


class Monitor(Protocol):
    """A source of kernel notifications (backends.kernel.monitor.KernelMonitor)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


#: Builds a Monitor that calls (on_events, on_lost).
MonitorFactory = Callable[[Callable[[list[KernelEvent]], None], Callable[[], None]], Monitor]


_NOUNS = {"route": ("route", "routes"), "neigh": ("neighbour", "neighbours"),
          "fdb": ("fdb entry", "fdb entries")}


def summary(done: dict[tuple[str, str], int]) -> str:
    """The one INFO line of a sync, from (kind, op) -> changes made: "kernel: set 5000
    routes, 5000 neighbours, 5000 fdb entries; removed 0"."""
    def part(op: str) -> str:
        counts = [(n, _NOUNS[what][n != 1]) for what in KINDS if (n := done.get((what, op)))]
        return ", ".join(f"{n} {noun}" for n, noun in counts) or "0"

    return f"kernel: set {part('replace')}; removed {part('delete')}"


def describe(item: Entry) -> str:
    """A short `ip`-like description of a route, neighbour or FDB entry."""
    if isinstance(item, Route):
        via = f" via {item.gateway}" if item.gateway is not None else ""
        onlink = " onlink" if item.onlink else ""
        return f"route {item.dst}{via} oif {item.oif}{onlink}"
    if isinstance(item, Neigh):
        return f"neigh {item.ip} lladdr {item.mac} dev {item.index}"
    return f"fdb {item.mac} dst {item.dst} dev {item.index}"


class KernelSync:
    """One desired state, applied on demand and periodically."""

    def __init__(
        self, netlink: Netlink, plan: Callable[[], Awaitable[ChangeSet]], resync: float,
        clock: Callable[[], float] = time.monotonic, debounce: float = DEBOUNCE,
    ) -> None:
        self.netlink = netlink
        #: What the plan reads the kernel through: cached between real dumps while the
        #: monitor runs (dropped on drift, lost notifications, the backstop and errors).
        self.view = KernelView(netlink)
        self.plan = plan
        self.resync = resync
        self.clock = clock
        self.debounce = debounce
        #: The tables the last plan wanted; notifications are judged against them.
        self.desired: Desired | None = None
        #: Set by the daemon (`watch`); None: only the periodic backstop repairs drift.
        self.monitor_factory: MonitorFactory | None = None
        #: Notifications by what they meant: "drift" (a sync was asked for) or "ignored"
        #: (echoes of our own writes, entries of others).
        self.events: dict[str, int] = {"drift": 0, "ignored": 0}
        #: Times the kernel dropped notifications (ENOBUFS) and a full re-read followed.
        self.lost = 0
        self._wake = asyncio.Event()
        self._why: str | None = None
        self._gone: set[int] = set()  # devices of ours seen deleted
        #: The last ChangeSet applied, and its entries as sets once an echo needed them.
        self._written: ChangeSet | None = None
        self._echoes: tuple[ChangeSet, set[object], set[object]] | None = None
        self.errors = 0
        self.repairs = 0
        #: (kind, op, result) -> count, e.g. ("route", "replace", "ok").
        self.ops: dict[tuple[str, str, str], int] = {
            (k, o, r): 0 for k in KINDS for o in OPS for r in ("ok", "error")}
        #: Resyncs by (reason, outcome): nothing to change, repaired, or failed (an error
        #: reading the kernel, or a change it refused).
        self.resyncs: dict[tuple[str, str], int] = {
            (reason, result): 0 for reason in REASONS
            for result in ("clean", "repaired", "failed")}
        #: Seconds from a batch of peer events reaching the agent to the kernel programmed.
        self.delay = Histogram(DELAY_BUCKETS)
        self._pending: list[float] = []
        self._lock = asyncio.Lock()
        self._ok = False
        #: Set for the duration of each plan: the view's cache holds exactly what the kernel
        #: held when the last plan's changes were all applied, and nothing was invalidated
        #: since; a plan may then diff only the entries its desired tables changed since.
        self.trusted = False
        self._clean_generation: int | None = None
        #: Plans by scope: "changed" (only the keys the desired tables changed, while
        #: trusted), "full" (every entry); counted by the plans that tell them apart.
        self.plans: dict[str, int] = {"changed": 0, "full": 0}
        self._reported: set[tuple[str, str]] = set()

    def ready(self) -> bool:
        return self._ok

    def expect(self, received: float) -> None:
        """A batch of peer events that reached the agent at `received` (on `clock`) is about
        to change the desired state: its delay is observed by the first sync that starts
        after this call and leaves the kernel as desired."""
        if len(self._pending) < MAX_PENDING:
            self._pending.append(received)

    def _settle(self, pending: list[float], ok: bool) -> None:
        if not ok:
            # Not programmed yet: a later sync (the resync) observes them when it succeeds.
            self._pending[:0] = pending
            del self._pending[MAX_PENDING:]
            return
        now = self.clock()
        for t in pending:
            self.delay.observe(max(0.0, now - t))

    async def sync(self) -> bool:
        """Plan and apply; True if anything had to change."""
        async with self._lock:
            # Taken under the lock: the plan below includes every batch expected so far.
            pending, self._pending = self._pending, []
            gen = self.view.generation
            self.trusted = self.view.enabled and self._clean_generation == gen
            self._clean_generation = None  # until this plan's changes are all applied
            try:
                cs = await self.plan()
            except BaseException:
                self.view.invalidate()
                self._settle(pending, False)
                raise
            finally:
                self.trusted = False
            if not cs:
                self._ok = True
                self._clean(gen)
                self._settle(pending, True)
                return False
            try:
                errors = await self.netlink.apply(cs)
            except BaseException:
                self.view.invalidate()  # some of it may have been applied
                self._settle(pending, False)
                raise
            self.view.applied(cs, errors)
            self._written = cs
            failed = {id(e.item) for e in errors}
            done = {(what, op): 0 for what in KINDS for op in OPS}
            debug = log.isEnabledFor(logging.DEBUG)
            for what, op, items in cs.steps():
                for item in items:
                    result = "error" if id(item) in failed else "ok"
                    self.ops[(what, op, result)] += 1
                    if result == "ok":
                        done[(what, op)] += 1
                        if debug:  # thousands at a large start: one line per sync at INFO
                            log.debug("%s %s", "removed" if op == "delete" else "set",
                                      describe(item))
            if any(done.values()):
                log.info("%s", summary(done))
            self._report(errors)
            self._ok = not errors
            if self._ok:
                self._clean(gen)
            self._settle(pending, self._ok)
            return True

    def _clean(self, gen: int) -> None:
        # The kernel is as planned; trusted by the next plan unless a notification of drift
        # or lost notifications (which invalidate the view) came in meanwhile.
        if self.view.generation == gen:
            self._clean_generation = gen

    def _report(self, errors: list[KernelError]) -> None:
        for e in errors:
            self.errors += 1
            text = describe(e.item)
            if (text, e.error) not in self._reported:
                self._reported.add((text, e.error))
                log.error("cannot %s %s: %s", e.op, text, e.error)

    def watch(self, factory: MonitorFactory) -> None:
        """Repair from kernel notifications: `run` starts a monitor made by `factory`."""
        self.monitor_factory = factory

    def notify(self, events: list[KernelEvent]) -> None:
        """Kernel notifications: ask for a sync soon if one says we drifted."""
        want = self.desired
        drift = 0
        for ev in events:
            if want is None:
                break
            if ev.link is not None and ev.op == "del" and ev.link[0] in want.links:
                index, name = ev.link
                self.view.invalidate()  # its entries went with it
                if index not in self._gone:
                    self._gone.add(index)
                    log.warning("device %s (index %d) was deleted; its entries cannot be "
                                "programmed until it exists again", name, index)
                continue
            if drifted(ev, want) and not self._echo(ev):
                drift += 1
        self.events["drift"] += drift
        self.events["ignored"] += len(events) - drift
        if drift:
            # A batch sync before the resync this asks for must not trust the cache either.
            self.view.invalidate()
            log.debug("kernel notifications: %d of %d show drift", drift, len(events))
            if self._why is None:
                self._why = "event"
            self._wake.set()

    def _echo(self, ev: KernelEvent) -> bool:
        """Whether `ev` reports what the last apply wrote: an echo read only after a later
        plan changed the desired tables (a peer that changed again meanwhile), which would
        otherwise cost one needless full re-read."""
        cs = self._written
        if cs is None or ev.entry is None:
            return False
        if self._echoes is None or self._echoes[0] is not cs:
            made: set[object] = {*cs.route_replace, *cs.neigh_replace, *cs.fdb_replace}
            # A deleted neighbour is reported without its address: keyed by (IP, device).
            gone: set[object] = {*cs.route_delete, *cs.fdb_delete,
                                 *((n.ip, n.index) for n in cs.neigh_delete)}
            self._echoes = (cs, made, gone)
        _, made, gone = self._echoes
        e = ev.entry
        if ev.op == "new":
            return ev.permanent and e in made
        return ((e.ip, e.index) if isinstance(e, Neigh) else e) in gone

    def overflow(self) -> None:
        """The kernel dropped notifications: re-read everything at once."""
        self.lost += 1
        self.view.invalidate()
        log.warning("kernel notifications were lost (ENOBUFS: the receive buffer "
                    "overflowed); re-reading the kernel state")
        self._why = "lost"
        self._wake.set()

    def _start_monitor(self) -> Monitor | None:
        if self.monitor_factory is None:
            return None
        monitor = self.monitor_factory(self.notify, self.overflow)
        try:
            monitor.start()
        except OSError as exc:
            log.error("cannot watch kernel notifications (%s); drift is repaired only "
                      "every %g s", exc, self.resync)
            return None
        return monitor

    async def run(self) -> None:
        """Resync forever: soon after a notification shows drift, at once after lost
        notifications, and every `resync` seconds; a kernel state changed behind our back
        is put right."""
        monitor = self._start_monitor()
        # Only notifications make a cached read trustworthy: without them, read each time.
        self.view.enabled = monitor is not None
        try:
            while True:
                reason = "period"
                try:
                    async with asyncio.timeout(self.resync):
                        await self._wake.wait()
                    reason = self._why or "event"
                    if reason == "event":
                        await asyncio.sleep(self.debounce)  # the rest of the burst
                    reason = self._why or reason
                except TimeoutError:
                    pass
                self._wake.clear()
                self._why = None
                want = self.desired
                if (reason == "event" and want is not None
                        and self._gone.intersection(want.links)):
                    continue  # our device is gone: nothing can be put right (logged)
                self.view.invalidate()  # every resync is a real read of the kernel
                await self._resync(reason)
        finally:
            self.view.enabled = False
            self.view.invalidate()
            if monitor is not None:
                monitor.close()

    async def _resync(self, reason: str) -> None:
        try:
            changed = await self.sync()
        except OSError as exc:
            self.resyncs[(reason, "failed")] += 1
            log.error("resync failed: %s", exc)
            return
        if changed:
            self.repairs += 1
            log.info("resync (%s) repaired the kernel state", {
                "period": "periodic", "event": "after a kernel notification",
                "lost": "after lost notifications"}[reason])
        result = "clean" if not changed else "repaired" if self._ok else "failed"
        self.resyncs[(reason, result)] += 1
