"""udp backend: tweed itself carries every container packet inside a UDP datagram.

On the wire (flanneld's format): one raw inner IPv4 packet per UDP datagram, nothing
else, sent from `<iface IP>:<Port>` (default 8285) to `<peer PublicIP>:<Port>`; 28 bytes of
overhead (outer IP + UDP), so containers get MTU iface-28.

In the kernel: a TUN device `flannel0` (IFF_TUN | IFF_NO_PI) holding our subnet's first
address as a /32, MTU iface-28, a long transmit queue, and `route <Network> dev flannel0`.
Every peer lease (whatever its BackendType, as flanneld does) becomes a datapath route
`<peer subnet> -> <peer PublicIP>`. The packets themselves are moved by a Datapath
(backends/udp/datapath.py). Our lease carries neither BackendType nor BackendData.

A router's rules: the datapath delivers a peer's datagram only for a destination inside
our subnet, and answers a TTL that runs out with an ICMP time exceeded from flannel0's
address (datapath.py). So that the kernel takes the answers written into flannel0 from
that local address (not a martian), flannel0 has accept_local=1 while the source checks
are on (with `CheckSource: false` a peer could send with our addresses: left off there).

A deleted flannel0 is made again: the datapath's run() ends with TunLost (the TUN fd
reports an error), and the network opens a new TUN, gives it the address, MTU, queue
length and up state, hands its fd to the datapath, and syncs the Network route; counted
(`tun_lost`, `tun_recreated` in counters()) and logged.

Options: `Port` (8285), `Datapath` (`auto`/`python`/`c`; TWEED_DATAPATH wins),
`CheckSource` (true; false accepts datagrams from any address and any inner source, for
NATed setups), `MTU` (the underlay MTU to plan for; default the interface's), and one
switch per offload, all on by default and each probed at start (the wire format never
changes; peers still get one inner packet per datagram):
`TSO` (C datapath: the TUN hands over TCP super-packets that we cut into packets),
`Coalesce` (in-order TCP segments of one flow written to the TUN as one super-packet),
`UDPGSO` (a run of packets for one peer leaves in one send), `UDPGRO` (datagrams of one
sender arrive together). TSO and Coalesce open the TUN with a virtio_net_hdr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import NetworkConfig
from agent.lease import Lease, PeerEvent, PeerEventKind
from agent.lease_codec import LeaseAttrs
from backends.base import BackendContext, BackendError
from backends.external_iface import ExternalInterface
from backends.kernel.diff import diff_routes
from backends.kernel.monitor import Desired
from backends.kernel.sync import LOG_EVERY, KernelSync
from backends.kernel.types import ChangeSet, Netlink, Route
from backends.log_tally import LogTally
from backends.options import opt_bool, opt_int, opt_str
from backends.udp.datapath import Datapath, TunLost
from backends.udp.selection import choose_datapath

log = logging.getLogger(__name__)

TYPE = "udp"
OVERHEAD = 28  # outer IPv4 20 + UDP 8
DEVICE = "flannel0"
TXQUEUELEN = 5000
SOCKET_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
#: How long a failed attempt to make flannel0 again waits before the next (doubling).
RECREATE_RETRY = (0.05, 5.0)


@dataclass(frozen=True)
class UdpOptions:
    port: int = 8285
    datapath: str = "auto"
    check_source: bool = True
    mtu: int = 0
    coalesce: bool = True
    tso: bool = True
    udp_gso: bool = True
    udp_gro: bool = True

    @property
    def vnet_hdr(self) -> bool:
        """The TUN needs a virtio_net_hdr for TSO reads and coalesced writes."""
        return self.coalesce or self.tso


def parse_options(backend: dict[str, Any]) -> UdpOptions:
    """Read the udp options (keys already lower-cased by the config parser)."""
    return UdpOptions(
        port=opt_int(backend, "Port", 8285, 1, 65535),
        datapath=opt_str(backend, "Datapath", "auto"),
        check_source=opt_bool(backend, "CheckSource", True),
        mtu=opt_int(backend, "MTU", 0, 0, 65535),
        coalesce=opt_bool(backend, "Coalesce", True),
        tso=opt_bool(backend, "TSO", True),
        udp_gso=opt_bool(backend, "UDPGSO", True),
        udp_gro=opt_bool(backend, "UDPGRO", True),
    )


def open_socket(
    addr: ipaddress.IPv4Address, port: int, size: int = SOCKET_BUFFER
) -> socket.socket:
    """The UDP socket bound to <iface IP>:<port>, with big buffers; warns if the kernel
    gives less than asked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((str(addr), port))
    except OSError as exc:
        sock.close()
        raise BackendError(
            f"Backend.Port: cannot bind UDP {addr}:{port}: {exc.strerror}"
        ) from None
    for force, plain, name in ((SO_SNDBUFFORCE, socket.SO_SNDBUF, "send"),
                               (SO_RCVBUFFORCE, socket.SO_RCVBUF, "receive")):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # root may exceed *mem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
        got = sock.getsockopt(socket.SOL_SOCKET, plain) // 2  # the kernel reports double
        if got < size:
            log.warning("UDP %s buffer is %d bytes, less than the %d asked for; raise"
                        " net.core.%cmem_max to avoid drops under load",
                        name, got, size, "w" if name == "send" else "r")
    sock.setblocking(False)
    return sock


