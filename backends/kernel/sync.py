"""KernelSync: bring the kernel to a backend's desired state, now and whenever it drifts.

A backend supplies `plan()`, which reads the kernel through `view` (a KernelView: cached
between real dumps while the monitor runs) and returns the ChangeSet that makes it match the
desired tables (and leaves those tables in `desired`); while `trusted` says the kernel is
as the last plan left it, the plan may diff only what its tables changed since. KernelSync runs one
plan/apply at a time: after each event batch; soon after a kernel notification says an
entry of ours was deleted or changed, or one of our devices changed (a KernelMonitor,
debounced so that a burst is one sync); at once after notifications were lost (ENOBUFS);
again with backoff after a sync that failed (a link that was down refuses routes until it
is up); when a plan asked to run again at a given time (`sync_at`); and, as a backstop,
every `resync` seconds. It logs each change it makes, logs each refused change once per
distinct error (one line for all the entries refused with the same error), counts them,
and says whether the last sync left the kernel as desired. No exception of a resync ends
it: each is one line and a count, and a retry follows.

A device of the backend's own (vxlan's flannel.<VNI>) that is deleted is made again
through the function the backend registered (`keep_device`), under the sync lock, and
everything on it is programmed again by a full resync; a device deleted again soon after
it was made is made again only after a growing delay, so that tweed never fights whatever
deletes it. Other devices (the external interface) cannot be made: logged once, not fought.

For metrics it also counts kernel operations by kind and result, resyncs by reason and
outcome, notifications by what they meant, lost notifications, and the delay from a batch
of peer events reaching the agent (`expect`) to the first sync after it that left the
kernel as desired.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from agent.backoff import Backoff
from agent.histogram import Histogram
from backends.kernel.monitor import Desired, KernelEvent, drifted
from backends.kernel.types import ChangeSet, Entry, KernelError, Neigh, Netlink, Route
from backends.kernel.view import KernelView
from backends.log_tally import LogTally

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
#: Why a resync ran: the backstop period, a notification of drift, lost notifications, a
#: retry after a failed sync, a device of ours made again.
REASONS = ("period", "event", "lost", "retry", "device")
#: Seconds from the first notification of a burst to the sync that answers it: long enough
#: for `ip -batch` or a flushed device to arrive as one burst, short against the 1 s goal.
DEBOUNCE = 0.1
#: Seconds between two INFO lines of kernel changes: under churn every batch is a small
#: sync of its own (100 lease changes a second made 100 lines a second), so the changes of
#: the syncs in between are added up into the next line (each sync's own line is DEBUG).
LOG_EVERY = 10.0
#: Retries after a failed sync: 1 s doubling to RETRY_CAP (or the resync period if shorter),
#: +-20%. A change the kernel refuses for good costs a full re-read every 30 s, not a loop.
RETRY_FIRST, RETRY_CAP = 1.0, 30.0
#: A device deleted again within REMAKE_CALM seconds of being made (or whose making failed)
#: is made again after 1 s doubling to REMAKE_CAP: something else wants it gone, and a
#: fight would cost both sides a loop. One that lived longer is made again at once.
REMAKE_FIRST, REMAKE_CAP, REMAKE_CALM = 1.0, 60.0, 30.0
#: Distinct refusals remembered so that each is logged once until a sync succeeds.
MAX_REPORTED = 10000


class Monitor(Protocol):
    """A source of kernel notifications (backends.kernel.monitor.KernelMonitor)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


#: Builds a Monitor that calls (on_events, on_lost).
MonitorFactory = Callable[[Callable[[list[KernelEvent]], None], Callable[[], None]], Monitor]


_NOUNS = {"route": ("route", "routes"), "neigh": ("neighbour", "neighbours"),
          "fdb": ("fdb entry", "fdb entries")}


