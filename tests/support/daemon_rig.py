"""A real agent.daemon.Daemon for unit tests, over a MemoryRegistry and a FakeNetlink.

The daemon is built as `run()` builds it, with test factories instead of etcd, pyroute2
and the iptables commands, and driven by its own `serve()` (or `main()`): nothing inside
it is patched. One interface (eth0, 192.168.100.1/24, MTU 1500); host-gw network
10.5.0.0/16.

Failures are injected at the edges only: `rig.fake.failing[<Netlink method>] = exc` makes
that call raise until the entry is removed, `rig.reg.failing.add(<Registry method>)` makes
that registry call raise RegistryUnavailable (counted as an etcd error) until removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.daemon import Daemon
from agent.lease_codec import LeaseAttrs, encode_lease
from agent.options import EtcdSettings, Options
from agent.registry import Event, MemoryRegistry, RegistryUnavailable, Snapshot
from backends.iptables.keeper import Iptables
from backends.kernel.fake import FakeNetlink
from backends.kernel.types import ChangeSet, KernelError, Link, VxlanDevice, VxlanSpec
from tests.support.aio import until

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
CONFIG = b'{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}'
PUBLIC_IP = IP("192.168.100.1")
ETH0 = Link("eth0", 2, 1500, True, (ipaddress.IPv4Interface(f"{PUBLIC_IP}/24"),))
#: The subnet the rig's daemon asks for (its "previous run" left it in subnet.env), so that
#: the peers' subnets the tests put never collide with ours.
OWN = NET("10.5.1.0/24")


def peer_value(n: int, backend: str = "host-gw") -> bytes:
    """A peer's lease value: PublicIP 192.168.100.<n>."""
    return encode_lease(LeaseAttrs(IP(f"192.168.100.{n}"), None, backend, None))


class NetlinkError(Exception):
    """What pyroute2 raises for a refused request: a plain Exception, not an OSError."""

    def __init__(self, code: int = 1, text: str = "Operation not permitted") -> None:
        super().__init__(code, text)


class GatedRegistry(MemoryRegistry):
    """A MemoryRegistry whose subnet watch delivers nothing while `watch_open` is clear
    (as when etcd's watch stream lags behind its unary calls), and whose calls named in
    `failing` raise RegistryUnavailable (as EtcdRegistry does for any failed RPC)."""

    def __init__(self) -> None:
        super().__init__()
        self.watch_open = asyncio.Event()
        self.watch_open.set()
        self.failing: set[str] = set()

    def _inject(self, op: str) -> None:
        if op in self.failing:
            self.requests[(op, "error")] = self.requests.get((op, "error"), 0) + 1
            raise RegistryUnavailable(f"injected: {op} fails")

    async def get_config(self) -> tuple[bytes | None, int]:
        self._inject("get_config")
        return await super().get_config()

    async def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        self._inject("watch_config")
        async for change in super().watch_config(start_revision):
            self._inject("watch_config")
            yield change

    async def list_subnets(self) -> Snapshot:
        self._inject("list_subnets")
        return await super().list_subnets()

    async def create_subnet(self, name: str, value: bytes, ttl: int) -> int | None:
        self._inject("create_subnet")
        return await super().create_subnet(name, value, ttl)

    async def update_subnet(
        self, name: str, value: bytes, ttl: int, if_mod_revision: int
    ) -> int | None:
        self._inject("update_subnet")
        return await super().update_subnet(name, value, ttl, if_mod_revision)

    async def delete_subnet(self, name: str) -> None:
        self._inject("delete_subnet")
        await super().delete_subnet(name)

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[list[Event]]:
        self._inject("watch_subnets")
        async for batch in super().watch_subnets(start_revision):
            await self.watch_open.wait()
            self._inject("watch_subnets")
            yield batch

    async def close(self) -> None:
        self._inject("close")
        await super().close()


