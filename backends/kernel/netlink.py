"""The kernel through pyroute2: `IPRouteNetlink` implements the `Netlink` protocol.

pyroute2's asyncio socket cannot run on uvloop (uvloop refuses netlink datagram endpoints),
so every call runs the synchronous IPRoute in one dedicated worker thread; a batch of route
changes is one hop to that thread.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from backends.kernel.types import (
    VXLAN_DEFAULT_PORT,
    ChangeSet,
    Fdb,
    KernelError,
    Link,
    Neigh,
    Route,
    VxlanDevice,
    VxlanSpec,
)

T = TypeVar("T")

MAIN_TABLE = 254
RTPROT_BOOT = 3
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7


class IPRouteNetlink:
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
            info = msg.get("IFLA_LINKINFO")
            out.append(
                Link(
                    msg.get("IFLA_IFNAME"),
                    idx,
                    msg.get("IFLA_MTU"),
                    bool(msg["flags"] & 1),
                    tuple(addrs.get(idx, ())),
                    (info.get("IFLA_INFO_KIND") if info else "") or "",
                    msg.get("IFLA_ADDRESS") or "",
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

    def _apply_sync(self, cs: ChangeSet) -> list[KernelError]:
        ipr = self._ip()
        # Per kind: the IPRoute call (taking "del" or "replace") and its arguments.
        calls: dict[str, tuple[Callable[..., Any], Callable[[Any], dict[str, Any]]]] = {
            "route": (ipr.route, _route_kw), "neigh": (ipr.neigh, _neigh_kw),
            "fdb": (ipr.fdb, _fdb_kw),
        }
        errors: list[KernelError] = []
        for what, op, items in cs.steps():
            call, kwargs = calls[what]
            for item in items:
                try:
                    call("del" if op == "delete" else "replace", **kwargs(item))
                except Exception as exc:  # noqa: BLE001 - reported to the caller per change
                    if op == "delete" and getattr(exc, "code", None) in (errno.ESRCH,
                                                                         errno.ENOENT):
                        continue  # already gone: that is what we wanted
                    errors.append(KernelError(what, op, item, _err(exc)))
        return errors

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        """Apply a change set in one hop to the netlink thread; returns what was refused."""
        if not cs:
            return []
        return await self._run(lambda: self._apply_sync(cs))

    def _neigh_sync(self, index: int) -> list[Neigh]:
        out = []
        for msg in self._ip().get_neighbours(family=socket.AF_INET, ifindex=index):
            if not msg["state"] & NUD_PERMANENT:
                continue
            dst, mac = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
            if dst and mac:
                out.append(Neigh(ipaddress.IPv4Address(dst), mac, index))
        return out

    async def neighbours(self, index: int) -> list[Neigh]:
        """Permanent IPv4 neighbour entries on device `index`."""
        return await self._run(lambda: self._neigh_sync(index))

    def _fdb_sync(self, index: int) -> list[Fdb]:
        out = []
        for msg in self._ip().fdb("dump", ifindex=index):
            if msg["ifindex"] != index:
                continue
            dst, mac = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
            if dst and mac and ":" not in dst:
                out.append(Fdb(mac, ipaddress.IPv4Address(dst), index))
        return out

    async def fdb_entries(self, index: int) -> list[Fdb]:
        """Forwarding entries with an IPv4 destination on vxlan device `index`."""
        return await self._run(lambda: self._fdb_sync(index))

    # -- plain devices -----------------------------------------------------------------
    def _configure_sync(
        self, name: str, address: ipaddress.IPv4Interface, mtu: int, txqlen: int
    ) -> int:
        ipr = self._ip()
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise OSError(errno.ENODEV, f"no device {name}")
        index = idx[0]
        ipr.link("set", index=index, mtu=mtu, txqlen=txqlen)
        have = [
            ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=socket.AF_INET, index=index)
        ]
        for a in have:
            if a != address:
                ipr.addr("del", index=index, address=str(a.ip), prefixlen=a.network.prefixlen)
        if address not in have:
            ipr.addr("add", index=index, address=str(address.ip),
                     prefixlen=address.network.prefixlen)
        ipr.link("set", index=index, state="up")
        return index

    async def configure_link(
        self, name: str, address: ipaddress.IPv4Interface, mtu: int, txqlen: int
    ) -> int:
        """Give device `name` exactly this address, this MTU and queue length, and bring it
        up; returns its index."""
        return await self._run(lambda: self._configure_sync(name, address, mtu, txqlen))

    # -- vxlan devices -----------------------------------------------------------------
    def _vxlan_sync(self, name: str) -> VxlanDevice | None:
        ipr = self._ip()
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        msg = ipr.get_links(idx[0])[0]
        info = msg.get("IFLA_LINKINFO")
        if not info or info.get("IFLA_INFO_KIND") != "vxlan":
            return VxlanDevice(VxlanSpec(name, -1, ipaddress.IPv4Address(0), 0, 0), idx[0],
                               "", 0, False, ())
        data = info.get("IFLA_INFO_DATA")
        local = data.get("IFLA_VXLAN_LOCAL")
        spec = VxlanSpec(
            name,
            int(data.get("IFLA_VXLAN_ID") or 0),
            ipaddress.IPv4Address(local or 0),
            int(data.get("IFLA_VXLAN_LINK") or 0),
            int(data.get("IFLA_VXLAN_PORT") or 0),
            bool(data.get("IFLA_VXLAN_LEARNING")),
            data.get("IFLA_VXLAN_GBP") is not None,
        )
        addrs = tuple(
            ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=socket.AF_INET, index=idx[0])
        )
        return VxlanDevice(spec, idx[0], msg.get("IFLA_ADDRESS") or "", msg.get("IFLA_MTU"),
                           bool(msg["flags"] & 1), addrs)

    async def find_vxlan(self, name: str) -> VxlanDevice | None:
        """The device called `name` (spec vni -1 when it is not vxlan), or None."""
        return await self._run(lambda: self._vxlan_sync(name))

    def _ensure_vxlan_sync(
        self, spec: VxlanSpec, mac: str, mtu: int, address: ipaddress.IPv4Interface
    ) -> VxlanDevice:
        ipr = self._ip()
        want = spec if spec.port else VxlanSpec(
            spec.name, spec.vni, spec.local, spec.link, VXLAN_DEFAULT_PORT, spec.learning,
            spec.gbp)
        dev = self._vxlan_sync(spec.name)
        if dev is not None and dev.spec != want:
            ipr.link("del", index=dev.index)
            dev = None
        if dev is None:
            kw: dict[str, Any] = {
                "ifname": spec.name, "kind": "vxlan", "vxlan_id": spec.vni,
                "vxlan_local": str(spec.local), "vxlan_link": spec.link,
                "vxlan_port": want.port, "vxlan_learning": int(spec.learning),
                "address": mac, "mtu": mtu,
            }
            if spec.gbp:
                kw["vxlan_gbp"] = True
            ipr.link("add", **kw)
            dev = self._vxlan_sync(spec.name)
            assert dev is not None
        if dev.mac != mac or dev.mtu != mtu:
            ipr.link("set", index=dev.index, address=mac, mtu=mtu)
        for a in dev.addresses:
            if a != address:
                ipr.addr("del", index=dev.index, address=str(a.ip), prefixlen=a.network.prefixlen)
        if address not in dev.addresses:
            ipr.addr("add", index=dev.index, address=str(address.ip),
                     prefixlen=address.network.prefixlen)
        if not dev.up:
            ipr.link("set", index=dev.index, state="up")
        found = self._vxlan_sync(spec.name)
        assert found is not None
        return found

    async def ensure_vxlan(
        self, spec: VxlanSpec, mac: str, mtu: int, address: ipaddress.IPv4Interface
    ) -> VxlanDevice:
        """Make the vxlan device match: reuse a compatible one, recreate an incompatible one;
        set MAC, MTU, the single address, and bring it up."""
        return await self._run(lambda: self._ensure_vxlan_sync(spec, mac, mtu, address))

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
    else:
        kw["scope"] = RT_SCOPE_LINK  # a device route, as `ip route add <net> dev <dev>`
    if r.onlink:
        kw["flags"] = RTNH_F_ONLINK
    return kw


def _neigh_kw(n: Neigh) -> dict[str, Any]:
    return {"dst": str(n.ip), "lladdr": n.mac, "ifindex": n.index, "state": NUD_PERMANENT,
            "family": socket.AF_INET}


def _fdb_kw(f: Fdb) -> dict[str, Any]:
    return {"lladdr": f.mac, "dst": str(f.dst), "ifindex": f.index, "state": NUD_PERMANENT,
            "flags": NTF_SELF}


def _err(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{errno.errorcode[code]} ({code}): {exc}"
    return str(exc)
