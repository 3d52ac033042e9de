"""The rtnetlink wire format of tweed's routes, neighbours and FDB entries: pure, no I/O.

Encodes each ChangeSet entry as one netlink request (the same header fields and attributes
pyroute2's IPRoute sent for it, so the kernel sees the same thing), the filtered dump
requests, and decodes acks and dumped entries straight from a receive buffer. Hand-packed
with precompiled `struct`s: about 1 us a message, against ~80 us for pyroute2's `rtmsg`
encoder and ~300 us for its IPBatch (docs/benchmarks.md), which at 15,000 entries is the
difference between the kernel's pace and seconds of Python.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from backends.kernel.types import Entry, Fdb, Neigh, Route

# netlink(7), rtnetlink(7)
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
NLM_F_CAPPED = 0x100  # on an NLMSG_ERROR: the request was not echoed back
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended ack attributes follow
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSGERR_ATTR_MSG = 1

AF_INET = 2
AF_BRIDGE = 7
MAIN_TABLE = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8

#: What a replace and a delete ask of the kernel (`ip route replace` / `ip route del`).
REPLACE_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
DELETE_FLAGS = NLM_F_REQUEST | NLM_F_ACK
DUMP_FLAGS = NLM_F_REQUEST | NLM_F_DUMP

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_HDR_TYPE_FLAGS_SEQ = struct.Struct("=IHHI")
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table proto scope type flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, ifindex, state, flags, type
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
# Whole requests, one struct each: header, body, then the attributes in pyroute2's order.
_ROUTE_GW = struct.Struct("=IHHII BBBBBBBBI HH4s HHI HHI HH4s")
_ROUTE_DEV = struct.Struct("=IHHII BBBBBBBBI HH4s HHI HHI")
_NEIGH = struct.Struct("=IHHII BxxxiHBB HH4s HH6sxx")
_FDB = struct.Struct("=IHHII BxxxiHBB HH6sxx HH4s")


def mac_bytes(mac: str) -> bytes:
    """"0a:00:00:00:00:03" -> its six bytes; ValueError for anything else."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def encode(what: str, op: str, item: Entry, seq: int) -> bytes:
    """One request that replaces or deletes `item` (a Route, Neigh or Fdb), with an ack.

    The fields are those pyroute2 sent for the same entry: routes in the main table with
    protocol boot, scope link for a device route, RTNH_F_ONLINK when asked, the table also
    as RTA_TABLE; neighbours and FDB entries permanent, FDB entries NTF_SELF."""
    delete = op == "delete"
    flags = DELETE_FLAGS if delete else REPLACE_FLAGS
    if what == "route":
        assert isinstance(item, Route)
        kind = RTM_DELROUTE if delete else RTM_NEWROUTE
        # A delete leaves the type unspecified as pyroute2 did: any route type matches.
        rtype = 0 if delete else RTN_UNICAST
        rflags = RTNH_F_ONLINK if item.onlink else 0
        dst = item.dst.network_address.packed
        if item.gateway is not None:
            return _ROUTE_GW.pack(
                _ROUTE_GW.size, kind, flags, seq, 0,
                AF_INET, item.dst.prefixlen, 0, 0, MAIN_TABLE, RTPROT_BOOT,
                RT_SCOPE_UNIVERSE, rtype, rflags,
                8, RTA_DST, dst, 8, RTA_OIF, item.oif, 8, RTA_TABLE, MAIN_TABLE,
                8, RTA_GATEWAY, item.gateway.packed)
        return _ROUTE_DEV.pack(
            _ROUTE_DEV.size, kind, flags, seq, 0,
            AF_INET, item.dst.prefixlen, 0, 0, MAIN_TABLE, RTPROT_BOOT, RT_SCOPE_LINK,
            rtype, rflags,
            8, RTA_DST, dst, 8, RTA_OIF, item.oif, 8, RTA_TABLE, MAIN_TABLE)
    kind = RTM_DELNEIGH if delete else RTM_NEWNEIGH
    if what == "neigh":
        assert isinstance(item, Neigh)
        return _NEIGH.pack(
            _NEIGH.size, kind, flags, seq, 0, AF_INET, item.index, NUD_PERMANENT, 0, 0,
            8, NDA_DST, item.ip.packed, 10, NDA_LLADDR, mac_bytes(item.mac))
    assert what == "fdb" and isinstance(item, Fdb)
    return _FDB.pack(
        _FDB.size, kind, flags, seq, 0, AF_BRIDGE, item.index, NUD_PERMANENT, NTF_SELF, 0,
        10, NDA_LLADDR, mac_bytes(item.mac), 8, NDA_DST, item.dst.packed)


def _attr_u32(kind: int, value: int) -> bytes:
    return _NLA.pack(8, kind) + _U32.pack(value)


def route_dump_request(seq: int, oif: int | None) -> bytes:
    """Dump the unicast routes of the main table, only via `oif` if given. With
    NETLINK_GET_STRICT_CHK on the socket the kernel filters by table, type and device;
    without it (kernels before 4.20) it sends everything and `decode_routes` filters."""
    body = _RTMSG.pack(AF_INET, 0, 0, 0, MAIN_TABLE, 0, 0, RTN_UNICAST, 0)
    attrs = _attr_u32(RTA_TABLE, MAIN_TABLE)
    if oif is not None:
        attrs += _attr_u32(RTA_OIF, oif)
    return _request(RTM_GETROUTE, seq, body + attrs)


def neigh_dump_request(seq: int, index: int) -> bytes:
    """Dump the IPv4 neighbours of device `index` (filtered by the kernel: NDA_IFINDEX)."""
    return _request(RTM_GETNEIGH, seq,
                    _NDMSG.pack(AF_INET, 0, 0, 0, 0) + _attr_u32(NDA_IFINDEX, index))


