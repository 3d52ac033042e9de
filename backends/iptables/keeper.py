"""iptables for --ip-masq and --iptables-forward-rules: the command adapter and the keeper.

`Iptables` runs the `iptables`, `iptables-save` and `iptables-restore` commands, or their
`ip6tables` twins for IPv6 (whatever backend they are: nft here, both through the same
Debian alternatives), as asyncio subprocesses; that is all the I/O. `IptablesKeeper` brings
the chains planned by `backends.iptables.plan` into place once the subnet is known, for each
family it is given (the IPv4 Network and subnet with iptables, the IPv6 ones with
ip6tables, as flanneld does in dual stack), re-checks them every `--iptables-resync` seconds,
repairs what changed (one log line per repair, none on a quiet check), follows a new subnet,
and counts checks, repairs and errors per family. When one family's commands are missing or
fail it says so once and the agent goes on without those rules; the other family is kept
all the same. The rules stay in place when tweed stops, like the routes: a restart changes
nothing.
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
from dataclasses import dataclass, field

from backends.iptables.plan import (
    KINDS,
    ChainPlan,
    Kind,
    Net,
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
    """The iptables commands of one family, run in the agent's network namespace:
    `iptables`, `iptables-save`, `iptables-restore` for family 4, the `ip6tables` ones for
    family 6 (unless named here)."""

    def __init__(
        self,
        iptables: str | None = None,
        save: str | None = None,
        restore: str | None = None,
        timeout: float = 30.0,
        *,
        family: int = 4,
    ) -> None:
        if family not in (4, 6):
            raise ValueError(f"family {family}: 4 or 6")
        base = "iptables" if family == 4 else "ip6tables"
        self.family = family
        self.iptables = iptables or base
        self.save_cmd = save or f"{base}-save"
        self.restore_cmd = restore or f"{base}-restore"
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
        """`iptables --version`, e.g. "iptables v1.8.9 (nf_tables)" (ip6tables alike)."""
        return (await self._run([self.iptables, "--version"])).strip()

    async def save(self, table: str) -> str:
        """The table as `iptables-save -t <table>` lists it (no counters)."""
        return await self._run([self.save_cmd, "-t", table])

    async def restore(self, payload: str) -> None:
        """Apply a payload with `iptables-restore -w --noflush`: one transaction per table,
        nothing else touched; -w waits for the xtables lock where the legacy backend has
        one."""
        await self._run([self.restore_cmd, "-w", "--noflush"], stdin=payload)


#: The `family` label of each family's counters, by IP version.
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}


@dataclass
class _Family:
    """One family the keeper looks after: its commands, Network and subnet, its own state
    (a failing ip6tables must not hide a healthy iptables) and its counters."""

    runner: Iptables
    network: Net
    subnet: Net
    random_fully: bool | None = None  # probed once the commands answer
    checks: int = 0
    errors: int = 0
    repairs: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # The subnet whose rules have been in place once: repairs are counted from then on.
    installed_for: Net | None = None
    failing: str | None = None

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def tool(self) -> str:
        """The command's name for log lines: iptables or ip6tables."""
        return "iptables" if self.version == 4 else "ip6tables"

    def ok(self) -> bool:
        return self.installed_for == self.subnet and self.failing is None

    def counters(self) -> dict[str, int]:
        out = {"checks": self.checks, "errors": self.errors,
               "repairs": sum(self.repairs.values())}
        out.update({f"repairs_{k}": v for k, v in self.repairs.items()})
        return out


