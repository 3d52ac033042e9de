"""The kernel through pyroute2: `IPRouteNetlink` implements the `Netlink` protocol.

pyroute2's asyncio socket cannot run on uvloop (uvloop refuses netlink datagram endpoints),
so every call runs in one dedicated worker thread; a change set is one hop to that thread.
Links, addresses and vxlan devices (a few calls per start) go through pyroute2's IPRoute.
Routes, neighbours and FDB entries (thousands at scale) go through `Rtnl`, a raw
NETLINK_ROUTE socket: hundreds of hand-packed requests per send (`backends.kernel.wire`),
their acks read in bulk, and dumps the kernel filters down to the device asked about,
decoded one part (one receive) at a time; `dump` passes each decoded entry through the
caller's `known`, so that an entry the caller already holds is not kept twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

from backends.kernel import wire
from backends.kernel.types import (
    VXLAN_DEFAULT_PORT,
    ChangeSet,
    Entry,
    Fdb,
    KernelError,
    Link,
    Neigh,
    Route,
    VxlanDevice,
    VxlanSpec,
)

T = TypeVar("T")

MAIN_TABLE = wire.MAIN_TABLE
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33
#: Requests per send. Their acks (with NETLINK_CAP_ACK, ~1 KiB of receive buffer each as
#: the kernel accounts them) must fit RCVBUF, or some are dropped and their requests sent
#: again; more per send barely helps (docs/benchmarks.md).
BATCH = 256
RCVBUF = 4 << 20
#: Receive buffer of one recv: dumps come in parts of up to 32 KiB, acks in one each.
RECV_SIZE = 256 << 10
#: Seconds to wait for the kernel's answer before giving a batch up as unanswered.
ANSWER_TIMEOUT = 10.0
RESENDS = 3
DUMP_TRIES = 3


class IPRouteNetlink:
    """Real kernel access, serialised on one worker thread; `socket_factory` opens the
    socket of routes, neighbours and FDB entries (a fake kernel in the unit tests)."""

    def __init__(self, socket_factory: Callable[[], RtnlSocket] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: Any = None
        self._socket_factory = socket_factory or open_rtnl_socket
        self._rtnl: Rtnl | None = None

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

    # -- routes, neighbours, FDB entries: the raw socket --------------------------------
    def _rt(self) -> Rtnl:
        if self._rtnl is None:
            self._rtnl = Rtnl(self._socket_factory())
        return self._rtnl

    async def routes(self, oif: int | None = None) -> list[Route]:
        """Unicast IPv4 routes of the main table (optionally only via `oif`)."""
        return cast(list[Route], await self._run(lambda: self._rt().dump("route", oif)))

    async def dump(self, what: str, key: int | None,
                   known: Callable[[Entry], Entry] | None = None) -> list[Entry]:
        """Routes ("route", `key` the oif or None), neighbours or FDB entries ("neigh",
        "fdb", `key` the device), each passed through `known` as its part of the dump is
        decoded (on the netlink thread: `known` must only look up)."""
        return await self._run(lambda: self._rt().dump(what, key, known))

    async def apply(self, cs: ChangeSet) -> list[KernelError]:
        """Apply a change set in one hop to the netlink thread, many requests per send;
        returns what was refused."""
        if not cs:
            return []
        return await self._run(lambda: self._rt().apply(cs))

    async def neighbours(self, index: int) -> list[Neigh]:
        """Permanent IPv4 neighbour entries on device `index`."""
        return cast(list[Neigh], await self._run(lambda: self._rt().dump("neigh", index)))

    async def fdb_entries(self, index: int) -> list[Fdb]:
        """Forwarding entries with an IPv4 destination on vxlan device `index`."""
        return cast(list[Fdb], await self._run(lambda: self._rt().dump("fdb", index)))

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
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None

        await self._run(_close)
        self._pool.shutdown(wait=False)


def describe_error(code: int, text: str = "") -> str:
    """A refusal as KernelSync logs it: "ENETUNREACH (101): Network is unreachable", with
    the kernel's own explanation (extended ack) in parentheses when it gave one."""
    name = errno.errorcode.get(code, "E?")
    more = f" ({text})" if text else ""
    return f"{name} ({code}): {os.strerror(code)}{more}"


class RtnlSocket(Protocol):
    """What `Rtnl` needs of a NETLINK_ROUTE socket (a fake kernel in the unit tests)."""

    def send(self, data: bytes) -> int: ...

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int: ...

    def settimeout(self, value: float | None) -> None: ...

    def close(self) -> None: ...


