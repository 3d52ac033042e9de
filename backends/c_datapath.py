"""CDatapath: the Datapath interface over the C packet loop in backends/_fastpath.c.

The loop runs in its own thread with the GIL released; this wrapper turns subnets into
integers for it, starts and stops the thread, and names its counters. Step 1 of the fast
path so far: recvmmsg/sendmmsg batches of up to 64 packets, UDP GSO on send and UDP GRO
on receive (TUN coalescing is still the Python datapath's alone); already the faster of
the two, so `auto` chooses it when it is built.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from backends import _fastpath  # type: ignore[attr-defined]
from backends.datapath import COUNTERS


class CDatapath:
    """The C datapath behind the same interface as PythonDatapath."""

    name = "c"

    def __init__(
        self, tun_fd: int, sock: socket.socket, *, port: int, mtu: int,
        check_source: bool = True, gso: bool = True, gro: bool = True,
        vnet_hdr: bool = False,
    ) -> None:
        self.sock = sock
        self._core = _fastpath.Core(tun_fd, sock.fileno(), port, mtu, check_source, vnet_hdr,
                                    gso, gro)
        self._stopped: asyncio.Future[None] | None = None

    def set_route(self, subnet: ipaddress.IPv4Network, peer: ipaddress.IPv4Address) -> None:
        self._core.set_route(int(subnet.network_address), int(subnet.netmask), int(peer))

    def del_route(self, subnet: ipaddress.IPv4Network) -> None:
        self._core.del_route(int(subnet.network_address), int(subnet.netmask))

    def mode(self) -> str:
        on = {True: "on", False: "off"}
        return (f"c (recvmmsg/sendmmsg batches of {_fastpath.BATCH}, udp gso"
                f" {on[self._core.gso()]}, gro {on[self._core.gro()]})")

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, self._core.counters(), strict=True))

    async def run(self) -> None:
        self._stopped = asyncio.get_running_loop().create_future()
        self.sock.setblocking(False)
        self._core.start()
        try:
            await self._stopped
        finally:
            self._core.stop()

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
