"""Datapath: moves packets between the TUN device and the UDP socket for the udp backend.

The interface is small (set_route, del_route, run, stop, counters) so that a pure-Python
and a C implementation can stand behind it, chosen by name from `DATAPATHS` (`auto`,
`python`, `c`); the environment variable TWEED_DATAPATH overrides the backend option.

`PythonDatapath` runs on the event loop: one reader per fd, each wake-up drains its fd
until EAGAIN into one preallocated buffer, patches the packet in place and passes it on.
Nothing per packet calls into logging or metrics: counters are plain integer attributes
that the control plane reads when asked.

Wire format (flanneld's): each UDP datagram carries exactly one raw IPv4 packet. Both
ends decrement the inner TTL; a packet whose TTL would reach 0 is dropped. A packet from
the TUN with no matching peer subnet gets an ICMP net-unreachable written back into the
TUN. On receive, datagrams are dropped (and counted by reason) when they come from an
address that is no current peer's PublicIP, are not a whole IPv4 packet, are larger than
the TUN's MTU, or carry an inner source outside the sending peer's subnets; the two
source checks can be turned off for NATed setups.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol

from backends.lpm import RouteTable
from backends.packet import net_unreachable

#: Counter names, in the order they are reported.
COUNTERS = (
    "tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "rx_datagrams",
    "tx_drop_malformed", "tx_drop_no_route", "tx_drop_ttl", "tx_drop_send_error",
    "rx_drop_unknown_source", "rx_drop_malformed", "rx_drop_oversized",
    "rx_drop_spoofed_source", "rx_drop_ttl", "rx_drop_tun_error", "icmp_unreachable_sent",
    "gso_sends", "gro_receives",
)
BUF_SIZE = 65536
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: Linux accepts at most 64 segments per UDP GSO send, and 64 KiB in all.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000


class Datapath(Protocol):
    """What the udp backend needs from a packet mover."""

    name: str

    def set_route(self, subnet: ipaddress.IPv4Network, peer: ipaddress.IPv4Address) -> None:
        """Packets for `subnet` go to `peer` (its PublicIP); datagrams from `peer` may
        carry sources in `subnet`."""
        ...

    def del_route(self, subnet: ipaddress.IPv4Network) -> None:
        ...

    async def run(self) -> None:
        """Move packets until stop()."""
        ...

    def stop(self) -> None:
        ...

    def counters(self) -> dict[str, int]:
        ...


class PythonDatapath:
    """The pure-Python datapath on the asyncio (uv)loop."""

    name = "python"

    def __init__(
        self, tun_fd: int, sock: socket.socket, *, port: int, mtu: int,
        check_source: bool = True, gso: bool = True, gro: bool = True,
    ) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.port = port
        self.mtu = mtu
        self.check_source = check_source
        self.routes: RouteTable[tuple[str, int]] = RouteTable()
        # PublicIP -> [(network int, mask)] of that peer's subnets, for the source check.
        self.sources: dict[str, list[tuple[int, int]]] = {}
        self._stopped: asyncio.Future[None] | None = None
        for name in COUNTERS:
            setattr(self, name, 0)
        self.gso = gso and _probe_gso(sock)
        self.gro = gro and _enable_gro(sock)

    def mode(self) -> str:
        """Which offloads are in use, for logs and counters."""
        return f"python (udp gso {'on' if self.gso else 'off'}, gro {'on' if self.gro else 'off'})"

    # -- control -------------------------------------------------------------------
    def set_route(self, subnet: ipaddress.IPv4Network, peer: ipaddress.IPv4Address) -> None:
        self.del_route(subnet)
        addr = (str(peer), self.port)
        self.routes.set(subnet, addr)
        self.sources.setdefault(addr[0], []).append(
            (int(subnet.network_address), int(subnet.netmask))
        )

    def del_route(self, subnet: ipaddress.IPv4Network) -> None:
        old = self.routes.delete(subnet)
        if old is None:
            return
        nets = self.sources.get(old[0], [])
        entry = (int(subnet.network_address), int(subnet.netmask))
        if entry in nets:
            nets.remove(entry)
        if not nets:
            self.sources.pop(old[0], None)

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        os.set_blocking(self.tun_fd, False)
        self.sock.setblocking(False)
        loop.add_reader(self.tun_fd, self._from_tun())
        loop.add_reader(self.sock.fileno(), self._from_udp())
        try:
            await self._stopped
        finally:
            loop.remove_reader(self.tun_fd)
            loop.remove_reader(self.sock.fileno())

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # -- the packet path -------------------------------------------------------------
    # Both handlers are closures over locals: attribute and global look-ups cost more
    # than the work itself at this rate. The system calls dominate (about 9 us of the
    # 10 us a packet costs here), so the sender batches: consecutive packets for one peer
    # of one size (the last may be shorter) leave in one sendmsg with UDP_SEGMENT, and
    # the kernel cuts them into one datagram each; the wire format does not change. The
    # receiver enables UDP_GRO and splits what arrives coalesced.
    def _from_tun(self) -> Callable[[], None]:
        mtu = self.mtu
        cap = GSO_MAX_SEGMENTS * mtu + mtu
        buf = bytearray(cap)
        view = memoryview(buf)
        readv, write, fd = os.readv, os.write, self.tun_fd
        sendto, sendmsg = self.sock.sendto, self.sock.sendmsg
        pack = struct.Struct("=H").pack
        from_bytes = int.from_bytes

        def send_run(start: int, end: int, seg: int, count: int, addr: tuple[str, int]) -> None:
            if count == 1 or not self.gso:
                try:
                    if count == 1:
                        sendto(view[start:end], addr)
                    else:
                        for pos in range(start, end, seg):
                            sendto(view[pos:min(pos + seg, end)], addr)
                except OSError:
                    self.tx_drop_send_error += count
                    return
            else:
                try:
                    sendmsg([view[start:end]], [(SOL_UDP, UDP_SEGMENT, pack(seg))], 0, addr)
                    self.gso_sends += 1
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                        self.tx_drop_send_error += count
                        return
                    # EIO/EINVAL: this path cannot segment; send one by one from now on.
                    self.gso = False
                    send_run(start, end, seg, count, addr)
                    return
            self.tx_packets += count
            self.tx_bytes += end - start

        def on_readable() -> None:
            levels = self.routes.levels
            start = off = count = seg = 0
            short = False
            raddr: tuple[str, int] | None = None
            while True:
                try:
                    n = readv(fd, [view[off:off + mtu]])
                except (BlockingIOError, InterruptedError):
                    break
                if n < 20 or buf[off] >> 4 != 4:
                    self.tx_drop_malformed += 1
                    continue
                dst = from_bytes(buf[off + 16:off + 20], "big")
                addr = None
                for mask, table in levels:
                    addr = table.get(dst & mask)
                    if addr is not None:
                        break
                if addr is None:
                    self.tx_drop_no_route += 1
                    reply = net_unreachable(view[off:off + n])
                    if reply is not None:
                        try:
                            write(fd, reply)
                            self.icmp_unreachable_sent += 1
                        except OSError:
                            pass
                    continue
                ttl = buf[off + 8]
                if ttl <= 1:
                    self.tx_drop_ttl += 1
                    continue
                buf[off + 8] = ttl - 1
                csum = ((buf[off + 10] << 8) | buf[off + 11]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                buf[off + 10] = csum >> 8
                buf[off + 11] = csum & 0xFF
                if count and (addr != raddr or n > seg or short or count >= GSO_MAX_SEGMENTS
                              or off + n - start > GSO_MAX_BYTES):
                    send_run(start, off, seg, count, raddr)  # type: ignore[arg-type]
                    start, count = off, 0
                if count == 0:
                    raddr, seg, short = addr, n, False
                elif n < seg:
                    short = True  # only the last segment of a run may be shorter
                count += 1
                off += n
                if off + mtu > cap:
                    send_run(start, off, seg, count, raddr)  # type: ignore[arg-type]
                    start = off = count = 0
            if count:
                send_run(start, off, seg, count, raddr)  # type: ignore[arg-type]

        return on_readable

    def _from_udp(self) -> Callable[[], None]:
        buf = bytearray(BUF_SIZE)
        view = memoryview(buf)
        recvmsg_into = self.sock.recvmsg_into
        bufs = [buf]
        write, fd = os.write, self.tun_fd
        mtu = self.mtu
        from_bytes = int.from_bytes
        ancsize = socket.CMSG_SPACE(4)

        def deliver(pos: int, n: int, nets: list[tuple[int, int]] | None, check: bool) -> None:
            """One inner packet at buf[pos:pos+n]: check it, patch it, write it."""
            if n > mtu:
                self.rx_drop_oversized += 1
                return
            if n < 20 or buf[pos] >> 4 != 4:
                self.rx_drop_malformed += 1
                return
            ihl = (buf[pos] & 0x0F) << 2
            total = (buf[pos + 2] << 8) | buf[pos + 3]
            if ihl < 20 or total < ihl or total > n:
                self.rx_drop_malformed += 1
                return
            if check:
                inner = from_bytes(buf[pos + 12:pos + 16], "big")
                for net, mask in nets:  # type: ignore[union-attr]
                    if inner & mask == net:
                        break
                else:
                    self.rx_drop_spoofed_source += 1
                    return
            ttl = buf[pos + 8]
            if ttl <= 1:
                self.rx_drop_ttl += 1
                return
            buf[pos + 8] = ttl - 1
            csum = ((buf[pos + 10] << 8) | buf[pos + 11]) + 0x0100
            csum = (csum & 0xFFFF) + (csum >> 16)
            buf[pos + 10] = csum >> 8
            buf[pos + 11] = csum & 0xFF
            try:
                write(fd, view[pos:pos + total])
            except OSError:
                self.rx_drop_tun_error += 1
                return
            self.rx_packets += 1
            self.rx_bytes += total

        def on_readable() -> None:
            sources = self.sources
            check = self.check_source
            while True:
                try:
                    n, anc, _flags, (src_ip, _port) = recvmsg_into(bufs, ancsize)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # e.g. ICMP port unreachable reported on the socket
                seg = n
                for level, kind, data in anc:
                    if level == SOL_UDP and kind == UDP_GRO:
                        seg = from_bytes(data[:4], "little") or n
                        self.gro_receives += 1
                datagrams = (n + seg - 1) // seg if n else 1
                self.rx_datagrams += datagrams
                nets = sources.get(src_ip)
                if check and nets is None:
                    self.rx_drop_unknown_source += datagrams
                    continue
                if seg == n:
                    deliver(0, n, nets, check)
                    continue
                for pos in range(0, n, seg):
                    deliver(pos, min(seg, n - pos), nets, check)

        return on_readable


def _probe_gso(sock: socket.socket) -> bool:
    """True if the kernel takes UDP_SEGMENT on this socket."""
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives (UDP_GRO); False if the kernel lacks it."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def _c_datapath() -> type | None:
    """The C datapath class if it is built, else None."""
    try:
        from backends import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(_fastpath, "CDatapath", None)


def choose_datapath(option: str, environ: dict[str, str]) -> type:
    """The datapath class for a backend option (`auto`, `python`, `c`); TWEED_DATAPATH
    in the environment wins. ValueError names the setting when the choice cannot work."""
    env = environ.get("TWEED_DATAPATH", "")
    name, where = (env, "TWEED_DATAPATH") if env else (option or "auto", "Backend.Datapath")
    name = name.lower()
    if name not in DATAPATHS:
        raise ValueError(f"{where}: unknown datapath {name!r} (choose from {', '.join(DATAPATHS)})")
    c = _c_datapath()
    if name == "c":
        if c is None:
            raise ValueError(f"{where}: the C datapath is not built in this installation")
        return c
    if name == "auto" and c is not None:
        return c
    return PythonDatapath


#: The names a datapath can be chosen by.
DATAPATHS = ("auto", "python", "c")