class FailingNetlink(FakeNetlink):
    """A FakeNetlink whose methods named in `failing` raise the exception given there."""

    def __init__(self, links: list[Link]) -> None:
        super().__init__(links)
        self.failing: dict[str, Exception] = {}

    def _inject(self, op: str) -> None:
        exc = self.failing.get(op)
        if exc is not None:
            raise exc

    async def links(self) -> list[Link]:
        self._inject("links")
        return await super().links()

    async def route_get_oif(self, dst: IP) -> int | None:
        self._inject("route_get_oif")
        return await super().route_get_oif(dst)

    async def default_route_oif(self) -> int | None:
        self._inject("default_route_oif")
        return await super().default_route_oif()

    async def routes(self, oif: int | None = None) -> list[Any]:
        self._inject("routes")
        return await super().routes(oif)

    async def neighbours(self, index: int) -> list[Any]:
        self._inject("neighbours")
        return await super().neighbours(index)

    async def fdb_entries(self, index: int) -> list[Any]:
        self._inject("fdb_entries")
        return await super().fdb_entries(index)

    async def find_vxlan(self, name: str) -> VxlanDevice | None:
        self._inject("find_vxlan")
        return await super().find_vxlan(name)

    async def configure_link(
        self, name: str, address: ipaddress.IPv4Interface, mtu: int, txqlen: int
    ) -> int:
        self._inject("configure_link")
        return await super().configure_link(name, address, mtu, txqlen)

    async def ensure_vxlan(
        self, spec: VxlanSpec, mac: str, mtu: int, address: ipaddress.IPv4Interface
    ) -> VxlanDevice:
        self._inject("ensure_vxlan")
        return await super().ensure_vxlan(spec, mac, mtu, address)

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        self._inject("apply")
        return await super().apply(cs)

    async def close(self) -> None:
        self._inject("close")
        await super().close()


def no_iptables() -> Iptables:
    raise AssertionError("this test did not expect the daemon to run iptables")


class DaemonRig:
    """A Daemon over `reg` and `fake`, its subnet file in `tmp` (or at `subnet_file`);
    `opts` override Options.

    Defaults differ from the flags' where a test needs it: no health server (main() only),
    no iptables, a 600 s lease.
    """

    def __init__(self, tmp: Path, *, previous: NET | None = OWN,
                 iptables: Callable[[], Iptables] = no_iptables,
                 subnet_file: Path | None = None, **opts: Any) -> None:
        self.reg = GatedRegistry()
        self.fake = FailingNetlink([ETH0])
        self.subnet_file = subnet_file or tmp / "subnet.env"
        if previous is not None:
            self.subnet_file.write_text(
                f"FLANNEL_SUBNET={previous.network_address + 1}/{previous.prefixlen}\n")
        settings: dict[str, Any] = {"subnet_file": str(self.subnet_file), "healthz_port": 0,
                                    "iptables_forward_rules": False, "subnet_lease_ttl": 600}
        self.opts = Options(**{**settings, **opts})
        self.etcd_settings: list[EtcdSettings] = []  # what the registry factory was given
        self.daemon = Daemon(self.opts, registry_factory=self._registry,
                             netlink_factory=lambda: self.fake, iptables_factory=iptables)
        self.task: asyncio.Task[Any] | None = None

    def _registry(self, settings: EtcdSettings) -> MemoryRegistry:
        self.etcd_settings.append(settings)
        return self.reg

    def start(self, run: Callable[[], Any] | None = None) -> asyncio.Task[Any]:
        """Run the daemon's serve() (or `run`, e.g. its main()) as a task."""
        self.task = asyncio.create_task((run or self.daemon.serve)())
        return self.task

    def _alive(self) -> bool:
        if self.task is not None and self.task.done():
            # The daemon stopped on its own: say why instead of waiting out the bound.
            exc = self.task.exception()
            raise AssertionError(f"the daemon stopped: {exc!r}") from exc
        return True

    async def until(self, pred: Callable[[], object], what: str, limit: float = 5.0) -> Any:
        """tests.support.aio.until, failing at once (with its error) if the daemon stops."""
        return await until(lambda: self._alive() and pred(), limit, what=what,
                           detail=lambda: f"not ready: {self.daemon.not_ready_reason()}")

    async def ready(self) -> None:
        """Until /readyz would say ready."""
        await self.until(lambda: self.daemon.not_ready_reason() is None, "ready")

    async def serve_ready(self, config: bytes = CONFIG) -> None:
        """Put the config, serve, wait until ready."""
        await self.reg.set_config(config)
        self.start()
        await self.ready()

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
