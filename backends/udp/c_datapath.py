"""CDatapath: the Datapath interface over the C packet loop in backends/udp/_fastpath.c.

The loop runs in its own thread without the GIL; this wrapper turns subnets into integers
for it, starts and stops the thread, names its counters, and turns the thread's end on a
TUN error (flannel0 deleted: its `done` eventfd, watched on the event loop) into TunLost.
It does recvmmsg/sendmmsg batches, TUN TSO (super-packets cut into wire packets in C),
UDP GSO on send, UDP GRO on receive and coalesced TUN writes, each probed and each one
that can be turned off (the backend options in backends/udp/network.py); `auto` chooses
it when it is built. Its types are in _fastpath.pyi.

IPv6 inner packets (issue 14) go as in the python datapath, over either underlay: a peer
at an IPv6 address is reached through the AF_INET6 socket `sock6` (refused with a
ValueError without it). The C routes hold a uint32 per peer: a v4 peer's address, or for
a v6 peer a small id (in 0.0.0.0/8, which no PublicIP can be) handed to the core with its
address (set_peer6); the ids are kept here, one per v6 address, never reused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from backends.udp import _fastpath
from backends.udp.datapath import (
    COUNTERS,
    Address,
    Subnet,
    TunLost,
    describe_offloads,
    offload_counters,
)
from backends.udp.packet import ICMP_RATELIMIT_MS


class CDatapath:
    """The C datapath behind the same interface as PythonDatapath."""

    name = "c"

    def __init__(
        self, tun_fd: int, sock: socket.socket, *, port: int, mtu: int,
        check_source: bool = True, gso: bool = True, gro: bool = True,
        vnet_hdr: bool = False, tso: bool = True, coalesce: bool = True,
        icmp_ratelimit_ms: int = ICMP_RATELIMIT_MS, sock6: socket.socket | None = None,
    ) -> None:
        self.sock = sock
        self.sock6 = sock6
        self._core = _fastpath.Core(tun_fd, sock.fileno(), port, mtu, check_source, vnet_hdr,
                                    gso, gro, tso, coalesce, icmp_ratelimit_ms,
                                    -1 if sock6 is None else sock6.fileno())
        self._ids: dict[ipaddress.IPv6Address, int] = {}
        self._stopped: asyncio.Future[None] | None = None

    def _peer(self, peer: Address) -> int:
        """The core's value for a peer: a v4 address, or a v6 peer's id."""
        if peer.version == 4:
            if int(peer) >> 24 == 0:
                raise ValueError(f"peer {peer}: 0.0.0.0/8 is no peer address")
            return int(peer)
        if self.sock6 is None:
            raise ValueError(f"peer {peer}: an IPv6 underlay address, and no IPv6 socket")
        ident = self._ids.get(peer)
        if ident is None:
            ident = len(self._ids) + 1
            self._core.set_peer6(ident, peer.packed)
            self._ids[peer] = ident
        return ident

    def set_route(self, subnet: Subnet, peer: Address) -> None:
        value = self._peer(peer)
        if subnet.version == 6:
            self._core.set_route6(*_halves(subnet), value)
            return
        self._core.set_route(int(subnet.network_address), int(subnet.netmask), value)

    def del_route(self, subnet: Subnet) -> None:
        if subnet.version == 6:
            self._core.del_route6(*_halves(subnet))
            return
        self._core.del_route(int(subnet.network_address), int(subnet.netmask))

    def set_subnet(self, subnet: Subnet) -> None:
        if subnet.version == 6:
            self._core.set_subnet6(*_halves(subnet))
            return
        self._core.set_subnet(int(subnet.network_address), int(subnet.netmask))

    def set_tun(self, tun_fd: int) -> None:
        self._core.set_tun(tun_fd)

    def offloads(self) -> dict[str, bool]:
        return self._core.offloads()

    def mode(self) -> str:
        return f"c (recvmmsg/sendmmsg batches, {describe_offloads(self.offloads())})"

    def counters(self) -> dict[str, int]:
        values = dict(zip(COUNTERS, self._core.counters(), strict=True))
        return values | offload_counters(self.offloads())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = stopped = loop.create_future()
        self.sock.setblocking(False)
        if self.sock6 is not None:
            self.sock6.setblocking(False)
        done = self._core.done_fd()

        def ended() -> None:  # the packet thread ended on its own: the TUN is gone
            if not stopped.done():
                stopped.set_result(None)

        self._core.start()
        loop.add_reader(done, ended)
        try:
            await stopped
        finally:
            loop.remove_reader(done)
            self._core.stop()
        if self._core.tun_lost():
            raise TunLost("the TUN reported an error or hang-up: the device is gone")

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)



def _halves(subnet: ipaddress.IPv6Network) -> tuple[int, int, int]:
    """A v6 subnet as the C core takes it: high and low 64 bits, prefix length."""
    net = int(subnet.network_address)
    return net >> 64, net & 0xFFFFFFFFFFFFFFFF, subnet.prefixlen