class IptablesKeeper:
    """Keeps our chains as planned, per family: set up, re-checked every `resync` seconds,
    repaired.

    `runner`, `network` and `subnet` are the IPv4 family (network and subnet None: no IPv4
    rules, an IPv6-only config); `runner6`, `network6` and `subnet6` the IPv6 one (left out:
    no ip6tables rules, today's IPv4-only agent). Each family lives in its own tables:
    iptables' for IPv4, ip6tables' for IPv6.
    """

    def __init__(
        self,
        runner: Iptables | None,
        network: ipaddress.IPv4Network | None,
        subnet: ipaddress.IPv4Network | None,
        *,
        ip_masq: bool,
        forward_rules: bool,
        random_fully_disable: bool = False,
        resync: float = 5.0,
        runner6: Iptables | None = None,
        network6: ipaddress.IPv6Network | None = None,
        subnet6: ipaddress.IPv6Network | None = None,
    ) -> None:
        self.families: dict[int, _Family] = {}
        for version, run, net, sub in ((4, runner, network, subnet),
                                       (6, runner6, network6, subnet6)):
            if net is None and sub is None:
                continue
            if run is None or net is None or sub is None:
                raise ValueError(f"IPv{version} rules need the commands, the Network and "
                                 "the subnet together")
            if net.version != version or sub.version != version:
                raise ValueError(f"IPv{version} rules handed network {net}, subnet {sub}")
            if run.family != version:
                raise ValueError(f"IPv{version} rules handed the IPv{run.family} commands")
            self.families[version] = _Family(run, net, sub)
        if not self.families:
            raise ValueError("no family to keep rules for")
        self.ip_masq = ip_masq
        self.forward_rules = forward_rules
        self.random_fully_disable = random_fully_disable
        self.resync = resync
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # The IPv4 family's view, as before dual stack (None without an IPv4 family).
    @property
    def runner(self) -> Iptables | None:
        f = self.families.get(4)
        return f.runner if f else None

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        f = self.families.get(4)
        return f.network if f and isinstance(f.network, ipaddress.IPv4Network) else None

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        f = self.families.get(4)
        return f.subnet if f and isinstance(f.subnet, ipaddress.IPv4Network) else None

    @property
    def random_fully(self) -> bool | None:
        return next(iter(self.families.values())).random_fully

    def counters(self) -> dict[str, int]:
        """checks: syncs run; errors: syncs that failed (iptables missing, refused, bad
        output); repairs: changes made to a set-up state, also by kind as repairs_<kind>.
        Setting up (at start, after a subnet change) is not counted as repairs. Summed over
        the families (with IPv4 alone, IPv4's own); `counters_by_family` splits them."""
        out: dict[str, int] = {}
        for family in self.families.values():
            for key, value in family.counters().items():
                out[key] = out.get(key, 0) + value
        return out

    def counters_by_family(self) -> dict[str, dict[str, int]]:
        """The same counters for each family kept, keyed "ipv4"/"ipv6" (the `family` label)."""
        return {FAMILY_NAMES[v]: f.counters() for v, f in sorted(self.families.items())}

    def ok(self) -> bool:
        """True when the last check found (or left) everything as planned, in every family."""
        return all(f.ok() for f in self.families.values())

    def ok_by_family(self) -> dict[str, bool]:
        return {FAMILY_NAMES[v]: f.ok() for v, f in sorted(self.families.items())}

    def set_subnet(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> None:
        """Our lease changed: plan for the new subnet of its family and sync now (the old
        subnet's rule is removed as stale). None (a lease without that part) changes nothing.
        ValueError for a family the keeper was not given."""
        if subnet is None:
            return
        family = self.families.get(subnet.version)
        if family is None:
            raise ValueError(f"no IPv{subnet.version} rules kept, so no subnet {subnet}")
        if subnet != family.subnet:
            family.subnet = subnet
            self._wake.set()

    def chains(self, version: int | None = None) -> list[ChainPlan]:
        """The chains planned for one family (unless told: IPv4, or IPv6 when kept alone)."""
        return self._chains(self.families[version or min(self.families)])

    def _chains(self, family: _Family) -> list[ChainPlan]:
        return desired_chains(
            family.network, family.subnet, ip_masq=self.ip_masq,
            forward_rules=self.forward_rules,
            random_fully=bool(family.random_fully) and not self.random_fully_disable,
        )

    async def _plan(self, family: _Family, table: str, chains: list[ChainPlan]) -> TablePlan:
        text = await family.runner.save(table)
        try:
            state = parse_save(text, table)
        except ParseError as exc:
            raise IptablesError(f"cannot read {family.tool}-save -t {table}: {exc}") from None
        return plan_table(chains, state)

    async def sync(self) -> bool:
        """Check every table we own a chain in, in every family, and repair it; True if
        something changed. IptablesError when a command fails (raised after the other
        families were synced; nothing else of the failing table changed)."""
        changed = False
        first: IptablesError | None = None
        for family in self.families.values():
            try:
                changed |= await self._sync(family)
            except IptablesError as exc:
                first = first or exc
        if first is not None:
            raise first
        return changed

    async def _sync(self, family: _Family) -> bool:
        async with self._lock:
            if family.random_fully is None and self.ip_masq and not self.random_fully_disable:
                family.random_fully = supports_random_fully(await family.runner.version())
            chains = self._chains(family)
            subnet = family.subnet
            setting_up = family.installed_for != subnet
            changed = False
            for table in dict.fromkeys(c.table for c in chains):
                plan = await self._plan(family, table, chains)
                if not plan:
                    continue
                await family.runner.restore(plan.payload())
                changed = True
                self._report(family, plan, setting_up)
            if setting_up:
                family.installed_for = subnet
                log.info(
                    "%s: %s in place for network %s, subnet %s (re-checked every %g s)",
                    family.tool,
                    " and ".join(f"{c.table} {c.chain} ({len(c.rules)} rules)" for c in chains),
                    family.network, subnet, self.resync,
                )
            return changed

    def _report(self, family: _Family, plan: TablePlan, setting_up: bool) -> None:
        for r in plan.repairs:
            if not setting_up:
                family.repairs[r.kind] += 1
                log.warning("%s: repaired %s", family.tool, r.describe())
            elif r.kind == "rule_stale":
                # Setting up is not news, but a rule of an old network going away is.
                log.info("%s: %s", family.tool, r.describe())

    async def check(self) -> None:
        """One sync of each family with its outcome logged once per state: a failure when
        it starts or changes, one line when it ends; never raises IptablesError. A family
        that fails does not stop the others."""
        for family in self.families.values():
            await self._check(family)

    async def _check(self, family: _Family) -> None:
        family.checks += 1
        try:
            await self._sync(family)
        except IptablesError as exc:
            family.errors += 1
            reason = str(exc)
            if reason != family.failing:
                log.error("the %s rules for --ip-masq/--iptables-forward-rules are not "
                          "in place: %s (tweed goes on without them, trying again every %g s)",
                          family.tool, reason, self.resync)
                family.failing = reason
            return
        if family.failing is not None:
            log.info("%s: working again; the rules are in place", family.tool)
            family.failing = None

    async def run(self) -> None:
        """Sync now, then every `resync` seconds or as soon as a subnet changes."""
        while True:
            self._wake.clear()
            await self.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync):
                    await self._wake.wait()