def summary(done: Mapping[Any, int]) -> str:
    """The one INFO line of a sync, from (kind, op) -> changes made: "kernel: set 5000
    routes, 5000 neighbours, 5000 fdb entries; removed 0"."""
    def part(op: str) -> str:
        counts = [(n, _NOUNS[what][n != 1]) for what in KINDS if (n := done.get((what, op)))]
        return ", ".join(f"{n} {noun}" for n, noun in counts) or "0"

    return f"kernel: set {part('replace')}; removed {part('delete')}"


def _changes_line(counts: Mapping[Any, int], syncs: int) -> str:
    line = summary(counts)
    return line if syncs == 1 else f"{line} (in {syncs} syncs)"


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
        log_every: float = LOG_EVERY,
    ) -> None:
        self.netlink = netlink
        #: What the plan reads the kernel through: cached between real dumps while the
        #: monitor runs (dropped on drift, lost notifications, the backstop and errors).
        self.view = KernelView(netlink)
        self.view.known = self._known
        self.plan = plan
        self.resync = resync
        self.clock = clock
        self.debounce = debounce
        self.log_every = log_every
        #: The changes made, one INFO line at most every `log_every` seconds.
        self.changes_log = LogTally(log, _changes_line, log_every, clock)
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
        #: Devices the backend can make again when deleted: name -> the function that does
        #: (it raises when it cannot, and leaves its tables to be rebuilt by a full plan).
        self.makers: dict[str, Callable[[], Awaitable[None]]] = {}
        #: Devices made again after a deletion, by (name, result): "ok" or "failed".
        self.recreated: dict[tuple[str, str], int] = {}
        self._remake: dict[str, int] = {}  # deleted devices to make again: name -> old index
        self._remake_at: float | None = None
        self.remake_backoff = Backoff(REMAKE_FIRST, REMAKE_CAP)
        self._made_at: dict[str, float] = {}
        self._remake_failed: str | None = None
        #: When to retry after a failed sync (on `clock`), and how long to wait next time.
        self._retry_at: float | None = None
        self.retry_backoff = Backoff(RETRY_FIRST, min(RETRY_CAP, max(resync, RETRY_FIRST)))
        self._failure: str | None = None  # the last resync failure logged
        #: A plan asked for another sync at this time (held removals falling due).
        self._due: float | None = None
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

    def _known(self, e: Entry) -> Entry:
        """The desired entry itself where it equals `e` (one the kernel holds), else `e`:
        after a full read the view's cache then shares the plan's entries instead of
        holding a copy of each. Called on the netlink thread while a dump is decoded,
        while the event loop may change the tables: it only looks up, and returns an
        entry only when equal to `e`, so the read says what the kernel holds either way."""
        want = self.desired
        if want is None:
            return e
        w: Entry | None
        if isinstance(e, Route):
            w = want.routes.get(e.dst)
        elif isinstance(e, Neigh):
            w = want.neigh.get(e.ip)
        else:
            w = want.fdb.get(e.mac)
        return w if w is not None and w == e else e

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
                self._failed()
                raise
            finally:
                self.trusted = False
            if not cs:
                self._ok = True
                self._clean(gen)
                self._settle(pending, True)
                self._succeeded()
                return False
            try:
                errors = await self.netlink.apply(cs)
            except BaseException:
                self.view.invalidate()  # some of it may have been applied
                self._settle(pending, False)
                self._failed()
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
                self.changes_log.add(done)
            self._report(errors)
            self._ok = not errors
            if self._ok:
                self._clean(gen)
                self._succeeded()
            else:
                self._failed()
            self._settle(pending, self._ok)
            return True

    def _failed(self) -> None:
        """A sync failed: run() tries again after a backoff, whatever woke it before, so
        that a change refused while a link was down is made once the link is up even if
        no notification says so."""
        if self._retry_at is None:
            self._retry_at = self.clock() + self.retry_backoff.next_delay()
            self._wake.set()  # run() waits with the new deadline

    def _succeeded(self) -> None:
        self.retry_backoff.reset()
        self._retry_at = None
        self._reported.clear()  # a refusal that comes back later is news again
        if self._failure is not None:
            log.info("kernel sync works again")
            self._failure = None

    def sync_at(self, when: float) -> None:
        """Run a sync at `when` (on `clock`) at the latest: a plan that holds a change back
        until then (a removed peer's entries, in case its lease comes back) asks for it."""
        if self._due is None or when < self._due:
            self._due = when
            self._wake.set()

    def keep_device(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        """`make` makes device `name` (one of `desired.links`) again when it is deleted;
        it raises when it cannot, and runs under the sync lock (no plan runs meanwhile)."""
        self.makers[name] = make

    def _clean(self, gen: int) -> None:
        # The kernel is as planned; trusted by the next plan unless a notification of drift
        # or lost notifications (which invalidate the view) came in meanwhile.
        if self.view.generation == gen:
            self._clean_generation = gen

    def _report(self, errors: list[KernelError]) -> None:
        """One ERROR line per distinct error among the refusals not logged since the last
        sync that succeeded: a link that is down refuses every route through it, and
        5,000 peers must not be 5,000 lines."""
        fresh: dict[str, list[str]] = {}
        for e in errors:
            self.errors += 1
            text = f"{e.op} {describe(e.item)}"
            if (text, e.error) not in self._reported:
                if len(self._reported) >= MAX_REPORTED:
                    self._reported.clear()
                self._reported.add((text, e.error))
                fresh.setdefault(e.error, []).append(text)
        for error, texts in fresh.items():
            more = (f" (and {len(texts) - 1} more with the same error)"
                    if len(texts) > 1 else "")
            log.error("cannot %s: %s%s", texts[0], error, more)
            for text in texts[1:]:
                log.debug("cannot %s: %s", text, error)

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
                self.view.invalidate()  # its entries went with it
                self._deleted(ev.link[0], want.links[ev.link[0]])
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

    def _deleted(self, index: int, name: str) -> None:
        """A device of `desired.links` was deleted: made again if the backend can (now,
        or after a delay when it keeps being deleted), otherwise logged once."""
        if index in self._gone:
            return
        self._gone.add(index)
        self._ok = False  # the entries on it are gone: not as desired until made again
        if name not in self.makers:
            log.warning("device %s (index %d) was deleted; its entries cannot be "
                        "programmed until it exists again", name, index)
            return
        now = self.clock()
        made = self._made_at.get(name)
        if made is None or now - made >= REMAKE_CALM:
            self.remake_backoff.reset()
            delay = 0.0
            when = "now"
        else:
            delay = self.remake_backoff.next_delay()
            when = (f"in {delay:.1f} s (it was deleted {now - made:.1f} s after it was "
                    "made: is something else deleting it?)")
        self._remake[name] = index
        self._remake_at = now + delay
        log.warning("device %s (index %d) was deleted; making it again %s", name, index, when)
        self._wake.set()

    async def _remake_devices(self) -> bool:
        """Make the deleted devices again; True when all exist again. A failure is logged
        once per distinct error, counted, and tried again after a growing delay."""
        async with self._lock:
            for name, old in sorted(self._remake.items()):
                try:
                    await self.makers[name]()
                except Exception as exc:  # noqa: BLE001 - netlink errors come in many types
                    self.recreated[(name, "failed")] = self.recreated.get((name, "failed"), 0) + 1
                    delay = self.remake_backoff.next_delay()
                    self._remake_at = self.clock() + delay
                    text = f"{exc}"
                    if text != self._remake_failed:
                        self._remake_failed = text
                        log.error("cannot make device %s again: %s; trying again with "
                                  "backoff (next in %.1f s)", name, text, delay)
                    return False
                del self._remake[name]
                self._gone.discard(old)
                self._made_at[name] = self.clock()
                self.recreated[(name, "ok")] = self.recreated.get((name, "ok"), 0) + 1
                self._remake_failed = None
        self._remake_at = None
        self.view.invalidate()  # a new device: nothing known of it yet
        return True

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
        notifications, with backoff after a failed sync, when a plan asked for it, and
        every `resync` seconds; a deleted device of ours is made again first. A kernel
        state changed behind our back is put right, and no exception but cancellation
        ends this."""
        monitor = self._start_monitor()
        # Only notifications make a cached read trustworthy: without them, read each time.
        self.view.enabled = monitor is not None
        period_due = self.clock() + self.resync
        try:
            while True:
                reason = await self._next(period_due)
                if reason is None:
                    continue  # woken only to wait for a new deadline
                if reason == "due":
                    await self._guarded("sync", self.sync)
                    continue
                if reason == "device" and not await self._remake_devices():
                    continue  # logged; tried again after a delay
                want = self.desired
                if (reason in ("event", "retry") and want is not None
                        and self._gone.intersection(want.links)):
                    continue  # our device is gone: nothing can be put right (logged)
                self.view.invalidate()  # every resync is a real read of the kernel
                await self._resync(reason)
                period_due = self.clock() + self.resync
        finally:
            self.view.enabled = False
            self.view.invalidate()
            if monitor is not None:
                monitor.close()

    async def _next(self, period_due: float) -> str | None:
        """Wait for the next thing to do and say what it is: a resync's reason, "due" (a
        plan's own deadline) or None (only a deadline changed)."""
        due = min(t for t in (period_due, self._retry_at, self._due,
                              self._remake_at if self._remake else None) if t is not None)
        try:
            async with asyncio.timeout(max(0.0, due - self.clock())):
                await self._wake.wait()
        except TimeoutError:
            pass
        if self._why == "event":
            await asyncio.sleep(self.debounce)  # the rest of the burst
        self._wake.clear()
        why, self._why = self._why, None
        now = self.clock()
        if self._remake and self._remake_at is not None and now >= self._remake_at:
            return "device"  # before anything else: the rest is on it
        if why is not None:
            return why
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None  # a failure of this retry sets the next one
            return "retry"
        if self._due is not None and now >= self._due:
            self._due = None
            return "due"
        if now >= period_due:
            return "period"
        return None

    async def _guarded(self, what: str, fn: Callable[[], Awaitable[bool]]) -> bool | None:
        """`fn()`, with any exception but cancellation one line (once per distinct error
        until a sync succeeds) and None; pyroute2's NetlinkError is no OSError, and no
        error of the kernel may end the agent. A retry follows (`_failed`)."""
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - see above
            self._failed()
            if isinstance(exc, OSError) and exc.errno == errno.ENODEV:
                self._suspect_devices()
            text = f"{type(exc).__name__}: {exc}"
            if text != self._failure:
                self._failure = text
                log.error("%s failed: %s; retrying with backoff", what, text)
            return None

    def _suspect_devices(self) -> None:
        """A read found no such device, perhaps ours with its deletion among lost
        notifications: the backend's makers are idempotent, so run them."""
        want = self.desired
        if want is None:
            return
        for index, name in want.links.items():
            if name in self.makers and name not in self._remake:
                self._remake[name] = index
                self._gone.add(index)
                # Growing delays: an ENODEV that making the device does not cure must not
                # become a loop.
                self._remake_at = self.clock() + self.remake_backoff.next_delay()

    async def _resync(self, reason: str) -> None:
        changed = await self._guarded(f"resync ({reason})", self.sync)
        if changed is None:
            self.resyncs[(reason, "failed")] += 1
            return
        if changed:
            self.repairs += 1
            log.info("resync (%s) repaired the kernel state", {
                "period": "periodic", "event": "after a kernel notification",
                "lost": "after lost notifications", "retry": "retrying a failed sync",
                "device": "after making a deleted device again"}[reason])
        result = "clean" if not changed else "repaired" if self._ok else "failed"
        self.resyncs[(reason, result)] += 1
