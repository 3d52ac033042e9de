"""A fake kernel behind a NETLINK_ROUTE socket, for testing `Rtnl` without root.

`FakeRtnlSocket` takes what `Rtnl` sends, decodes every request with pyroute2's own message
classes (an encoder independent of `backends.kernel.wire`), keeps the routes, neighbours and
FDB entries they make, answers each request in order as the kernel does (an NLMSG_ERROR
ack, errno 0 or the refusal), and answers dumps with messages pyroute2 encodes. It can
refuse chosen requests (`refuse`), drop acks past a receive-queue limit with ENOBUFS once
(`ack_room`), or never answer (`mute`).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

HDR = struct.Struct("=IHHII")
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_CAPPED, NLM_F_ACK_TLVS = 2, 0x10, 0x100, 0x200


@dataclass
class Request:
    """One decoded request: its header and its body's fields and attributes."""

    type: int
    flags: int
    seq: int
    fields: dict[str, Any]
    attrs: dict[str, Any]


@dataclass
class FakeRtnlSocket:
    #: (request) -> errno to refuse it with (0: accept) and an extended-ack text.
    refuse: Callable[[Request], tuple[int, str]] = lambda req: (0, "")
    #: Acks that fit the receive queue before the rest are dropped (ENOBUFS once).
    ack_room: int = 1 << 30
    #: Never answer anything (a blocking recv then times out).
    mute: bool = False
    #: Bytes handed out per recv at most (a dump comes in several parts).
    recv_chunk: int = 8192
    #: Mark the next N dumps interrupted (NLM_F_DUMP_INTR).
    interrupt_dumps: int = 0
    requests: list[Request] = field(default_factory=list)
    sends: int = 0
    routes: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    neigh: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    fdb: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    extra_dump: list[bytes] = field(default_factory=list)  # foreign messages in every dump
    _queue: list[bytes] = field(default_factory=list)
    _enobufs: bool = False
    _timeout: float | None = 10.0
    closed: bool = False

    # -- the socket ---------------------------------------------------------------------
    def send(self, data: bytes) -> int:
        self.sends += 1
        off = 0
        queued_acks = 0
        while off < len(data):
            length, kind, flags, seq, _ = HDR.unpack_from(data, off)
            msg = bytes(data[off:off + length])
            off += (length + 3) & ~3
            req = self._decode(kind, flags, seq, msg)
            self.requests.append(req)
            if kind in (26, 30):  # a dump
                self._dump(req)
                continue
            code, text = self.refuse(req)
            if not code:
                code = self._do(req)
            if self.mute:
                continue
            if queued_acks >= self.ack_room:
                self._enobufs = True  # dropped, as a full netlink socket drops
                continue
            queued_acks += 1
            self._queue.append(ack(seq, -code, text))
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if self._enobufs:
            self._enobufs = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self._queue:
            if self._timeout == 0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            raise TimeoutError("timed out")
        out = b""
        while self._queue and len(out) + len(self._queue[0]) <= self.recv_chunk:
            out += self._queue.pop(0)
        if not out:
            out = self._queue.pop(0)
        buffer[:len(out)] = out
        return len(out)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def close(self) -> None:
        self.closed = True

    # -- the kernel ---------------------------------------------------------------------
    @staticmethod
    def _decode(kind: int, flags: int, seq: int, msg: bytes) -> Request:
        m = (rtmsg if kind in (24, 25, 26) else ndmsg)(msg)
        m.decode()
        names = [f[0] for f in m.fields if not f[0].startswith("__")]
        return Request(kind, flags, seq, {n: m[n] for n in names},
                       {k: v for k, v in m["attrs"]})

    def _do(self, req: Request) -> int:
        a, f = req.attrs, req.fields
        if req.type == 24:
            self.routes[(a["RTA_DST"], f["dst_len"])] = {**f, **a}
        elif req.type == 25:
            if self.routes.pop((a["RTA_DST"], f["dst_len"]), None) is None:
                return errno.ESRCH
        elif req.type in (28, 29):
            table = self.neigh if f["family"] == socket.AF_INET else self.fdb
            key = (f["ifindex"], a["NDA_DST"] if table is self.neigh else a["NDA_LLADDR"])
            if req.type == 28:
                table[key] = {**f, **a}
            elif table.pop(key, None) is None:
                return errno.ENOENT
        return 0

    def _dump(self, req: Request) -> None:
        if self.mute:
            return
        flags = NLM_F_MULTI
        if self.interrupt_dumps:
            self.interrupt_dumps -= 1
            flags |= NLM_F_DUMP_INTR
        out = list(self.extra_dump)
        if req.type == 26:
            oif = req.attrs.get("RTA_OIF")
            for (dst, plen), r in self.routes.items():
                if oif is None or r["RTA_OIF"] == oif:
                    out.append(route_msg(dst, plen, r["RTA_OIF"], r.get("RTA_GATEWAY"),
                                         r["flags"], req.seq))
        else:
            index = req.attrs["NDA_IFINDEX"]
            table = self.neigh if req.fields["family"] == socket.AF_INET else self.fdb
            for (ifindex, _), n in table.items():
                if ifindex == index:
                    out.append(neigh_msg(n["family"], ifindex, n["state"], n["NDA_DST"],
                                         n["NDA_LLADDR"], req.seq))
        for msg in out:
            struct.pack_into("=HI", b := bytearray(msg), 6, flags, req.seq)
            self._queue.append(bytes(b))
        self._queue.append(HDR.pack(20, NLMSG_DONE, flags, req.seq, 0) + b"\0\0\0\0")


def ack(seq: int, code: int, text: str = "") -> bytes:
    """An NLMSG_ERROR answering request `seq` (capped: only the request's header echoed),
    with the extended-ack text when given."""
    tlv = b""
    flags = NLM_F_CAPPED
    if text:
        raw = text.encode() + b"\0"
        tlv = struct.pack("=HH", 4 + len(raw), 1) + raw + b"\0" * (-len(raw) % 4)
        flags |= NLM_F_ACK_TLVS
    body = struct.pack("=i", code) + HDR.pack(0, 0, 0, seq, 0) + tlv
    return HDR.pack(16 + len(body), NLMSG_ERROR, flags, seq, 0) + body


def route_msg(dst: str, plen: int, oif: int, gateway: str | None, flags: int, seq: int,
              table: int = 254, rtype: int = 1, family: int = 2) -> bytes:
    """An RTM_NEWROUTE as the kernel dumps it, encoded by pyroute2."""
    m = rtmsg()
    m["family"], m["dst_len"], m["proto"] = family, plen, 3
    m["table"] = table if table < 256 else 252  # RT_TABLE_COMPAT, as the kernel does
    m["type"], m["flags"] = rtype, flags
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", table), ("RTA_DST", dst), ("RTA_OIF", oif)]
    if gateway:
        attrs.append(("RTA_GATEWAY", gateway))
    m["attrs"] = attrs
    m["header"]["type"], m["header"]["sequence_number"] = 24, seq
    m.encode()
    return bytes(m.data)


def neigh_msg(family: int, ifindex: int, state: int, dst: str, lladdr: str, seq: int
              ) -> bytes:
    """An RTM_NEWNEIGH as the kernel dumps it, encoded by pyroute2."""
    m = ndmsg()
    m["family"], m["ifindex"], m["state"] = family, ifindex, state
    m["attrs"] = [("NDA_DST", dst), ("NDA_LLADDR", lladdr)]
    m["header"]["type"], m["header"]["sequence_number"] = 28, seq
    m.encode()
    return bytes(m.data)
