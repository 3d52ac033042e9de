"""The daemon: the one place that builds concrete classes and runs the agent's phases.

Phases: choose the external interface; connect to etcd; wait for a valid network config;
build the backend; acquire the lease; program the backend and write subnet.env; then run
(peer watch, lease keeper, backend resync, config watch) until SIGTERM/SIGINT, which stop
everything within 2 s and leave the lease and the kernel state in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from pathlib import Path

import uvloop

from agent import sd_notify
from agent.backoff import Backoff, OutageLog
from agent.cli import Options
from agent.config import ConfigError, NetworkConfig, parse_config
from agent.etcd_registry import EtcdRegistry, EtcdSettings, EtcdSetupError
from agent.lease_manager import Lease, LeaseManager
from agent.registry import Registry, RegistryUnavailable
from agent.subnet_file import SubnetEnv, read_previous_subnet, write_subnet_file
from backends import AVAILABLE
from backends.base import Backend, BackendError, Network
from backends.external_iface import ExternalInterface, InterfaceError, choose_interface
from backends.iptables import Iptables, IptablesKeeper
from backends.netlink import Netlink

log = logging.getLogger("tweed")

#: Seconds a clean stop may take before the remaining work is abandoned.
STOP_GRACE = 1.5


class StartupError(RuntimeError):
    """The agent cannot start with these settings; the message says why."""


async def wait_for_config(registry: Registry, key: str) -> NetworkConfig:
    """Read the network config; until it exists and is valid, watch the key for changes."""
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
                        return parse_config(value)
                    except ConfigError as exc:
                        problem = f"invalid network config at {key}: {exc}; waiting for a fix"
                        level = logging.ERROR
                if problem != reported:
                    log.log(level, "%s", problem)
                    reported = problem
                # Watch, not poll: the next change wakes us.
                async with contextlib.aclosing(registry.watch_config(rev + 1)) as changes:
                    change = await anext(changes, None)
                if change is None:
                    raise RegistryUnavailable("config watch ended")
                value, rev = change
        except RegistryUnavailable as exc:
            outage.fail(str(exc))
            await backoff.wait()


def build_backend(
    config: NetworkConfig, netlink: Netlink, ext: ExternalInterface, opts: Options
) -> Backend:
    """The backend named by the config; StartupError if this build has no such backend."""
    btype = config.backend_type
    if btype == "host-gw":
        from backends.hostgw import HostGwBackend

        return HostGwBackend(netlink, ext, resync=opts.resync_period)
    if btype == "udp":
        from backends.udp import UdpBackend

        return UdpBackend(netlink, ext, resync=opts.resync_period)
    if btype == "vxlan":
        from backends.vxlan import VxlanBackend

        # The VtepMAC is kept next to the subnet file, named after it.
        sf = Path(opts.subnet_file)
        return VxlanBackend(netlink, ext, sf.parent, sf.name, resync=opts.resync_period)
    raise StartupError(
        f"Backend.Type {btype!r} is not available in tweed (available: {', '.join(AVAILABLE)})"
    )


class Daemon:
    """One run of the agent."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.netlink = Netlink()
        self.registry: EtcdRegistry | None = None
        self.manager: LeaseManager | None = None
        self.network: Network | None = None
        self.config: NetworkConfig | None = None
        self.subnet_file = Path(opts.subnet_file)
        self.file_written = False
        self.iptables: IptablesKeeper | None = None  # --ip-masq / --iptables-forward-rules

    def not_ready_reason(self) -> str | None:
        if self.config is None:
            return "waiting for a valid network config"
        if self.manager is None or self.manager.lease is None:
            return "no subnet lease yet"
        if not self.file_written:
            return "subnet file not written"
        if self.network is None or not self.network.ready():
            return "backend not programmed"
        return None

    async def _interface(self) -> ExternalInterface:
        o = self.opts
        links = await self.netlink.links()
        reach = None
        if o.iface_can_reach:
            reach = await self.netlink.route_get_oif(ipaddress.IPv4Address(o.iface_can_reach))
            if reach is None and not o.iface and not o.iface_regex:
                raise StartupError(f"--iface-can-reach: no route to {o.iface_can_reach}")
        default = await self.netlink.default_route_oif()
        try:
            ext = choose_interface(
                links, iface=o.iface, iface_regex=o.iface_regex, can_reach_oif=reach,
                default_oif=default, public_ip=o.public_ip,
            )
        except InterfaceError as exc:
            raise StartupError(str(exc)) from None
        log.info(
            "using interface %s (index %d, MTU %d) with address %s, public IP %s",
            ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip,
        )
        return ext

    def _write_subnet_file(self, lease: Lease) -> None:
        assert self.config is not None and self.network is not None
        env = SubnetEnv(self.config.network, lease.subnet, self.network.mtu, self.opts.ip_masq)
        write_subnet_file(self.subnet_file, env)
        self.file_written = True
        log.info("wrote %s (subnet %s, MTU %d)", self.subnet_file, lease.subnet, env.mtu)

    async def _on_new_lease(self, lease: Lease) -> None:
        assert self.network is not None
        await self.network.setup(lease)
        self._write_subnet_file(lease)
        if self.iptables is not None:
            self.iptables.set_subnet(lease.subnet)

    async def _report_config_changes(self, registry: Registry) -> None:
        """A changed config is reported, not applied: applying it needs a restart."""
        key = f"{self.opts.etcd_prefix.rstrip('/')}/config"
        backoff = Backoff()
        while True:
            try:
                _, rev = await registry.get_config()
                async for value, _ in registry.watch_config(rev + 1):
                    if value is None:
                        log.warning("the network config %s was deleted; keeping the old one", key)
                        continue
                    try:
                        new = parse_config(value)
                    except ConfigError as exc:
                        log.error("the new network config at %s is invalid, not applied: %s",
                                  key, exc)
                        continue
                    if new != self.config:
                        log.warning("the network config changed; restart tweed to apply it")
            except RegistryUnavailable:
                await backoff.wait()

    async def serve(self) -> None:
        o = self.opts
        ext = await self._interface()
        try:
            self.registry = EtcdRegistry(EtcdSettings(
                tuple(e for e in o.etcd_endpoints.split(",") if e),
                o.etcd_prefix, o.etcd_keyfile, o.etcd_certfile, o.etcd_cafile,
                o.etcd_username, o.etcd_password,
            ))
        except EtcdSetupError as exc:
            raise StartupError(str(exc)) from None
        self.config = await wait_for_config(
            self.registry, f"{o.etcd_prefix.rstrip('/')}/config"
        )
        log.info("network config: %s, subnets /%d, backend %s",
                 self.config.network, self.config.subnet_len, self.config.backend_type)
        backend = build_backend(self.config, self.netlink, ext, o)
        try:
            self.network = await backend.register_network(self.config)
        except BackendError as exc:
            raise StartupError(str(exc)) from None
        self.manager = LeaseManager(
            self.registry, self.config, self.network.lease_attrs,
            previous=read_previous_subnet(self.subnet_file),
            ttl=o.subnet_lease_ttl, renew_margin=o.subnet_lease_renew_margin * 60.0,
        )
        lease = await self.manager.acquire()
        self._write_subnet_file(lease)
        try:
            await self.network.setup(lease)
        except BackendError as exc:
            raise StartupError(str(exc)) from None
        if o.ip_masq or o.iptables_forward_rules:
            self.iptables = IptablesKeeper(
                Iptables(), self.config.network, lease.subnet, ip_masq=o.ip_masq,
                forward_rules=o.iptables_forward_rules,
                random_fully_disable=o.ip_masq_fully_random_disable, resync=o.iptables_resync,
            )
        async with asyncio.TaskGroup() as tg:
            if self.iptables is not None:
                tg.create_task(self.iptables.run(), name="iptables")
            tg.create_task(self.manager.watch(self.network.apply), name="watch")
            tg.create_task(self.manager.hold(self._on_new_lease), name="hold")
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
                    lambda: render(self),
                )
            except OSError as exc:
                log.error("--healthz-port: cannot listen on %s:%d: %s",
                          self.opts.healthz_ip, self.opts.healthz_port, exc.strerror)
                return 1
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
            exc = task.exception()
            reporter.cancel()
            notifier.stopping(f"stopped by an error: {exc}")
            if isinstance(exc, StartupError):
                log.error("%s", exc)
            elif isinstance(exc, BaseExceptionGroup):
                for sub in exc.exceptions:
                    log.error("stopped by an error: %r", sub, exc_info=sub)
            else:
                log.error("stopped by an error: %r", exc, exc_info=exc)
        else:
            log.info("stopping; the lease and the kernel state stay in place")
            reporter.cancel()
            notifier.stopping("stopping; the lease and the kernel state stay in place")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(task, STOP_GRACE / 2)
        stopper.cancel()
        if health is not None:
            health.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._close(), STOP_GRACE / 2)
        notifier.close()
        log.debug("main loop done")
        return code

    async def _close(self) -> None:
        if self.network is not None:
            await self.network.close()
        if self.registry is not None:
            await self.registry.close()
        await self.netlink.close()


def run(opts: Options) -> int:
    """Run the daemon on uvloop; returns the process exit code."""
    return uvloop.run(Daemon(opts).main())
