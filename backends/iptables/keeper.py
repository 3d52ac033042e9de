"""iptables for --ip-masq and --iptables-forward-rules: the command adapter and the keeper.

`Iptables` runs the `iptables`, `iptables-save` and `iptables-restore` commands (whatever
backend they are: nft here) as asyncio subprocesses; that is all the I/O. `IptablesKeeper`
brings the chains planned by `backends.iptables.plan` into place once the subnet is known,
re-checks them every `--iptables-resync` seconds, repairs what changed (one log line per
repair, none on a quiet check), follows a new subnet, and counts checks, repairs and
errors. When iptables is missing or fails it says so once and the agent goes on without it.
The rules stay in place when tweed stops, like the routes: a restart changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence

from backends.iptables.plan import (
    KINDS,
    ChainPlan,
    ParseError,
    TablePlan,
    desired_chains,
    parse_save,
    plan_table,
    supports_random_fully,
)

log = logging.getLogger(__name__)


async def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Wait until `proc` exits (its pidfd turns readable) without blocking the loop."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


class IptablesError(RuntimeError):
    """An iptables command is missing, failed or hung; the message says which and why."""


class Iptables:
    """The iptables commands, run in the agent's network namespace."""

    def __init__(
        self,
        iptables: str = "iptables",
        save: str = "iptables-save",
        restore: str = "iptables-restore",
        timeout: float = 30.0,
    ) -> None:
        self.iptables = iptables
        self.save_cmd = save
        self.restore_cmd = restore
        self.timeout = timeout

    async def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        # subprocess.Popen starts the command with vfork(), which runs no atfork handlers:
        # gRPC's (etcd client) would log a line for every fork() the event loop's own
        # subprocess support makes. Input and output go through files, so a command that
        # fails early never meets a closed pipe, and the exit is awaited on a pidfd.
        with (tempfile.TemporaryFile() as infile, tempfile.TemporaryFile() as outfile,
              tempfile.TemporaryFile() as errfile):
            if stdin is not None:
                infile.write(stdin.encode())
                infile.seek(0)
            try:
                proc = subprocess.Popen(  # noqa: ASYNC220 - returns once started
                    list(argv), stdin=infile if stdin is not None else subprocess.DEVNULL,
                    stdout=outfile, stderr=errfile,
                )
            except FileNotFoundError:
                raise IptablesError(f"{argv[0]}: command not found") from None
            except OSError as exc:
                raise IptablesError(f"{argv[0]}: cannot run it: {exc.strerror}") from None
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                # that arrives as the command ends, and the agent would then not stop.
                async with asyncio.timeout(self.timeout):
                    await _exited(proc)
            except TimeoutError:
                raise IptablesError(f"{argv[0]}: no answer within {self.timeout:g} s") from None
            finally:
                if proc.poll() is None:  # timed out or cancelled: do not leave it behind
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            proc.wait()  # reap it; it has exited
            outfile.seek(0)
            errfile.seek(0)
            out, err = outfile.read(), errfile.read()
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip().replace("\n", "; ")
            raise IptablesError(f"{argv[0]} exited with status {proc.returncode}: {text}")
        return out.decode(errors="replace")

    async def version(self) -> str:
        """`iptables --version`, e.g. "iptables v1.8.9 (nf_tables)"."""
        return (await self._run([self.iptables, "--version"])).strip()

    async def save(self, table: str) -> str:
        """The table as `iptables-save -t <table>` lists it (no counters)."""
        return await self._run([self.save_cmd, "-t", table])

    async def restore(self, payload: str) -> None:
        """Apply a payload with `iptables-restore -w --noflush`: one transaction per table,
        nothing else touched; -w waits for the xtables lock where the legacy backend has
        one."""
        await self._run([self.restore_cmd, "-w", "--noflush"], stdin=payload)