def open_rtnl_socket() -> socket.socket:
    """A NETLINK_ROUTE socket for `Rtnl`: strict dump checking (the kernel filters dumps by
    device), extended acks (the kernel's reason with an error), capped acks (an error does
    not echo the whole request) and room for a whole batch of acks."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        for opt in (NETLINK_GET_STRICT_CHK, NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            with contextlib.suppress(OSError):  # older kernels: filtered in Python instead
                sock.setsockopt(SOL_NETLINK, opt, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:  # not CAP_NET_ADMIN: as much as rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.settimeout(ANSWER_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


class Rtnl:
    """Batched writes and filtered dumps of routes, neighbours and FDB entries on one
    netlink socket; used from the netlink thread only.

    A change set goes out as a few sends of up to BATCH requests each, every request with
    NLM_F_ACK and its own sequence number; the kernel handles the requests of one send in
    order and answers each, so the acks are read in bulk and matched by sequence number: a
    refused request is that entry's KernelError, and the rest are applied. An ack lost to a
    full receive buffer (ENOBUFS) leaves its request's outcome unknown (the kernel did handle
    it; only the answer was dropped): those requests are sent again to learn it, at most
    RESENDS times; all are idempotent, and a delete found already done is a success."""

    def __init__(self, sock: RtnlSocket) -> None:
        self.sock = sock
        self.seq = 0
        self.buf = bytearray(RECV_SIZE)

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def apply(self, cs: ChangeSet) -> list[KernelError]:
        todo = [(what, op, item) for what, op, items in cs.steps() for item in items]
        failed: dict[int, str] = {}
        pending = list(range(len(todo)))
        for _ in range(RESENDS + 1):
            lost: list[int] = []
            for i in range(0, len(pending), BATCH):
                lost += self._send_batch(todo, pending[i:i + BATCH], failed)
            pending = lost
            if not pending:
                break
        for i in pending:
            failed[i] = "no answer from the kernel (ENOBUFS or timeout); retried later"
        return [KernelError(*todo[i], failed[i]) for i in sorted(failed)]

    def _send_batch(self, todo: list[tuple[str, str, Entry]], batch: list[int],
                    failed: dict[int, str]) -> list[int]:
        """Send `batch` (indices into `todo`) in one send; record refusals in `failed`;
        return the indices whose answer never came."""
        waiting: dict[int, int] = {}  # seq -> index into todo
        parts = []
        for i in batch:
            what, op, item = todo[i]
            seq = self._next_seq()
            waiting[seq] = i
            try:
                parts.append(wire.encode(what, op, item, seq))
            except ValueError as exc:  # e.g. a malformed MAC: this entry only
                del waiting[seq]
                failed[i] = f"EINVAL: {exc}"
        if not parts:
            return []
        self.sock.send(b"".join(parts))
        while waiting:
            try:
                n = self.sock.recv_into(self.buf)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    return list(waiting.values())  # a timeout: no answer will come
                # Acks were dropped. The kernel handles a send's requests before send()
                # returns, so what is queued now is all that will come of this batch.
                self._drain(waiting, todo, failed)
                return list(waiting.values())
            self._acks(n, waiting, todo, failed)
        return []

    def _drain(self, waiting: dict[int, int], todo: list[tuple[str, str, Entry]],
               failed: dict[int, str]) -> None:
        self.sock.settimeout(0)
        try:
            while waiting:
                try:
                    n = self.sock.recv_into(self.buf)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        continue
                    return  # EAGAIN: empty
                self._acks(n, waiting, todo, failed)
        finally:
            self.sock.settimeout(ANSWER_TIMEOUT)

    def _acks(self, n: int, waiting: dict[int, int], todo: list[tuple[str, str, Entry]],
              failed: dict[int, str]) -> None:
        """Match the acks in the first `n` bytes of the buffer to their requests."""
        buf = self.buf
        for kind, flags, seq, start, end in wire.messages(buf, n):
            if kind != wire.NLMSG_ERROR or seq not in waiting:
                continue  # not an answer to this batch (a late one to an earlier request)
            i = waiting.pop(seq)
            code, text = wire.error_of(buf, flags, start, end)
            op = todo[i][1]
            if code == 0 or (op == "delete" and code in (errno.ESRCH, errno.ENOENT)):
                continue  # applied, or already gone: what a delete wanted
            failed[i] = describe_error(code, text)

    def dump(self, what: str, key: int | None,
             known: Callable[[Entry], Entry] | None = None) -> list[Entry]:
        """The kernel's routes (`key`: the oif or None), neighbours or FDB entries (`key`:
        the device) that tweed may own; OSError when the kernel refuses the dump. Each
        part's entries go through `known` before the next part is read: the entries
        decoded anew and dropped for an equal known one are then never more than a part's
        worth (a few hundred), not the whole table."""
        for _ in range(DUMP_TRIES):
            seq = self._next_seq()
            if what == "route":
                req = wire.route_dump_request(seq, key)
            else:
                assert key is not None
                req = (wire.neigh_dump_request if what == "neigh" else wire.fdb_dump_request
                       )(seq, key)
            self.sock.send(req)
            out: list[Entry] = []
            part: list[Entry] = out if known is None else []
            interrupted = False
            while True:
                n = self.sock.recv_into(self.buf)
                got = wire.decode_dump(self.buf, n, seq, what, key, part)
                if known is not None:
                    out += map(known, part)
                    part.clear()
                interrupted |= got.interrupted
                if got.done:
                    break
            if got.error == errno.ENODEV and what == "route":
                return []  # no such device: no routes through it
            if got.error:
                raise OSError(got.error, describe_error(got.error))
            if not interrupted:
                return out
        return out  # changing all the time: the next sync reads it again

    def close(self) -> None:
        self.sock.close()
