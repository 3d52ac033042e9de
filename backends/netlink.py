"""Netlink facade: the few idempotent kernel calls the backends need, and a fake of it.

`Netlink` wraps pyroute2's IPRoute. pyroute2's asyncio socket cannot run on uvloop (uvloop
refuses netlink datagram endpoints), so every call runs the synchronous IPRoute in one
dedicated worker thread; a batch of route changes is one hop to that thread. `FakeNetlink`
keeps routes in memory, records calls and fails on demand, for tests without root.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAIN_TABLE = 254
RTPROT_BOOT = 3
RTNH_F_ONLINK = 4


@dataclass(frozen=True, order=True)
class Route:
    """An IPv4 route in the main table."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    oif: int
    onlink: bool = False


@dataclass(frozen=True)
class Link:
    """A network interface and its IPv4 addresses."""

    name: str
    index: int
    mtu: int
    up: bool
    addresses: tuple[ipaddress.IPv4Interface, ...]


@dataclass(frozen=True)
class RouteError:
    """One route change the kernel refused."""

    route: Route
    op: str
    error: str


class Netlink:
    """Real kernel access through pyroute2, serialised on one worker thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: Any = None

    def _ip(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # -- links -----------------------------------------------------------------------
    def _links_sync(self) -> list[Link]:
        ipr = self._ip()
        addrs: dict[int, list[ipaddress.IPv4Interface]] = {}
        for msg in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(msg["index"], []).append(
                ipaddress.IPv4Interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            )
        out = []
        for msg in ipr.get_links():
            idx = msg["index"]
            out.append(
                Link(
                    msg.get("IFLA_IFNAME"),
                    idx,
                    msg.get("IFLA_MTU"),
                    bool(msg["flags"] & 1),
                    tuple(addrs.get(idx, ())),
                )
            )
        return out

    async def links(self) -> list[Link]:
        """Every interface with its IPv4 addresses."""
        return await self._run(self._links_sync)

    def _route_get_sync(self, dst: str) -> int | None:
        try:
            msgs = self._ip().route("get", dst=dst)
        except Exception:  # noqa: BLE001 - "no route" comes back as various errors
            return None
        for msg in msgs:
            oif = msg.get("RTA_OIF")
            if oif:
                return int(oif)
        return None

    async def route_get_oif(self, dst: ipaddress.IPv4Address) -> int | None:
        """The interface index the kernel would use to reach `dst`."""
        return await self._run(lambda: self._route_get_sync(str(dst)))

    def _default_oif_sync(self) -> int | None:
        for msg in self._ip().get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if msg["dst_len"] == 0 and msg.get("RTA_OIF"):
                return int(msg.get("RTA_OIF"))
        return None

    async def default_route_oif(self) -> int | None:
        """The interface of the IPv4 default route, if any."""
        return await self._run(self._default_oif_sync)

    # -- routes ----------------------------------------------------------------------
    def _routes_sync(self, oif: int | None) -> list[Route]:
        out = []
        kw: dict[str, Any] = {"family": socket.AF_INET, "table": MAIN_TABLE}
        if oif is not None:
            kw["oif"] = oif
        for msg in self._ip().get_routes(**kw):
            if msg["type"] != 1:  # RTN_UNICAST only
                continue
            dst = msg.get("RTA_DST") or "0.0.0.0"
            gw = msg.get("RTA_GATEWAY")
            out.append(
                Route(
                    ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}"),
                    ipaddress.IPv4Address(gw) if gw else None,
                    int(msg.get("RTA_OIF") or 0),
                    bool(msg["flags"] & RTNH_F_ONLINK),
                )
            )
        return out

    async def routes(self, oif: int | None = None) -> list[Route]:
        """Unicast IPv4 routes of the main table (optionally only via `oif`)."""
        return await self._run(lambda: self._routes_sync(oif))

    def _apply_sync(self, replace: list[Route], delete: list[Route]) -> list[RouteError]:
        ipr = self._ip()
        errors = []
        for r in delete:
            try:
                ipr.route("del", **_route_kw(r))
            except Exception as exc:  # noqa: BLE001 - reported to the caller per route
                if getattr(exc, "code", None) != errno.ESRCH:
                    errors.append(RouteError(r, "delete", _err(exc)))
        for r in replace:
            try:
                ipr.route("replace", **_route_kw(r))
            except Exception as exc:  # noqa: BLE001
                errors.append(RouteError(r, "replace", _err(exc)))
        return errors

    async def apply_routes(
        self, replace: Iterable[Route], delete: Iterable[Route]
    ) -> list[RouteError]:
        """Replace and delete routes in one hop; returns the changes the kernel refused."""
        rep, dele = list(replace), list(delete)
        if not rep and not dele:
            return []
        return await self._run(lambda: self._apply_sync(rep, dele))

    async def close(self) -> None:
        def _close() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        await self._run(_close)
        self._pool.shutdown(wait=False)


def _route_kw(r: Route) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "dst": str(r.dst.network_address),
        "dst_len": r.dst.prefixlen,
        "oif": r.oif,
        "table": MAIN_TABLE,
        "proto": RTPROT_BOOT,
    }
    if r.gateway is not None:
        kw["gateway"] = str(r.gateway)
    if r.onlink:
        kw["flags"] = RTNH_F_ONLINK
    return kw


def _err(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{errno.errorcode[code]} ({code}): {exc}"
    return str(exc)


class FakeNetlink:
    """In-memory stand-in for Netlink: keeps routes, records calls, fails on demand."""

    def __init__(self, links: Iterable[Link] = ()) -> None:
        self._links = list(links)
        self.table: dict[ipaddress.IPv4Network, Route] = {}
        self.calls: list[tuple[str, Route]] = []
        self.fail: Callable[[str, Route], str | None] = lambda op, r: None

    async def links(self) -> list[Link]:
        return list(self._links)

    async def route_get_oif(self, dst: ipaddress.IPv4Address) -> int | None:
        for link in self._links:
            if any(dst in a.network for a in link.addresses):
                return link.index
        return await self.default_route_oif()

    async def default_route_oif(self) -> int | None:
        return self._links[0].index if self._links else None

    async def routes(self, oif: int | None = None) -> list[Route]:
        return [r for r in self.table.values() if oif is None or r.oif == oif]

    async def apply_routes(
        self, replace: Iterable[Route], delete: Iterable[Route]
    ) -> list[RouteError]:
        errors = []
        for r in delete:
            self.calls.append(("delete", r))
            problem = self.fail("delete", r)
            if problem:
                errors.append(RouteError(r, "delete", problem))
            else:
                self.table.pop(r.dst, None)
        for r in replace:
            self.calls.append(("replace", r))
            problem = self.fail("replace", r)
            if problem:
                errors.append(RouteError(r, "replace", problem))
            else:
                self.table[r.dst] = r
        return errors

    async def close(self) -> None:
        return None