class IptablesKeeper:
    """Keeps our chains as planned: set up, re-checked every `resync` seconds, repaired."""

    def __init__(
        self,
        runner: Iptables,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        *,
        ip_masq: bool,
        forward_rules: bool,
        random_fully_disable: bool = False,
        resync: float = 5.0,
    ) -> None:
        self.runner = runner
        self.network = network
        self.subnet = subnet
        self.ip_masq = ip_masq
        self.forward_rules = forward_rules
        self.random_fully_disable = random_fully_disable
        self.resync = resync
        self.random_fully: bool | None = None  # probed once iptables answers
        self.checks = 0
        self.errors = 0
        self.repairs = dict.fromkeys(KINDS, 0)
        # The subnet whose rules have been in place once: repairs are counted from then on.
        self._installed_for: ipaddress.IPv4Network | None = None
        self._failing: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def counters(self) -> dict[str, int]:
        """checks: syncs run; errors: syncs that failed (iptables missing, refused, bad
        output); repairs: changes made to a set-up state, also by kind as repairs_<kind>.
        Setting up (at start, after a subnet change) is not counted as repairs."""
        out = {"checks": self.checks, "errors": self.errors,
               "repairs": sum(self.repairs.values())}
        out.update({f"repairs_{k}": v for k, v in self.repairs.items()})
        return out

    def ok(self) -> bool:
        """True when the last check found (or left) everything as planned."""
        return self._installed_for == self.subnet and self._failing is None

    def set_subnet(self, subnet: ipaddress.IPv4Network) -> None:
        """Our lease changed: plan for the new subnet and sync now (the old subnet's rule
        is removed as stale)."""
        if subnet != self.subnet:
            self.subnet = subnet
            self._wake.set()

    def chains(self) -> list[ChainPlan]:
        return desired_chains(
            self.network, self.subnet, ip_masq=self.ip_masq, forward_rules=self.forward_rules,
            random_fully=bool(self.random_fully) and not self.random_fully_disable,
        )

    async def _plan(self, table: str, chains: list[ChainPlan]) -> TablePlan:
        text = await self.runner.save(table)
        try:
            state = parse_save(text, table)
        except ParseError as exc:
            raise IptablesError(f"cannot read iptables-save -t {table}: {exc}") from None
        return plan_table(chains, state)

    async def sync(self) -> bool:
        """Check every table we own a chain in and repair it; True if something changed.
        IptablesError when a command fails (nothing else of that table changed)."""
        async with self._lock:
            if self.random_fully is None and self.ip_masq and not self.random_fully_disable:
                self.random_fully = supports_random_fully(await self.runner.version())
            chains = self.chains()
            subnet = self.subnet
            setting_up = self._installed_for != subnet
            changed = False
            for table in dict.fromkeys(c.table for c in chains):
                plan = await self._plan(table, chains)
                if not plan:
                    continue
                await self.runner.restore(plan.payload())
                changed = True
                self._report(plan, setting_up)
            if setting_up:
                self._installed_for = subnet
                log.info(
                    "iptables: %s in place for network %s, subnet %s (re-checked every %g s)",
                    " and ".join(f"{c.table} {c.chain} ({len(c.rules)} rules)" for c in chains),
                    self.network, subnet, self.resync,
                )
            return changed

    def _report(self, plan: TablePlan, setting_up: bool) -> None:
        for r in plan.repairs:
            if not setting_up:
                self.repairs[r.kind] += 1
                log.warning("iptables: repaired %s", r.describe())
            elif r.kind == "rule_stale":
                # Setting up is not news, but a rule of an old network going away is.
                log.info("iptables: %s", r.describe())

    async def check(self) -> None:
        """One sync with its outcome logged once per state: a failure when it starts or
        changes, one line when it ends; never raises IptablesError."""
        self.checks += 1
        try:
            await self.sync()
        except IptablesError as exc:
            self.errors += 1
            reason = str(exc)
            if reason != self._failing:
                log.error("the iptables rules for --ip-masq/--iptables-forward-rules are not "
                          "in place: %s (tweed goes on without them, trying again every %g s)",
                          reason, self.resync)
                self._failing = reason
            return
        if self._failing is not None:
            log.info("iptables: working again; the rules are in place")
            self._failing = None

    async def run(self) -> None:
        """Sync now, then every `resync` seconds or as soon as the subnet changes."""
        while True:
            self._wake.clear()
            await self.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync):
                    await self._wake.wait()
