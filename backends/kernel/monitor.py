"""KernelMonitor: the kernel's route, neighbour, FDB and link notifications, on the event loop.

One NETLINK_ROUTE socket bound to the IPv4 route, neighbour (which also carries the bridge
FDB, family AF_BRIDGE), link and IPv4 address multicast groups (the kernel flushes the
routes through an address it removes without a route notification: the address's own is
the only word of it), read with `loop.add_reader` (pyroute2's
asyncio socket does not run on uvloop, and a thread blocked in recv would do the same work
with a thread switch per wake-up). Only the netlink header and the few attributes tweed
compares are parsed (`parse`, pure), into the same Route/Neigh/Fdb values the backends
desire, so that `drifted(event, desired)` can tell an echo of our own write (it matches the
desired state) from a change made behind our back.

Every route tweed writes comes back here as a notification of its own, so a cold start at
20,000 peers parses 20,000 echoes on the event loop while the netlink thread writes (and
waits for the GIL between its sends): parsing is kept to a few microseconds a message
(attributes read in one pass, no per-message dict or copy, the network built from its
integer without `IPv4Network.__init__`'s parsing, events as tuples).

A full receive buffer makes the kernel drop notifications and report ENOBUFS on the next
read (flannel issue #1718): after that nothing said here can be trusted, and the owner is
told (`on_lost`) so that it re-reads the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from backends.kernel.types import Fdb, Neigh, Route

log = logging.getLogger(__name__)

# Multicast group bits for bind() (the legacy RTMGRP_* masks).
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTA = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_BE32 = struct.Struct(">I")
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
IFLA_IFNAME = 3
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
AF_BRIDGE = 7

#: Receive buffer asked for (SO_RCVBUFFORCE as root): a cold start writes 3 entries per
#: vxlan peer and each echo costs the buffer about 1 KiB, so a small buffer would overflow
#: (and cost a full re-read) on every start of a large cluster.
RCVBUF = 16 * 1024 * 1024
#: Test-only: a tiny receive buffer, to force an overflow in the lab.
RCVBUF_ENV = "TWEED_TEST_MONITOR_RCVBUF"
#: Datagrams read per wake-up, so that a flood cannot hold the event loop.
READS_PER_WAKEUP = 256
SO_RCVBUFFORCE = 33


class RawRoute(NamedTuple):
    """A route notification's fields as the kernel sent them, before any object is made
    of them: what `drifted` compares with the routes the last plan wrote."""

    dst: int
    dst_len: int
    gateway: int  # 0: none
    oif: int
    onlink: bool

    def route(self) -> Route:
        return Route(network(self.dst, self.dst_len),
                     ipaddress.IPv4Address(self.gateway) if self.gateway else None,
                     self.oif, self.onlink)


class KernelEvent:
    """One notification: a route, neighbour or FDB entry (`entry`), a link (`link`, as
    (index, name)) or an IPv4 address of device `address` was added/changed (`op` "new")
    or deleted ("del").

    A route notification keeps its raw fields (`raw`) and makes its Route only when asked
    for `entry`: the echo of a route we wrote is recognised from the raw fields (`drifted`),
    and a cold start is one echo per route written."""

    __slots__ = ("_entry", "address", "link", "op", "permanent", "raw")

    def __init__(
        self, op: str, entry: Route | Neigh | Fdb | None = None,
        link: tuple[int, str] | None = None, address: int | None = None,
        permanent: bool = True, raw: RawRoute | None = None,
    ) -> None:
        self.op = op
        self._entry = entry
        self.link = link
        self.address = address
        #: Neighbours: whether the entry is NUD_PERMANENT (the only kind tweed writes).
        self.permanent = permanent
        self.raw = raw

    @property
    def entry(self) -> Route | Neigh | Fdb | None:
        if self._entry is None and self.raw is not None:
            self._entry = self.raw.route()
        return self._entry

    def _key(self) -> tuple[object, ...]:
        return (self.op, self.entry, self.link, self.address, self.permanent)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KernelEvent):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        op, entry, link, address, permanent = self._key()
        return (f"KernelEvent({op!r}, {entry!r}, link={link!r}, address={address!r}, "
                f"permanent={permanent!r})")


def _attrs(buf: bytes | bytearray, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        length, kind = RTA.unpack_from(buf, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = bytes(buf[off + 4: off + length])  # without NLA_F_NESTED & co
        off += (length + 3) & ~3
    return out


def _mac(raw: bytes) -> str:
    return raw.hex(":")


#: (netmask, prefix length, host bits) by prefix length; the first two as IPv4Network's own
#: constructor sets them.
_MASKS = [(m, n, ~int(m) & 0xFFFFFFFF)
          for n in range(33) for m in [ipaddress.IPv4Network((0, n)).netmask]]
_new = object.__new__


def network(addr: int, prefixlen: int) -> ipaddress.IPv4Network:
    """`IPv4Network((addr, prefixlen))`, equal in every respect (tests/unit/
    test_monitor_parse.py compares the attributes), at a quarter of the cost: the
    constructor parses its argument in general ways, and a cold start builds one network
    per echoed route. /31 and /32 (whose `hosts` differ) and a host part that is not zero
    (ValueError) take the constructor's way."""
    mask, plen, host = _MASKS[prefixlen]
    if prefixlen > 30 or addr & host:
        return ipaddress.IPv4Network((addr, prefixlen))
    net: ipaddress.IPv4Network = _new(ipaddress.IPv4Network)
    net.__dict__.update(network_address=ipaddress.IPv4Address(addr), netmask=mask,
                        _prefixlen=plen)
    return net


