"""The daemon: the composition root, and the agent's phases.

`Daemon` receives the factories of what touches the world (the registry, netlink, iptables)
and builds nothing a test would want to replace; `run()` hands it the real ones (etcd,
pyroute2, the iptables commands), tests hand it MemoryRegistry and FakeNetlink.

Phases: check that subnet.env's folder can be written; choose the external interface;
connect to etcd; wait for a valid network config; build the backend; acquire the lease;
program the backend, then write subnet.env (so a subnet.env of this run always names a
subnet whose device is set up, as flanneld does); then run (peer watch, lease keeper, lease
installer, backend resync, config watch) until SIGTERM/SIGINT, which stop everything within
2 s and leave the lease and the kernel state in place.

Address families: the daemon leases the families the config enables that the backend
carries (`families` of its Backend class, backends/base.py). A dual-stack config on a
backend that carries IPv4 only runs on IPv4 (one warning; no IPv6 lease part, no PublicIPv6,
no FLANNEL_IPV6_* lines: a subnet nobody routes is never advertised); on one that carries
both, the lease, subnet.env, the backend's setup and the iptables keeper (ip6tables) get the
IPv6 subnet too. An IPv6-only
config on a backend without IPv6 is waited out like an invalid one, the reason naming the
backend.

Failures a user can cause are one line, never a traceback: at start a StartupError (exit
1); while running, what cannot be done now (a new lease's device or subnet.env, a batch of
peers the kernel would not take) is logged once, counted in `failures` and retried, and
/readyz says why meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import uvloop

from agent import sd_notify
from agent.atomic_file import check_writable
from agent.backoff import Backoff, OutageLog
from agent.config import (
    ConfigError,
    NetworkConfig,
    ignored,
    leased_families,
    parse_config,
    unsupported,
)
from agent.etcd_registry import EtcdRegistry, EtcdSetupError
from agent.health import Heartbeat
from agent.lease import Lease, PeerEvent
from agent.lease_manager import LeaseManager
from agent.options import EtcdSettings, Options, etcd_settings
from agent.registry import Compacted, Registry, RegistryUnavailable
from agent.state import ConfigState
from agent.subnet_file import (
    SubnetEnv,
    read_previous_ipv6_subnet,
    read_previous_subnet,
    write_problem,
    write_subnet_file,
)
from backends import backend_class, backend_problem, build_backend
from backends.base import BackendContext, BackendError, Network, carried_families
from backends.external_iface import ExternalInterface, InterfaceError, NoIPv4, choose_interface
from backends.iptables.keeper import Iptables, IptablesKeeper
from backends.ipv6_addresses import read_ipv6_addresses
from backends.kernel.monitor import KernelMonitor
from backends.kernel.netlink import IPRouteNetlink
from backends.kernel.sync import MonitorFactory
from backends.kernel.types import Netlink

log = logging.getLogger("tweed")

#: Seconds a clean stop may take before the remaining work is abandoned.
STOP_GRACE = 1.5

#: What the running agent retries, counted in `Daemon.failures` (tweed_failures_total):
#: subnet.env for a new lease, a new lease's backend setup, a batch of peers (or a
#: listing) the kernel could not be programmed for.
FAILURE_STEPS = ("subnet_file", "backend_setup", "kernel")

#: How the daemon gets what touches the world; run() passes the real ones.
RegistryFactory = Callable[[EtcdSettings], Registry]
NetlinkFactory = Callable[[], Netlink]
IptablesFactory = Callable[[], Iptables]
#: The host's IPv6 addresses, ifindex -> addresses in the kernel's order.
Ipv6AddressReader = Callable[[], Awaitable[Mapping[int, Sequence[ipaddress.IPv6Address]]]]


class StartupError(RuntimeError):
    """The agent cannot start with these settings; the message says why."""


class NoIPv4Interface(StartupError):
    """The external interface has no IPv4 address (or the host no IPv4 default route):
    an IPv6-only host. Said once the config is read, if it needs IPv4."""


class SubnetFileError(RuntimeError):
    """subnet.env cannot be written; the message names the file, --subnet-file and what
    to do."""


def describe_error(exc: BaseException) -> str:
    """One line for an error: the messages of tweed's own errors say everything; others
    (pyroute2's NetlinkError, OSError, ...) also need their type to be understood."""
    if isinstance(exc, (StartupError, SubnetFileError, BackendError, ConfigError,
                        RegistryUnavailable)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backend_families(config: NetworkConfig) -> frozenset[int]:
    """The families the config's backend carries (config_problem has checked the type)."""
    return carried_families(backend_class(config.backend_type))


def config_problem(config: NetworkConfig) -> str | None:
    """Why tweed could not run on a config that parsed, or None: a Backend.Type it lacks,
    a Backend option the backend refuses, an IPv6-only network on a backend that does not
    carry IPv6."""
    return backend_problem(config) or unsupported(
        config, config.backend_type, backend_families(config))


async def wait_for_config(
    registry: Registry, key: str, status: Callable[[str], None] | None = None
) -> NetworkConfig:
    """Read the network config; until it exists and is valid, watch the key for changes.

    `status` is told what is being waited for (etcd unreachable, no config, an invalid
    one) each time that changes, for /readyz. Invalid is what parse_config refuses and
    what config_problem finds (a bad Backend option waits for a fix like a bad Network).
    """
    backoff = Backoff()
    outage = OutageLog(log, f"reading the network config {key}")
    reported: str | None = None
    while True:
        try:
            value, rev = await registry.get_config()
            outage.ok()
            while True:
                if value is None:
                    problem = f"no network config at {key} yet; waiting for one"
                    level = logging.WARNING
                else:
                    try:
                        config = parse_config(value)
                        why = config_problem(config)
                    except ConfigError as exc:
                        why = str(exc)
                    else:
                        if why is None:
                            return config
                    problem = f"invalid network config at {key}: {why}; waiting for a fix"
                    level = logging.ERROR
                if status is not None:
                    status(problem)
                if problem != reported:
                    log.log(level, "%s", problem)
                    reported = problem
                # Watch, not poll: the next change wakes us.
                async with contextlib.aclosing(registry.watch_config(rev + 1)) as changes:
                    change = await anext(changes, None)
                if change is None:
                    raise RegistryUnavailable("config watch ended")
                value, rev = change
        except Compacted:
            # The revision we watched from is gone: read the key again, at once.
            continue
        except RegistryUnavailable as exc:
            if status is not None:
                status(f"cannot reach etcd to read {key}: {exc}")
            outage.fail(str(exc))
            await backoff.wait()


def describe_change(old: NetworkConfig, new: NetworkConfig) -> str:
    """The fields that differ, e.g. `backend {"type": "vxlan"} -> {"port": 4789, ...}`."""
    def show(value: object) -> str:
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True)
        return str(value)

    parts = [
        f"{f.name} {show(getattr(old, f.name))} -> {show(getattr(new, f.name))}"
        for f in dataclasses.fields(NetworkConfig)
        if getattr(old, f.name) != getattr(new, f.name)
    ]
    return "; ".join(parts)


class Daemon:
    """One run of the agent, over the registry, netlink and iptables its factories make;
    an agent.state.AgentState for metrics and systemd.

    The registry is made in serve() (a bad --etcd-* setting is a startup error there);
    EtcdSetupError from the factory becomes a StartupError.
    """

    def __init__(
        self,
        opts: Options,
        *,
        registry_factory: RegistryFactory,
        netlink_factory: NetlinkFactory,
        iptables_factory: IptablesFactory,
        monitor_factory: MonitorFactory | None = None,
        ipv6_addresses: Ipv6AddressReader = read_ipv6_addresses,
        iptables6_factory: IptablesFactory = lambda: Iptables(family=6),
    ) -> None:
        self.opts = opts
        self._ipv6_addresses = ipv6_addresses
        self._registry_factory = registry_factory
        self._monitor_factory = monitor_factory  # kernel notifications; None: backstop only
        self._iptables_factory = iptables_factory
        self._iptables6_factory = iptables6_factory  # ip6tables, when IPv6 is leased
        self.netlink = netlink_factory()
        self.registry: Registry | None = None
        self.manager: LeaseManager | None = None
        self.network: Network | None = None
        self.config: NetworkConfig | None = None
        self.subnet_file = Path(opts.subnet_file)
        self.file_written = False
        self.written_subnet: ipaddress.IPv4Network | None = None  # in subnet.env now
        self.written_ipv6_subnet: ipaddress.IPv6Network | None = None
        #: The address families leased (config and backend): {4}, {6} or {4, 6}.
        self.families: frozenset[int] = frozenset({4})
        self.peers_listed = False  # the first full listing of the peers is programmed
        self.heartbeat = Heartbeat()  # the event loop's pulse, for /healthz
        self.waiting_for: str | None = None  # what wait_for_config waits for, for /readyz
        #: How the config in etcd compares with the running one: "running" (the same),
        #: "changed", "invalid" or "deleted"; each new state is logged once.
        self.config_state: ConfigState = "running"
        self._config_reported: object = "running"
        self.iptables: IptablesKeeper | None = None  # --ip-masq / --iptables-forward-rules
        #: Failures retried while running, by step (FAILURE_STEPS), for metrics.
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_STEPS, 0)
        #: Why the newest lease is not set up (its device or subnet.env), while retried.
        self.lease_problem: str | None = None
        #: Why the kernel could not be programmed for the last batch, until a retry works.
        self.kernel_problem: str | None = None
        self._new_lease: Lease | None = None  # handed over by the lease keeper
        self._lease_wake = asyncio.Event()
        self._kernel_retry = asyncio.Event()
        self._kernel_outage = OutageLog(log, "programming the kernel for the peers")

    def not_ready_reason(self) -> str | None:
        if self.config is None:
            return self.waiting_for or "waiting for a valid network config"
        if self.manager is None or self.manager.lease is None:
            if self.manager is not None and not self.manager.etcd_reachable:
                return "no subnet lease yet: etcd unreachable"
            return "no subnet lease yet"
        m, lease = self.manager, self.manager.lease
        if m.lease_lost:
            return f"lost the lease on {lease.describe()}; acquiring a subnet again"
        if lease.expires_at is not None and lease.expires_at <= m.clock():
            # Renewals failed until the TTL ran out: etcd may give the subnet to another host.
            return (f"the lease on {lease.describe()} expired (etcd unreachable: renewals"
                    " failed)")
        if self.lease_problem is not None:
            return self.lease_problem
        if not self.file_written:
            return "subnet file not written"
        if (self.written_subnet, self.written_ipv6_subnet) != (
                lease.subnet if lease.has_ipv4 else None, lease.ipv6_subnet):
            return f"subnet file not yet rewritten for the new subnet {lease.describe()}"
        if self.kernel_problem is not None:
            return f"backend not programmed: {self.kernel_problem} (retrying)"
        if self.network is None or not self.network.ready():
            return "backend not programmed"
        if not self.peers_listed:
            why = "" if m.etcd_reachable else ": etcd unreachable"
            return f"peer leases not listed and programmed yet{why}"
        return None

    async def _interface(self, ipv6: bool = False) -> ExternalInterface:
        """The external interface by flanneld's rules; with `ipv6`, its IPv6 address and
        the one to advertise too (the host's IPv6 addresses are read only then)."""
        o = self.opts
        try:
            addresses6 = await self._ipv6_addresses() if ipv6 else None
            links = await self.netlink.links()
            reach = None
            if o.iface_can_reach:
                reach = await self.netlink.route_get_oif(
                    ipaddress.IPv4Address(o.iface_can_reach))
            default = await self.netlink.default_route_oif()
        except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError is a plain Exception
            raise StartupError(
                "cannot read the host's interfaces and routes to choose the external"
                f" interface (--iface, --iface-regex, --iface-can-reach): {describe_error(exc)}"
            ) from None
        if o.iface_can_reach and reach is None and not o.iface and not o.iface_regex:
            raise StartupError(f"--iface-can-reach: no route to {o.iface_can_reach}")
        try:
            ext = choose_interface(
                links, iface=o.iface, iface_regex=o.iface_regex, can_reach_oif=reach,
                default_oif=default, public_ip=o.public_ip, ipv6=ipv6, addresses6=addresses6,
                public_ipv6=o.public_ipv6,
            )
        except NoIPv4 as exc:
            raise NoIPv4Interface(str(exc)) from None
        except InterfaceError as exc:
            raise StartupError(str(exc)) from None
        log.info(
            "using interface %s (index %d, MTU %d) with address %s, public IP %s%s",
            ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip,
            f", IPv6 address {ext.iface_addr6}, public IPv6 {ext.public_ipv6}" if ipv6 else "",
        )
        return ext

    def _write_subnet_file(self, lease: Lease) -> None:
        """subnet.env for `lease`; SubnetFileError (one line) if it cannot be written."""
        assert self.config is not None and self.network is not None
        c, fams = self.config, self.families
        v4 = lease.subnet if lease.has_ipv4 else None
        env = SubnetEnv(c.network if 4 in fams else None, v4, self.network.mtu,
                        self.opts.ip_masq, c.ipv6_network if 6 in fams else None,
                        lease.ipv6_subnet)
        try:
            write_subnet_file(self.subnet_file, env)
        except OSError as exc:
            raise SubnetFileError(write_problem(self.subnet_file, exc)) from None
        self.file_written = True
        self.written_subnet, self.written_ipv6_subnet = v4, lease.ipv6_subnet
        log.info("wrote %s (subnet %s, MTU %d)", self.subnet_file, lease.describe(), env.mtu)

    async def _on_new_lease(self, lease: Lease) -> None:
        """The lease keeper holds a new lease (the last one was lost): `_install_leases`
        sets it up. Handed over, not awaited here, so that a setup retried for long does
        not keep the keeper from renewing the new lease."""
        self._new_lease = lease
        self._lease_wake.set()

    async def _install_leases(self) -> None:
        """Set up each new lease, device first, then subnet.env (so the file never names a
        subnet whose device is not set up); what fails is logged once, counted, retried
        with backoff and said by /readyz, until it works or a newer lease replaces it."""
        assert self.network is not None
        backoff = Backoff()
        outage: OutageLog | None = None
        outage_of: Lease | None = None  # the lease `outage` speaks of
        while True:
            await self._lease_wake.wait()
            self._lease_wake.clear()
            lease = self._new_lease
            if lease is None:
                continue
            if outage is None or outage_of is not lease:
                outage = OutageLog(log, f"setting up the new subnet {lease.describe()}")
                outage_of = lease
            step = "backend_setup"
            try:
                await self.network.setup(lease)
                step = "subnet_file"
                self._write_subnet_file(lease)
            except Exception as exc:  # noqa: BLE001 - BackendError, NetlinkError, SubnetFileError
                self.failures[step] += 1
                why = describe_error(exc)
                outage.fail(why, logging.ERROR)
                self.lease_problem = f"cannot set up the new subnet {lease.describe()}: {why}"
                await backoff.wait()
                self._lease_wake.set()  # again, with the newest lease by then
                continue
            outage.ok()
            outage = None
            backoff.reset()
            self.lease_problem = None
            if self._new_lease is lease:  # else a newer one came meanwhile: its turn next
                self._new_lease = None
            if self.iptables is not None:
                if lease.has_ipv4:
                    self.iptables.set_subnet(lease.subnet)
                self.iptables.set_subnet(lease.ipv6_subnet)  # None: no IPv6 part

    def _judge_config(self, key: str, value: bytes | None) -> None:
        """Compare the config in etcd with the running one; log each new state once."""
        assert self.config is not None
        state: object
        if value is None:
            self.config_state = state = "deleted"
            level, msg = logging.WARNING, (
                f"the network config {key} was deleted; tweed keeps running on the old one")
        else:
            new: NetworkConfig | None = None
            try:
                new = parse_config(value)
                problem = config_problem(new)
            except ConfigError as exc:
                problem = str(exc)
            if problem is not None:
                self.config_state, state = "invalid", ("invalid", problem)
                level, msg = logging.ERROR, (
                    f"the network config at {key} is invalid, not applied: {problem}; "
                    "tweed keeps running on the old one")
            elif new == self.config:
                self.config_state = state = "running"
                level, msg = logging.INFO, (
                    f"the network config at {key} is the running one again")
            else:
                assert new is not None
                self.config_state, state = "changed", ("changed", new)
                level, msg = logging.WARNING, (
                    f"the network config at {key} changed ({describe_change(self.config, new)})"
                    "; restart tweed to apply it, it keeps running on the old one")
        if state != self._config_reported:
            self._config_reported = state
            log.log(level, "%s", msg)

    async def _report_config_changes(self, registry: Registry) -> None:
        """A changed config is reported, not applied: applying it needs a restart.

        The value read after every (re)connect is judged too, not only watch events: a
        change made while etcd was unreachable, or before this task started, is reported.
        """
        key = f"{self.opts.etcd_prefix.rstrip('/')}/config"
        backoff = Backoff()
        while True:
            try:
                value, rev = await registry.get_config()
                backoff.reset()
                self._judge_config(key, value)
                async with contextlib.aclosing(registry.watch_config(rev + 1)) as changes:
                    async for value, _ in changes:
                        self._judge_config(key, value)
                raise RegistryUnavailable("config watch ended")
            except Compacted:
                continue  # read the key again
            except RegistryUnavailable as exc:
                # The lease watch logs the outage already; once is enough.
                log.debug("config watch: %s", exc)
                await backoff.wait()

    async def _on_batch(self, events: list[PeerEvent]) -> None:
        """Peer changes to the backend; the kernel sync times them from their arrival."""
        assert self.network is not None and self.manager is not None
        self.network.kernel.expect(self.manager.batch_received)
        await self._program(self.network.apply(events))

    async def _on_listed(self) -> None:
        """A full listing was handed over: stale entries can go, and /readyz may say ready."""
        assert self.network is not None
        # Listed even if the kernel refused: the backend knows the peers, the retry
        # programs them, and /readyz says "backend not programmed" until it has.
        await self._program(self.network.apply([]))
        self.peers_listed = True

    async def _program(self, call: Awaitable[None]) -> None:
        """Await a backend call that programs the kernel; when it raises (the kernel could
        not be read or written: pyroute2's NetlinkError, OSError), the peers are kept as the
        backend took them and `_repair_kernel` syncs again until it works."""
        try:
            await call
        except Exception as exc:  # noqa: BLE001 - netlink errors come in many types
            self._kernel_failed(exc)
        else:
            if self.kernel_problem is not None:
                self._kernel_ok()  # refused entries, if any, are the sync's to report

    def _kernel_failed(self, exc: Exception) -> None:
        self.failures["kernel"] += 1
        self.kernel_problem = describe_error(exc)
        self._kernel_outage.fail(self.kernel_problem, logging.ERROR)
        self._kernel_retry.set()

    def _kernel_ok(self) -> None:
        self.kernel_problem = None
        self._kernel_outage.ok()

    async def _repair_kernel(self) -> None:
        """After a batch could not be programmed: sync again, with backoff, until a sync
        goes through (the backend's resync would too, but only every --resync-period)."""
        assert self.network is not None
        backoff = Backoff()
        while True:
            await self._kernel_retry.wait()
            await backoff.wait()
            self._kernel_retry.clear()
            try:
                await self.network.kernel.sync()
            except Exception as exc:  # noqa: BLE001 - as in _program
                self._kernel_failed(exc)
                continue
            backoff.reset()
            self._kernel_ok()

    def _set_waiting_for(self, what: str) -> None:
        self.waiting_for = what

    async def serve(self) -> None:
        o = self.opts
        # Before a lease is taken: a folder that cannot hold subnet.env is the user's to fix.
        try:
            check_writable(self.subnet_file.parent)
        except OSError as exc:
            raise StartupError(write_problem(self.subnet_file, exc)) from None
        ext: ExternalInterface | None = None
        try:
            ext = await self._interface()
        except NoIPv4Interface as exc:
            # An IPv6-only host: an IPv6-only config waits (no backend carries IPv6 yet)
            # with /readyz naming the backend, the real blocker; any other needs IPv4.
            no_ipv4 = exc
            log.info("%s; reading the network config before deciding whether IPv4 is"
                     " needed", exc)
        try:
            self.registry = self._registry_factory(etcd_settings(o))
        except EtcdSetupError as exc:
            raise StartupError(str(exc)) from None
        self.config = await wait_for_config(
            self.registry, f"{o.etcd_prefix.rstrip('/')}/config", self._set_waiting_for
        )
        self.waiting_for = None
        c = self.config
        carried = backend_families(c)
        self.families = fams = leased_families(c, carried)
        log.info("network config: %s, backend %s", ", ".join(
            [f"{c.network} (subnets /{c.subnet_len})"] * (4 in fams)
            + [f"{c.ipv6_network} (subnets /{c.ipv6_subnet_len})"] * (6 in fams)),
            c.backend_type)
        if (left_out := ignored(c, c.backend_type, carried)) is not None:
            log.warning("%s", left_out)
        if ext is None:
            # Every config that gets here leases IPv4 (a backend that carries IPv6 alone
            # would need the interface chosen without IPv4 here).
            raise no_ipv4
        if 6 in fams:
            # The IPv6 address to advertise (and the interface's own) is needed now.
            ext = await self._interface(ipv6=True)
        # The VtepMAC (vxlan) is kept next to the subnet file, named after it.
        ctx = BackendContext(self.netlink, ext, o.resync_period, self.subnet_file.parent,
                             self.subnet_file.name)
        try:
            backend = build_backend(self.config, ctx)
            self.network = await backend.register_network(self.config)
        except BackendError as exc:
            raise StartupError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a netlink read (vxlan: find_vxlan)
            raise StartupError(f"cannot set up the {self.config.backend_type} backend:"
                               f" {describe_error(exc)}") from None
        if self._monitor_factory is not None:
            self.network.kernel.watch(self._monitor_factory)
        # PublicIPv6 (and BackendV6Data) only when IPv6 is leased, as flanneld's lease
        # says PublicIPv6 only for a family it set up.
        attrs = self.network.lease_attrs
        if 6 in fams:
            attrs = dataclasses.replace(attrs, public_ipv6=attrs.public_ipv6 or ext.public_ipv6)
        else:
            attrs = dataclasses.replace(attrs, public_ipv6=None, backend_v6_data=None)
        self.manager = LeaseManager(
            self.registry, self.config, attrs, families=fams,
            previous=read_previous_subnet(self.subnet_file) if 4 in fams else None,
            previous6=read_previous_ipv6_subnet(self.subnet_file) if 6 in fams else None,
            ttl=o.subnet_lease_ttl, renew_margin=o.subnet_lease_renew_margin * 60.0,
        )
        lease = await self.manager.acquire()
        # Device first, then subnet.env: a failed setup leaves no subnet.env of this run
        # for Docker to start on (one from an earlier run stays; docs/troubleshooting.md).
        try:
            await self.network.setup(lease)
        except BackendError as exc:
            raise StartupError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the first sync's netlink reads and writes
            raise StartupError(
                f"cannot program the {self.config.backend_type} backend for subnet"
                f" {lease.describe()}: {describe_error(exc)}") from None
        try:
            self._write_subnet_file(lease)
        except SubnetFileError as exc:
            raise StartupError(str(exc)) from None
        if o.ip_masq or o.iptables_forward_rules:
            # flanneld's chains per family leased: iptables for IPv4, ip6tables for IPv6.
            v4, v6 = 4 in fams, 6 in fams
            self.iptables = IptablesKeeper(
                self._iptables_factory() if v4 else None, c.network if v4 else None,
                lease.subnet if v4 else None, ip_masq=o.ip_masq,
                forward_rules=o.iptables_forward_rules,
                random_fully_disable=o.ip_masq_fully_random_disable, resync=o.iptables_resync,
                runner6=self._iptables6_factory() if v6 else None,
                network6=c.ipv6_network if v6 else None,
                subnet6=lease.ipv6_subnet if v6 else None,
            )
        async with asyncio.TaskGroup() as tg:
            if self.iptables is not None:
                tg.create_task(self.iptables.run(), name="iptables")
            tg.create_task(self.manager.watch(self._on_batch, self._on_listed), name="watch")
            tg.create_task(self.manager.hold(self._on_new_lease), name="hold")
            tg.create_task(self._install_leases(), name="install-leases")
            tg.create_task(self._repair_kernel(), name="repair-kernel")
            tg.create_task(self.network.run(), name="resync")
            tg.create_task(self._report_config_changes(self.registry), name="config")

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        health = None
        if self.opts.healthz_port:
            from agent.health import start_health_server
            from agent.metrics import render

            try:
                health = await start_health_server(
                    self.opts.healthz_ip, self.opts.healthz_port, self.not_ready_reason,
                    lambda: render(self), self.heartbeat,
                )
            except OSError as exc:
                log.error("--healthz-port: cannot listen on %s:%d: %s",
                          self.opts.healthz_ip, self.opts.healthz_port, exc.strerror)
                return 1
        heartbeat = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        # systemd (Type=notify): STATUS= on state changes, READY=1, watchdog pings.
        notifier = sd_notify.Notifier.from_environ()
        reporter = asyncio.create_task(sd_notify.report(
            notifier, lambda: sd_notify.daemon_status(self), sd_notify.watchdog_interval()))
        task = asyncio.create_task(self.serve(), name="serve")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if task.done():
            code = 1
            error = task.exception()
            reporter.cancel()
            notifier.stopping(f"stopped by an error: {error}")
            if isinstance(error, StartupError):
                log.error("%s", error)
            elif error is None:
                log.error("stopped: every task of the agent ended")
            elif isinstance(error, BaseExceptionGroup):
                # What a user can cause is handled where it happens; this is a bug, and
                # its traceback is what finds it.
                for sub in error.exceptions:
                    log.error("stopped by an error: %r", sub, exc_info=sub)
            else:
                log.error("stopped by an error: %r", error, exc_info=error)
        else:
            log.info("stopping; the lease and the kernel state stay in place")
            reporter.cancel()
            notifier.stopping("stopping; the lease and the kernel state stay in place")
            task.cancel()
            try:
                await asyncio.wait_for(task, STOP_GRACE / 2)
            except asyncio.CancelledError:
                pass  # stopped as asked
            except TimeoutError:
                log.warning("stopping: the agent's tasks did not stop within %.2f s; "
                            "leaving them", STOP_GRACE / 2)
            except Exception as exc:  # noqa: BLE001 - said, then the stop goes on
                _stop_failed("stopping the agent's tasks", exc)
        stopper.cancel()
        heartbeat.cancel()
        if health is not None:
            health.close()
        try:
            await asyncio.wait_for(self._close(), STOP_GRACE / 2)
        except TimeoutError:
            log.warning("stopping: closing the backend, etcd client and netlink took over"
                        " %.2f s; leaving them", STOP_GRACE / 2)
        notifier.close()
        log.debug("main loop done")
        return code

    async def _close(self) -> None:
        """Close what the agent opened, each on its own: one that fails is one line, and
        the others are still closed."""
        closers: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.network is not None:
            closers.append(("the backend", self.network.close))
        if self.registry is not None:
            closers.append(("the etcd client", self.registry.close))
        closers.append(("netlink", self.netlink.close))
        for what, close in closers:
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - said, then the next is closed
                _stop_failed(f"closing {what}", exc)


def _stop_failed(what: str, exc: Exception) -> None:
    """One line, no traceback: nothing is left to do about an error while stopping."""
    errors = exc.exceptions if isinstance(exc, ExceptionGroup) else (exc,)
    for sub in errors:
        log.warning("stopping: %s failed: %s", what, describe_error(sub))


def run(opts: Options) -> int:
    """Run the daemon on uvloop over etcd, the kernel and the iptables commands; returns
    the process exit code."""
    daemon = Daemon(opts, registry_factory=EtcdRegistry, netlink_factory=IPRouteNetlink,
                    iptables_factory=Iptables, monitor_factory=KernelMonitor)
    return uvloop.run(daemon.main())