def fdb_dump_request(seq: int, index: int) -> bytes:
    """Dump the forwarding entries of device `index` (filtered by the kernel)."""
    return _request(RTM_GETNEIGH, seq,
                    _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0) + _attr_u32(NDA_IFINDEX, index))


def _request(kind: int, seq: int, payload: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(payload), kind, DUMP_FLAGS, seq, 0) + payload


def messages(buf: bytes | bytearray | memoryview, n: int
             ) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, start, end) of each message in the first `n` bytes of `buf`;
    `start` is where the message's payload begins, `end` where the message ends."""
    off = 0
    while off + 16 <= n:
        length, kind, flags, seq = _HDR_TYPE_FLAGS_SEQ.unpack_from(buf, off)
        if length < 16 or off + length > n:
            return  # a truncated message: nothing after it can be trusted
        yield kind, flags, seq, off + 16, off + length
        off += (length + 3) & ~3


def error_of(buf: bytes | bytearray | memoryview, flags: int, start: int, end: int
             ) -> tuple[int, str]:
    """An NLMSG_ERROR's (errno, extended-ack text); errno 0 is a plain ack."""
    (code,) = _I32.unpack_from(buf, start)
    text = ""
    if code and flags & NLM_F_ACK_TLVS:
        # The request's header (16 bytes) is echoed back, and its payload too unless capped.
        off = start + 4 + 16
        if not flags & NLM_F_CAPPED:
            (echoed,) = _U32.unpack_from(buf, start + 4)
            off = start + 4 + ((echoed + 3) & ~3)
        for kind, a, b in _attrs(buf, off, end):
            if kind == NLMSGERR_ATTR_MSG:
                text = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
    return -code, text


def _attrs(buf: bytes | bytearray | memoryview, off: int, end: int
           ) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each attribute in buf[off:end]."""
    while off + 4 <= end:
        length, kind = _NLA.unpack_from(buf, off)
        if length < 4:
            return
        yield kind & 0x3FFF, off + 4, off + length  # without NLA_F_NESTED / BYTEORDER
        off += (length + 3) & ~3


@dataclass
class Dumped:
    """What one receive buffer of a dump held: entries, and whether the dump is over."""

    done: bool = False
    interrupted: bool = False  # NLM_F_DUMP_INTR: the table changed while it was dumped
    error: int = 0


def _route(buf: bytes | bytearray | memoryview, start: int, end: int, oif: int | None
           ) -> Route | None:
    family, dst_len, _, _, table, _, _, rtype, rflags = _RTMSG.unpack_from(buf, start)
    if family != AF_INET or rtype != RTN_UNICAST:
        return None
    dst = gateway = 0
    dev = 0
    for kind, a, _b in _attrs(buf, start + _RTMSG.size, end):
        if kind == RTA_DST:
            dst = int.from_bytes(buf[a:a + 4], "big")
        elif kind == RTA_OIF:
            (dev,) = _U32.unpack_from(buf, a)
        elif kind == RTA_GATEWAY:
            gateway = int.from_bytes(buf[a:a + 4], "big")
        elif kind == RTA_TABLE:
            (table,) = _U32.unpack_from(buf, a)
    if table != MAIN_TABLE or (oif is not None and dev != oif):
        return None
    return Route(ipaddress.IPv4Network((dst, dst_len)),
                 ipaddress.IPv4Address(gateway) if gateway else None, dev,
                 bool(rflags & RTNH_F_ONLINK))


def _neigh(buf: bytes | bytearray | memoryview, start: int, end: int, family: int,
           index: int) -> tuple[ipaddress.IPv4Address, str] | None:
    fam, ifindex, state, _, _ = _NDMSG.unpack_from(buf, start)
    if fam != family or ifindex != index:
        return None
    if family == AF_INET and not state & NUD_PERMANENT:
        return None
    ip = mac = None
    for kind, a, b in _attrs(buf, start + _NDMSG.size, end):
        if kind == NDA_DST and b - a == 4:
            ip = ipaddress.IPv4Address(bytes(buf[a:b]))
        elif kind == NDA_LLADDR and b - a == 6:
            mac = bytes(buf[a:b]).hex(":")
    return (ip, mac) if ip is not None and mac is not None else None


def decode_dump(buf: bytes | bytearray | memoryview, n: int, seq: int, what: str,
                key: int | None, out: list[Entry]) -> Dumped:
    """Append the entries in the first `n` bytes of `buf` answering dump `seq` to `out`:
    `what` "route" (key: the oif filter or None), "neigh" or "fdb" (key: the device).
    The kernel's filters are checked again here: a kernel without strict checking
    ignores them."""
    state = Dumped()
    for kind, flags, mseq, start, end in messages(buf, n):
        if mseq != seq:
            continue  # a late answer to an earlier request
        if flags & NLM_F_DUMP_INTR:
            state.interrupted = True
        if kind == NLMSG_DONE:
            state.done = True
            if end - start >= 4:
                (code,) = _I32.unpack_from(buf, start)
                state.error = -code if code < 0 else 0
            break
        if kind == NLMSG_ERROR:
            state.done = True
            state.error = error_of(buf, flags, start, end)[0]
            break
        if what == "route" and kind == RTM_NEWROUTE:
            r = _route(buf, start, end, key)
            if r is not None:
                out.append(r)
        elif kind == RTM_NEWNEIGH and key is not None:
            got = _neigh(buf, start, end, AF_INET if what == "neigh" else AF_BRIDGE, key)
            if got is not None:
                ip, mac = got
                out.append(Neigh(ip, mac, key) if what == "neigh" else Fdb(mac, ip, key))
    return state