def _route(buf: bytes | bytearray, off: int, end: int) -> RawRoute | None:
    _fam, dst_len, _s, _t, table, _p, _sc, rtype, flags = RTMSG.unpack_from(buf, off)
    if rtype != RTN_UNICAST:
        return None
    dst = oif = gw = 0
    off += RTMSG.size
    while off + 4 <= end:  # the attributes in one pass (`_attrs`, without its dict)
        length, kind = RTA.unpack_from(buf, off)
        if length < 4:
            break
        kind &= 0x3FFF
        if length >= 8:
            if kind == RTA_DST:
                dst = _BE32.unpack_from(buf, off + 4)[0]
            elif kind == RTA_GATEWAY:
                gw = _BE32.unpack_from(buf, off + 4)[0]
            elif kind == RTA_OIF:
                oif = _I32.unpack_from(buf, off + 4)[0]
            elif kind == RTA_TABLE:
                table = _U32.unpack_from(buf, off + 4)[0]
        off += (length + 3) & ~3
    if table != RT_TABLE_MAIN:
        return None
    if dst_len > 32 or dst & _MASKS[dst_len][2]:
        return None  # no IPv4 network: nothing of ours
    return RawRoute(dst, dst_len, gw, oif, bool(flags & RTNH_F_ONLINK))


def _neigh(buf: bytes | bytearray, off: int, end: int, op: str) -> KernelEvent | None:
    family, index, state, _flags, _type = NDMSG.unpack_from(buf, off)
    a = _attrs(buf, off + NDMSG.size, end)
    dst, mac = a.get(NDA_DST), a.get(NDA_LLADDR)
    if family == socket.AF_INET:
        if dst is None or len(dst) != 4:
            return None
        # A neighbour in FAILED/INCOMPLETE state has no address: "" never equals ours.
        entry: Neigh | Fdb = Neigh(ipaddress.IPv4Address(dst), _mac(mac or b""), index)
        return KernelEvent(op, entry, permanent=bool(state & NUD_PERMANENT))
    if family == AF_BRIDGE:
        if dst is None or len(dst) != 4 or mac is None:
            return None  # an entry without an IPv4 VTEP is none of ours
        entry = Fdb(_mac(mac), ipaddress.IPv4Address(dst), index)
        return KernelEvent(op, entry, permanent=bool(state & NUD_PERMANENT))
    return None


