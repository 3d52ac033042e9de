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
import ipaddress
import os
import socket
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
)
BUF_SIZE = 65536


class Datapath(Protocol):
    """What the udp backend needs from a packet mover."""

    name: str

    def set_route(self, subnet: ipaddress.IPv4Network, peer: ipaddress.IPv4Address) -> None:
        """Packets for `subnet` go to `peer` (its PublicIP); datagrams from `peer` may
        carry sources in `subnet`."""
        ...

    def del_route(self, subnet: ipaddress.IPv4Network) -> None:
        ...

    def set_local(self, address: ipaddress.IPv4Address) -> None:
        """Our TUN address: the source of the ICMP errors we generate."""
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
        check_source: bool = True,
    ) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.port = port
        self.mtu = mtu
        self.check_source = check_source
        self.routes: RouteTable[tuple[str, int]] = RouteTable()
        # PublicIP -> [(network int, mask)] of that peer's subnets, for the source check.
        self.sources: dict[str, list[tuple[int, int]]] = {}
        self.local = b"\x00\x00\x00\x00"
        self._stopped: asyncio.Future[None] | None = None
        for name in COUNTERS:
            setattr(self, name, 0)

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

    def set_local(self, address: ipaddress.IPv4Address) -> None:
        self.local = address.packed

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
    # than the work itself at this rate.
    def _from_tun(self) -> Callable[[], None]:
        buf = bytearray(BUF_SIZE)
        view = memoryview(buf)
        readv, write, fd = os.readv, os.write, self.tun_fd
        sendto = self.sock.sendto
        bufs = [buf]
        from_bytes = int.from_bytes

        def on_readable() -> None:
            tx_packets = tx_bytes = 0
            levels = self.routes.levels
            while True:
                try:
                    n = readv(fd, bufs)
                except (BlockingIOError, InterruptedError):
                    break
                if n < 20 or buf[0] >> 4 != 4:
                    self.tx_drop_malformed += 1
                    continue
                dst = from_bytes(buf[16:20], "big")
                addr = None
                for mask, table in levels:
                    addr = table.get(dst & mask)
                    if addr is not None:
                        break
                if addr is None:
                    self.tx_drop_no_route += 1
                    reply = net_unreachable(view[:n], self.local)
                    if reply is not None:
                        try:
                            write(fd, reply)
                            self.icmp_unreachable_sent += 1
                        except OSError:
                            pass
                    continue
                ttl = buf[8]
                if ttl <= 1:
                    self.tx_drop_ttl += 1
                    continue
                buf[8] = ttl - 1
                csum = ((buf[10] << 8) | buf[11]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                buf[10] = csum >> 8
                buf[11] = csum & 0xFF
                try:
                    sendto(view[:n], addr)
                except OSError:
                    # Socket buffer full or peer unreachable: drop, as a router would.
                    self.tx_drop_send_error += 1
                    continue
                tx_packets += 1
                tx_bytes += n
            self.tx_packets += tx_packets
            self.tx_bytes += tx_bytes

        return on_readable

    def _from_udp(self) -> Callable[[], None]:
        buf = bytearray(BUF_SIZE)
        view = memoryview(buf)
        recvfrom_into = self.sock.recvfrom_into
        write, fd = os.write, self.tun_fd
        mtu = self.mtu
        from_bytes = int.from_bytes

        def on_readable() -> None:
            rx_packets = rx_bytes = datagrams = 0
            sources = self.sources
            check = self.check_source
            while True:
                try:
                    n, (src_ip, _port) = recvfrom_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # e.g. ICMP port unreachable reported on the socket
                datagrams += 1
                nets = sources.get(src_ip)
                if check and nets is None:
                    self.rx_drop_unknown_source += 1
                    continue
                if n > mtu:
                    self.rx_drop_oversized += 1
                    continue
                if n < 20 or buf[0] >> 4 != 4:
                    self.rx_drop_malformed += 1
                    continue
                ihl = (buf[0] & 0x0F) << 2
                total = (buf[2] << 8) | buf[3]
                if ihl < 20 or total < ihl or total > n:
                    self.rx_drop_malformed += 1
                    continue
                if check:
                    inner = from_bytes(buf[12:16], "big")
                    for net, mask in nets:  # type: ignore[union-attr]
                        if inner & mask == net:
                            break
                    else:
                        self.rx_drop_spoofed_source += 1
                        continue
                ttl = buf[8]
                if ttl <= 1:
                    self.rx_drop_ttl += 1
                    continue
                buf[8] = ttl - 1
                csum = ((buf[10] << 8) | buf[11]) + 0x0100
                csum = (csum & 0xFFFF) + (csum >> 16)
                buf[10] = csum >> 8
                buf[11] = csum & 0xFF
                try:
                    write(fd, view[:total])
                except OSError:
                    self.rx_drop_tun_error += 1
                    continue
                rx_packets += 1
                rx_bytes += total
            self.rx_packets += rx_packets
            self.rx_bytes += rx_bytes
            self.rx_datagrams += datagrams

        return on_readable


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