def open_tun(name: str, vnet_hdr: bool = False) -> Any:
    """The TUN device, IFF_TUN | IFF_NO_PI: packets are raw IP. With `vnet_hdr`, each read
    and write also carries a virtio_net_hdr (local to this host; nothing on the wire
    changes), so that coalesced TCP segments can be written as one."""
    import pytun

    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    try:
        return pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        raise BackendError(f"cannot open TUN device {name}: {exc}") from None


class UdpNetwork:
    """flannel0, the UDP socket and the datapath between them."""

    def __init__(
        self, netlink: Netlink, ext: ExternalInterface, config: NetworkConfig,
        opts: UdpOptions, datapath_cls: type, resync: float,
    ) -> None:
        self.netlink = netlink
        self.ext = ext
        self.config = config
        self.opts = opts
        self.datapath_cls = datapath_cls
        self.lease_attrs = LeaseAttrs(ext.public_ip)  # flanneld's udp writes no backend data
        self.mtu = (opts.mtu or ext.mtu) - OVERHEAD
        self.own: ipaddress.IPv4Network | None = None
        self.tun: Any = None
        self.sock: socket.socket | None = None
        self.datapath: Datapath | None = None
        self.tun_index = 0
        self.peers: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self.kernel = KernelSync(netlink, self._plan, resync)
        #: Peers set and removed, one INFO line at most every LOG_EVERY seconds (under
        #: churn each batch is one change).
        self.peers_log = LogTally(log, self._peers_line, LOG_EVERY, time.monotonic)
        self.tun_lost = 0  # times the TUN reported an error (flannel0 deleted)
        self.tun_recreated = 0  # times flannel0 was made again and handed over

    async def setup(self, lease: Lease) -> None:
        self.own = lease.subnet
        if self.tun is None:
            opts = self.opts
            try:
                self.tun = open_tun(DEVICE, vnet_hdr=opts.vnet_hdr)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - pytun missing, /dev/net/tun absent
                raise BackendError(f"cannot open TUN device {DEVICE}: {exc}") from None
            self.sock = open_socket(self.ext.iface_addr, opts.port)
            self.datapath = self.datapath_cls(
                self.tun.fileno(), self.sock, port=opts.port, mtu=self.mtu,
                check_source=opts.check_source, vnet_hdr=opts.vnet_hdr, tso=opts.tso,
                coalesce=opts.coalesce, gso=opts.udp_gso, gro=opts.udp_gro,
            )
        address = ipaddress.IPv4Interface(f"{lease.subnet.network_address}/32")
        try:
            self.tun_index = await self.netlink.configure_link(
                DEVICE, address, self.mtu, TXQUEUELEN)
        except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError is a plain Exception
            raise BackendError(f"cannot configure TUN device {DEVICE} (address {address},"
                               f" MTU {self.mtu}): {exc}") from None
        assert self.datapath is not None
        self.datapath.set_subnet(lease.subnet)
        self._accept_local()
        if self.peers.pop(lease.subnet, None) is not None:
            self.datapath.del_route(lease.subnet)
        log.info("udp: %s (index %d, MTU %d, address %s), socket %s:%d, %s datapath%s",
                 DEVICE, self.tun_index, self.mtu, address, self.ext.iface_addr,
                 self.opts.port, self.datapath.mode(),
                 "" if self.opts.check_source else ", source checks off")
        await self.sync()

    async def _plan(self) -> ChangeSet:
        net = self.config.network
        if not self.tun_index or net is None:
            return ChangeSet()
        desired = {net: Route(net, None, self.tun_index)}
        index = self.tun_index

        def owned(r: Route) -> bool:
            return r.gateway is None and r.dst == net and r.oif == index

        self.kernel.desired = Desired(desired, owned, links={index: DEVICE})
        actual = await self.kernel.view.routes(oif=index)
        diff = diff_routes(desired, actual, owned)
        return ChangeSet(route_replace=list(diff.replace), route_delete=list(diff.delete))

    def _peers_line(self, counts: Mapping[Any, int], batches: int) -> str:
        line = (f"udp: set {counts.get('set', 0)} peers, removed {counts.get('removed', 0)};"
                f" {len(self.peers)} known")
        return line if batches == 1 else f"{line} (in {batches} batches)"

    async def apply(self, events: list[PeerEvent]) -> None:
        dp = self.datapath
        assert dp is not None
        added = removed = 0
        for ev in events:
            subnet = ev.lease.subnet
            if ev.kind is PeerEventKind.REMOVED or subnet == self.own:
                if self.peers.pop(subnet, None) is not None:
                    dp.del_route(subnet)
                    removed += 1
                    log.debug("udp: removed peer %s", subnet)
                continue
            peer = ev.lease.attrs.public_ip
            if self.peers.get(subnet) != peer:
                self.peers[subnet] = peer
                dp.set_route(subnet, peer)
                added += 1
                log.debug("udp: peer %s at %s:%d", subnet, peer, self.opts.port)
        if added or removed:  # per peer at DEBUG: thousands at a large start
            self.peers_log.add({"set": added, "removed": removed})
        await self.sync()

    async def sync(self) -> bool:
        return await self.kernel.sync()

    def ready(self) -> bool:
        return self.datapath is not None and self.kernel.ready()

    def counters(self) -> dict[str, int]:
        if self.datapath is None:
            return {}
        return self.datapath.counters() | {"tun_lost": self.tun_lost,
                                            "tun_recreated": self.tun_recreated}

    def _accept_local(self) -> None:
        """accept_local=1 on flannel0 (with the source checks on): the time exceeded the
        datapath writes into it comes from flannel0's own address."""
        if not self.opts.check_source:
            return
        path = f"/proc/sys/net/ipv4/conf/{DEVICE}/accept_local"
        try:
            with open(path, "w") as f:
                f.write("1")
        except FileNotFoundError:
            log.debug("udp: no %s (not a real %s)", path, DEVICE)
        except OSError as exc:
            log.warning("udp: cannot set %s (%s): traceroute shows this host's hop as *",
                        path, exc.strerror)

    async def run(self) -> None:
        assert self.datapath is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._run_datapath(), name="datapath")
            tg.create_task(self.kernel.run(), name="udp-resync")

    async def _run_datapath(self) -> None:
        """The datapath until it is stopped; each time its TUN is lost, flannel0 again."""
        assert self.datapath is not None
        while True:
            try:
                await self.datapath.run()
                return
            except TunLost as exc:
                self.tun_lost += 1
                log.warning("udp: %s is gone (%s); making it again", DEVICE, exc)
            await self._recreate()

    async def _recreate(self) -> None:
        """A new flannel0 (address, MTU, queue length, up) handed to the datapath, then
        the Network route synced; retried with a growing pause until it works."""
        assert self.datapath is not None and self.own is not None
        delay, cap = RECREATE_RETRY
        while True:
            start = asyncio.get_running_loop().time()
            try:
                await self._open_again(self.own)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, one line each
                log.error("udp: cannot make %s again: %s; retrying in %.2f s", DEVICE,
                          exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            self.tun_recreated += 1
            log.info("udp: %s made again (index %d) in %.0f ms", DEVICE, self.tun_index,
                     (asyncio.get_running_loop().time() - start) * 1000)
            await self.sync()
            return

    async def _open_again(self, subnet: ipaddress.IPv4Network) -> None:
        assert self.datapath is not None
        if self.tun is not None:  # the old fd holds nothing now; closing it frees the name
            with contextlib.suppress(Exception):
                self.tun.close()
            self.tun = None
        self.tun = open_tun(DEVICE, vnet_hdr=self.opts.vnet_hdr)
        address = ipaddress.IPv4Interface(f"{subnet.network_address}/32")
        self.tun_index = await self.netlink.configure_link(DEVICE, address, self.mtu, TXQUEUELEN)
        self._accept_local()
        self.datapath.set_tun(self.tun.fileno())

    async def close(self) -> None:
        if self.datapath is not None:
            self.datapath.stop()
        if self.sock is not None:
            self.sock.close()
        if self.tun is not None:
            with contextlib.suppress(Exception):
                self.tun.close()


class UdpBackend:
    """Builds UdpNetworks."""

    name = TYPE

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @staticmethod
    def check_options(backend: dict[str, Any]) -> None:
        parse_options(backend)

    async def register_network(self, config: NetworkConfig) -> UdpNetwork:
        ctx = self.ctx
        opts = parse_options(config.backend)
        try:
            cls = choose_datapath(opts.datapath, dict(os.environ))
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if (opts.mtu or ctx.ext.mtu) - OVERHEAD < 68:
            raise BackendError(f"Backend.MTU: {opts.mtu or ctx.ext.mtu} is too small for udp")
        return UdpNetwork(ctx.netlink, ctx.ext, config, opts, cls, ctx.resync)