def _link(buf: bytes | bytearray, off: int, end: int, op: str) -> KernelEvent:
    _fam, _type, index, _flags, _change = IFINFOMSG.unpack_from(buf, off)
    name = _attrs(buf, off + IFINFOMSG.size, end).get(IFLA_IFNAME, b"").split(b"\0")[0]
    return KernelEvent(op, link=(index, name.decode(errors="replace")))


def parse(buf: bytes) -> list[KernelEvent]:
    """The events in one datagram of notifications; what tweed never writes (other tables,
    other families, non-unicast routes) is left out, and a truncated message ends it."""
    out: list[KernelEvent] = []
    parse_into(buf, len(buf), out)
    return out


def parse_into(buf: bytes | bytearray, size: int, out: list[KernelEvent]) -> None:
    """`parse` of the first `size` bytes of `buf`, appending to `out` (no copy of a
    receive buffer, no list per datagram)."""
    off = 0
    while off + NLMSG_HDR.size <= size:
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(buf, off)
        if length < NLMSG_HDR.size or off + length > size:
            break
        body, end = off + NLMSG_HDR.size, off + length
        try:
            if kind in (RTM_NEWROUTE, RTM_DELROUTE) and end - body >= RTMSG.size:
                raw = _route(buf, body, end)
                if raw is not None:
                    out.append(KernelEvent("new" if kind == RTM_NEWROUTE else "del", raw=raw))
            elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and end - body >= NDMSG.size:
                ev = _neigh(buf, body, end, "new" if kind == RTM_NEWNEIGH else "del")
                if ev is not None:
                    out.append(ev)
            elif kind in (RTM_NEWLINK, RTM_DELLINK) and end - body >= IFINFOMSG.size:
                out.append(_link(buf, body, end, "new" if kind == RTM_NEWLINK else "del"))
            elif kind in (RTM_NEWADDR, RTM_DELADDR) and end - body >= IFADDRMSG.size:
                family, _plen, _flags, _scope, index = IFADDRMSG.unpack_from(buf, body)
                if family == socket.AF_INET:
                    out.append(KernelEvent("new" if kind == RTM_NEWADDR else "del",
                                           address=index))
        except (struct.error, ValueError):
            pass  # a malformed message says nothing we could act on; the next one may
        off += (length + 3) & ~3


@dataclass
class Desired:
    """What a backend wants the kernel to hold, as its last plan computed it; what
    `drifted` compares notifications against."""

    routes: Mapping[ipaddress.IPv4Network, Route] = field(default_factory=dict)
    #: Routes the backend would delete when it does not desire them (owned).
    route_owned: Callable[[Route], bool] = lambda r: False
    #: The device whose permanent neighbours and FDB entries are all ours (0: none).
    neigh_index: int = 0
    neigh: Mapping[ipaddress.IPv4Address, Neigh] = field(default_factory=dict)
    fdb: Mapping[str, Fdb] = field(default_factory=dict)
    #: The devices tweed uses, index -> name.
    links: Mapping[int, str] = field(default_factory=dict)
    #: The routes the plan is writing, by `route_key`, until their echoes came back
    #: (`drifted` takes each out as its echo arrives; None once all did).
    written: dict[int, Route] | None = None


def route_key(dst: int, dst_len: int) -> int:
    """One integer for a route's destination (`Desired.written`'s key)."""
    return dst << 6 | dst_len


def written_index(routes: Iterable[Route]) -> dict[int, Route] | None:
    """`Desired.written` for the routes a plan writes (None for none)."""
    out = {route_key(int(r.dst.network_address), r.dst.prefixlen): r for r in routes}
    return out or None


def _as_written(raw: RawRoute, want: Desired) -> bool:
    """Whether `raw` (a route added or replaced) is a route the plan wrote, exactly as
    written: then it is our own echo, and it is taken out of `want.written`."""
    written = want.written
    if written is None:
        return False
    key = route_key(raw.dst, raw.dst_len)
    r = written.get(key)
    if (r is None or r.oif != raw.oif or r.onlink != raw.onlink
            or (int(r.gateway) if r.gateway is not None else 0) != raw.gateway):
        return False
    del written[key]
    if not written:
        want.written = None  # a dict keeps its size when emptied
    return True


def drifted(ev: KernelEvent, want: Desired) -> bool:
    """Whether `ev` may have left the kernel other than `want`: an entry we want was
    deleted or changed, or one we would delete appeared. Echoes of our own writes (the
    entry as desired, or the deletion of one we no longer want) are not.

    A route the plan wrote that comes back as written (`want.written`) is an echo, known
    from the raw fields without making a Route: a cold start hears one per peer."""
    if ev.raw is not None and ev.op == "new" and _as_written(ev.raw, want):
        return False
    e = ev.entry
    if isinstance(e, Route):
        desired = want.routes.get(e.dst)
        if ev.op == "del":
            return desired is not None and desired == e
        return e != desired and (desired is not None or want.route_owned(e))
    if isinstance(e, Neigh):
        if e.index != want.neigh_index or not want.neigh_index:
            return False
        n = want.neigh.get(e.ip)
        if ev.op == "del":
            return n is not None
        if n is None:
            return ev.permanent  # a permanent neighbour we would remove
        return not ev.permanent or e != n
    if isinstance(e, Fdb):
        if e.index != want.neigh_index or not want.neigh_index:
            return False
        f = want.fdb.get(e.mac)
        if ev.op == "del":
            return f is not None and f.dst == e.dst
        return e != f
    if ev.link is not None:
        return ev.link[0] in want.links
    if ev.address is not None:
        # Removed: the routes through it are gone unannounced; added back: the routes
        # refused meanwhile (no such gateway) can be written now.
        return ev.address in want.links
    return False


class KernelMonitor:
    """The notification socket on the running loop; calls `on_events` with each wake-up's
    events and `on_lost` when the kernel dropped some (ENOBUFS)."""

    def __init__(
        self,
        on_events: Callable[[list[KernelEvent]], None],
        on_lost: Callable[[], None],
        *,
        rcvbuf: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.on_events = on_events
        self.on_lost = on_lost
        self._sock = sock
        self._rcvbuf = rcvbuf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(256 * 1024)

    @staticmethod
    def open_socket(rcvbuf: int | None = None) -> socket.socket:
        """The bound, non-blocking NETLINK_ROUTE socket with the groups tweed watches."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            test_size = os.environ.get(RCVBUF_ENV)
            if test_size:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(test_size))
            else:
                size = rcvbuf or RCVBUF
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                except OSError:  # not root: as much as net.core.rmem_max allows
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> None:
        """Open the socket (unless given one) and read it on the running loop."""
        if self._sock is None:
            self._sock = self.open_socket(self._rcvbuf)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        events: list[KernelEvent] = []
        lost = False
        buf, recv_into = self._buf, self._sock.recv_into
        for _ in range(READS_PER_WAKEUP):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True  # the socket goes on; what was dropped is gone
                    continue
                log.error("kernel notifications: %s", exc)
                lost = True  # what it cost us is unknown: treat it as a loss
                break
            parse_into(buf, n, events)
        if lost:
            self._rearm()
        if events:
            self.on_events(events)
        if lost:
            self.on_lost()

    def _rearm(self) -> None:
        # libuv (uvloop) stops polling an fd that reported POLLERR, which is how the
        # kernel signals the overflow: without a fresh reader we would hear nothing more.
        assert self._loop is not None and self._sock is not None
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self._readable)

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
