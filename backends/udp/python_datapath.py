"""PythonDatapath: the udp backend's packet mover in pure Python, on the event loop.

One reader per fd; each wake-up drains its fd until EAGAIN into a preallocated buffer,
patches the packets in place and passes them on. Nothing per packet calls into logging or
metrics: counters are plain integer attributes that the control plane reads when asked.
The semantics (wire format, checks, counters) are those of backends/udp/datapath.py, and
so are the batches: this is the C datapath's twin, algorithm for algorithm (the same route
table, send runs, receive batches and coalescing rule), and one test suite runs against
both (tests/unit/test_datapath.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable

from backends.udp import packet6
from backends.udp.datapath import (
    BUF_SIZE,
    COALESCE_MAX_BYTES,
    COALESCE_MAX_SEGMENTS,
    COUNTERS,
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    RX_BATCH,
    SOL_UDP,
    TUN_BATCH,
    UDP_GRO,
    UDP_SEGMENT,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    VNET_NONE,
    Address,
    Subnet,
    TunLost,
    describe_offloads,
    offload_counters,
)
from backends.udp.lpm import RouteTable
from backends.udp.packet import (
    ICMP_RATELIMIT_MS,
    IcmpLimiter,
    checksum,
    decrement_ttl,
    net_unreachable,
    time_exceeded,
)

#: A packet waiting in the receive buffer: (offset, length).
Pending = tuple[int, int]


class PythonDatapath:
    """The pure-Python datapath on the asyncio (uv)loop."""

    name = "python"

    # The counters (COUNTERS), plain attributes bumped on the packet path.
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    rx_datagrams: int
    tx_drop_malformed: int
    tx_drop_no_route: int
    tx_drop_ttl: int
    tx_drop_send_error: int
    rx_drop_unknown_source: int
    rx_drop_malformed: int
    rx_drop_oversized: int
    rx_drop_spoofed_source: int
    rx_drop_ttl: int
    rx_drop_tun_error: int
    icmp_unreachable_sent: int
    gso_sends: int
    gro_receives: int
    coalesced_writes: int
    tso_reads: int
    rx_drop_dst_outside: int
    icmp_time_exceeded_sent: int
    icmp_rate_limited: int
    tx_socket_full: int
    tx_drop_local_scope: int

    def __init__(
        self, tun_fd: int, sock: socket.socket, *, port: int, mtu: int,
        check_source: bool = True, gso: bool = True, gro: bool = True,
        vnet_hdr: bool = False, tso: bool = False, coalesce: bool = True,
        icmp_ratelimit_ms: int = ICMP_RATELIMIT_MS, sock6: socket.socket | None = None,
    ) -> None:
        self.tun_fd = tun_fd
        # The TUN was opened with IFF_VNET_HDR: every read and write starts with a
        # virtio_net_hdr, which lets us write coalesced TCP super-packets. TSO (cutting
        # super-packets read from the TUN) is the C datapath's alone: `tso` is ignored.
        self.vnet_hdr = vnet_hdr
        self.coalesce = vnet_hdr and coalesce
        self.sock = sock
        # The AF_INET6 socket for peers at v6 underlay addresses (datapath.py says why
        # two sockets); None: every peer is at a v4 address.
        self.sock6 = sock6
        self.port = port
        self.mtu = mtu
        self.check_source = check_source
        # subnet -> (PublicIP, port), looked up per packet sent, and per packet received
        # for the source check: a source is the sender's when the entry for it at some
        # prefix length names the sender (as in the C datapath).
        self.routes: RouteTable[tuple[str, int]] = RouteTable()
        # The same for IPv6 subnets; the value's address is v4 or v6 (the underlay).
        self.routes6: RouteTable[tuple[str, int]] = RouteTable(128)
        # PublicIP -> how many subnets it holds: is a datagram's sender a peer at all.
        self.peers: dict[str, int] = {}
        # Our subnet as (network, mask) integers: a received packet is ours when
        # dst & mask == network. Unset, no destination matches (-1 is no masked value).
        self.own_net, self.own_mask = -1, 0
        self.own_addr = b"\0\0\0\0"  # flannel0's address, the source of time exceeded
        # The same for our IPv6 subnet (own6_mask 0: not set, nothing is ours).
        self.own6_net, self.own6_mask = -1, 0
        self.own6_addr = bytes(16)
        self.limiter = IcmpLimiter(icmp_ratelimit_ms)
        self._stopped: asyncio.Future[None] | None = None
        self._lost = False
        for name in COUNTERS:
            setattr(self, name, 0)
        self.gso = gso and _probe_gso(sock)
        self.gro = gro and _enable_gro(sock)
        # The v6 socket's own: a kernel may segment one family and not the other.
        self.gso6 = sock6 is not None and gso and _probe_gso(sock6)
        self.gro6 = sock6 is not None and gro and _enable_gro(sock6)

    def offloads(self) -> dict[str, bool]:
        # With a v6 socket too, an offload is on when it is on for both sockets.
        six = self.sock6 is not None
        return {"tun_tso": False, "udp_gso": self.gso and (self.gso6 or not six),
                "udp_gro": self.gro and (self.gro6 or not six),
                "tun_coalesce": self.coalesce}

    def mode(self) -> str:
        """Which offloads are in use, for logs and counters."""
        return f"python ({describe_offloads(self.offloads())})"

    # -- control -------------------------------------------------------------------
    def _table(self, subnet: Subnet) -> RouteTable[tuple[str, int]]:
        return self.routes if subnet.version == 4 else self.routes6

    def set_route(self, subnet: Subnet, peer: Address) -> None:
        if peer.version == 6 and self.sock6 is None:
            raise ValueError(f"peer {peer}: an IPv6 underlay address, and no IPv6 socket")
        self.del_route(subnet)
        addr = (str(peer), self.port)
        self._table(subnet).set(subnet, addr)
        self.peers[addr[0]] = self.peers.get(addr[0], 0) + 1

    def set_subnet(self, subnet: Subnet) -> None:
        if subnet.prefixlen == 0:
            raise ValueError(f"our subnet cannot be {subnet}")
        if subnet.version == 6:
            self.own6_net, self.own6_mask = int(subnet.network_address), int(subnet.netmask)
            self.own6_addr = subnet.network_address.packed
            return
        self.own_net, self.own_mask = int(subnet.network_address), int(subnet.netmask)
        self.own_addr = subnet.network_address.packed

    def set_tun(self, tun_fd: int) -> None:
        if self._stopped is not None and not self._stopped.done():
            raise RuntimeError("set_tun while the datapath runs")
        self.tun_fd = tun_fd
        self._lost = False

    def del_route(self, subnet: Subnet) -> None:
        old = self._table(subnet).delete(subnet)
        if old is None:
            return
        left = self.peers.pop(old[0]) - 1
        if left:
            self.peers[old[0]] = left

    def counters(self) -> dict[str, int]:
        values = {name: getattr(self, name) for name in COUNTERS}
        return values | offload_counters(self.offloads())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        os.set_blocking(self.tun_fd, False)
        self.sock.setblocking(False)
        # The fds are kept: the sockets may be closed first.
        tun_fd, sock_fds = self.tun_fd, [self.sock.fileno()]
        loop.add_reader(tun_fd, self._from_tun())
        loop.add_reader(sock_fds[0], self._from_udp())
        if self.sock6 is not None:
            self.sock6.setblocking(False)
            sock_fds.append(self.sock6.fileno())
            loop.add_reader(sock_fds[1], self._from_udp(self.sock6))
        try:
            await self._stopped
        finally:
            loop.remove_reader(tun_fd)
            for fd in sock_fds:
                loop.remove_reader(fd)
        if self._lost:
            raise TunLost(f"the TUN (fd {tun_fd}) reported an error: the device is gone")

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _tun_lost(self) -> None:
        """A TUN read failed other than EAGAIN (a deleted device reads EBADFD) or read
        end of file, and the loop would call the reader again at once (the C loop sees
        the same as POLLERR/POLLHUP): end run() with TunLost."""
        self._lost = True
        self.stop()

    def _icmp_allowed(self, reply: bytes) -> bool:
        """The rate limit for an ICMP (or ICMPv6) error to the reply's destination (a v6
        one folded to 32 bits, packet6.fold); counts a refusal."""
        dst = (int.from_bytes(reply[16:20], "big") if reply[0] >> 4 == 4
               else packet6.fold(int.from_bytes(reply[24:40], "big")))
        if self.limiter.allow(dst, time.monotonic_ns() // 1_000_000):
            return True
        self.icmp_rate_limited += 1
        return False

    def _icmp_to_tun(self, fd: int, plain: list[bytes], reply: bytes | None) -> bool:
        """Write an ICMP error (after the TUN's `plain` header) if there is one and the
        rate limit lets it go; whether it was written."""
        if reply is None or not self._icmp_allowed(reply):
            return False
        try:
            os.writev(fd, [*plain, reply])
        except OSError:
            return False
        return True

    # -- the packet path -------------------------------------------------------------
    # Both handlers are closures over locals: attribute and global look-ups cost more
    # than the work itself at this rate. The system calls dominate (about 9 us of the
    # 10 us a packet costs here), so the sender batches: consecutive packets for one peer
    # of one size (the last may be shorter) leave in one sendmsg with UDP_SEGMENT, and
    # the kernel cuts them into one datagram each; the wire format does not change. The
    # receiver enables UDP_GRO and splits what arrives coalesced.
    def _from_tun(self) -> Callable[[], None]:
        mtu = self.mtu
        buf = bytearray(TUN_BATCH * mtu)  # one batch of reads, each at most the MTU
        view = memoryview(buf)
        readv, fd = os.readv, self.tun_fd
        head = [bytearray(VNET_HDR.size)] if self.vnet_hdr else []
        hlen = VNET_HDR.size if self.vnet_hdr else 0
        plain = [VNET_NONE] if self.vnet_hdr else []
        pack = struct.Struct("=H").pack
        from_bytes, dec_ttl = int.from_bytes, decrement_ttl
        dec_hops, not_forwarded = packet6.decrement_hop_limit, packet6.not_forwarded

        def send_run(start: int, end: int, seg: int, count: int, addr: tuple[str, int]) -> None:
            six = ":" in addr[0]  # a peer at a v6 underlay address: the v6 socket
            sock = self.sock6 if six else self.sock
            assert sock is not None  # set_route refuses v6 peers without it
            gso = self.gso6 if six else self.gso
            sendto = sock.sendto
            if count == 1 or not gso:
                # One datagram per send; each that fails is dropped alone.
                for pos in range(start, end, seg):
                    stop = min(pos + seg, end)
                    try:
                        sendto(view[pos:stop], addr)
                    except OSError as exc:
                        if exc.errno == errno.EAGAIN:
                            self.tx_socket_full += 1
                        self.tx_drop_send_error += 1
                        continue
                    self.tx_packets += 1
                    self.tx_bytes += stop - pos
                return
            try:
                sock.sendmsg([view[start:end]], [(SOL_UDP, UDP_SEGMENT, pack(seg))], 0, addr)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                    if exc.errno == errno.EAGAIN:
                        self.tx_socket_full += 1
                    self.tx_drop_send_error += count
                    return
                # EIO/EINVAL/...: this path cannot segment; send one by one from now on.
                if six:
                    self.gso6 = False
                else:
                    self.gso = False
                send_run(start, end, seg, count, addr)
                return
            self.gso_sends += 1
            self.tx_packets += count
            self.tx_bytes += end - start

        def route6(off: int, n: int) -> tuple[str, int] | None:
            """The peer for the IPv6 packet at buf[off:off+n], its hop limit decremented;
            None when it is dropped (counted, answered as packet6 says)."""
            if 40 + ((buf[off + 4] << 8) | buf[off + 5]) > n:
                self.tx_drop_malformed += 1  # its payload length says more than was read
                return None
            dst = from_bytes(buf[off + 24:off + 40], "big")
            if not_forwarded(dst):
                self.tx_drop_local_scope += 1
                return None
            addr = None
            for mask, table in self.routes6.levels:
                addr = table.get(dst & mask)
                if addr is not None:
                    break
            if addr is None:
                self.tx_drop_no_route += 1
                if self._icmp_to_tun(fd, plain, packet6.no_route(view[off:off + n])):
                    self.icmp_unreachable_sent += 1
                return None
            if not dec_hops(buf, off):
                self.tx_drop_ttl += 1
                reply = (packet6.time_exceeded(view[off:off + n], self.own6_addr)
                         if self.own6_mask else None)  # our v6 subnet not set yet
                if self._icmp_to_tun(fd, plain, reply):
                    self.icmp_time_exceeded_sent += 1
                return None
            return addr

        batch = range(TUN_BATCH)

        def on_readable() -> None:
            levels = self.routes.levels
            drained = False
            first = True
            while not drained:  # a batch of reads, sent before the next is read
                start = off = count = seg = 0
                short = False
                raddr = ("", 0)
                for _ in batch:
                    try:
                        got = readv(fd, [*head, view[off:off + mtu]])
                    except (BlockingIOError, InterruptedError):
                        drained = True
                        if first and _hung_up(fd):  # woken for nothing: a hang-up?
                            self._tun_lost()
                            return
                        break
                    except OSError:
                        self._tun_lost()
                        return
                    first = False
                    n = got - hlen
                    if n < 20 or buf[off] >> 4 != 4:
                        # IPv6 (version nibble 6), else malformed.
                        if n < 40 or buf[off] >> 4 != 6:
                            self.tx_drop_malformed += 1
                            continue
                        addr = route6(off, n)
                        if addr is None:
                            continue
                    else:
                        dst = from_bytes(buf[off + 16:off + 20], "big")
                        addr = None
                        for mask, table in levels:
                            addr = table.get(dst & mask)
                            if addr is not None:
                                break
                        if addr is None:
                            self.tx_drop_no_route += 1
                            if self._icmp_to_tun(fd, plain,
                                                 net_unreachable(view[off:off + n])):
                                self.icmp_unreachable_sent += 1
                            continue
                        if not dec_ttl(buf, off):
                            self.tx_drop_ttl += 1
                            reply = (time_exceeded(view[off:off + n], self.own_addr)
                                     if self.own_mask else None)  # our subnet not set yet
                            if self._icmp_to_tun(fd, plain, reply):
                                self.icmp_time_exceeded_sent += 1
                            continue
                    if count and (
                            addr != raddr or n > seg or short or count >= GSO_MAX_SEGMENTS
                            or off + n - start > GSO_MAX_BYTES):
                        send_run(start, off, seg, count, raddr)
                        start, count = off, 0
                    if count == 0:
                        raddr, seg, short = addr, n, False
                    elif n < seg:
                        short = True  # only the last segment of a run may be shorter
                    count += 1
                    off += n
                if count:
                    send_run(start, off, seg, count, raddr)

        return on_readable

    def _sock_for(self, addr: tuple[str, int]) -> socket.socket | None:
        """The socket that reaches a peer: the v6 one for a v6 underlay address."""
        return self.sock6 if ":" in addr[0] else self.sock

    def _from_udp(self, sock: socket.socket | None = None) -> Callable[[], None]:
        """The reader of `sock` (default: the v4 socket)."""
        sock = self.sock if sock is None else sock
        gro = self.gro6 if sock is self.sock6 else self.gro
        mtu = self.mtu
        # One slot per receive of a batch: with GRO a receive may hold 64 KiB of
        # datagrams; without, a slot a little over the MTU shows an oversized datagram by
        # its length (cut to the slot).
        slot = BUF_SIZE if gro else mtu + 64
        buf = bytearray(RX_BATCH * slot)
        view = memoryview(buf)
        slots = [[view[i * slot:(i + 1) * slot]] for i in range(RX_BATCH)]
        recvmsg_into = sock.recvmsg_into
        writev, fd = os.writev, self.tun_fd
        from_bytes, dec_ttl = int.from_bytes, decrement_ttl
        dec_hops = packet6.decrement_hop_limit
        ancsize = socket.CMSG_SPACE(4)
        vnet = self.vnet_hdr
        coalesce = self.coalesce
        plain = [VNET_NONE] if vnet else []
        pack_vnet = VNET_HDR.pack

        def check(pos: int, n: int, sender: str, strict: bool,
                  levels: list[tuple[int, dict[int, tuple[str, int]]]], own_net: int,
                  own_mask: int) -> int:
            """Validate and TTL-patch the packet at buf[pos:pos+n] from `sender` (a peer,
            when strict) for our subnet; its length, 0 if dropped."""
            if n > mtu:
                self.rx_drop_oversized += 1
                return 0
            if n < 20 or buf[pos] >> 4 != 4:
                if n >= 40 and buf[pos] >> 4 == 6:
                    return check6(pos, n, sender, strict)
                self.rx_drop_malformed += 1
                return 0
            ihl = (buf[pos] & 0x0F) << 2
            total = (buf[pos + 2] << 8) | buf[pos + 3]
            if ihl < 20 or total < ihl or total > n:
                self.rx_drop_malformed += 1
                return 0
            if strict:
                inner = from_bytes(buf[pos + 12:pos + 16], "big")
                for mask, table in levels:
                    owner = table.get(inner & mask)
                    if owner is not None and owner[0] == sender:
                        break
                else:
                    self.rx_drop_spoofed_source += 1
                    return 0
            if from_bytes(buf[pos + 16:pos + 20], "big") & own_mask != own_net:
                self.rx_drop_dst_outside += 1
                return 0
            if not dec_ttl(buf, pos):
                self.rx_drop_ttl += 1
                ttl_answer(view[pos:pos + total], levels)
                return 0
            return total

        def check6(pos: int, n: int, sender: str, strict: bool) -> int:
            """check() for an IPv6 packet (at least a header's worth, not oversized)."""
            total = 40 + ((buf[pos + 4] << 8) | buf[pos + 5])
            if total > n:
                self.rx_drop_malformed += 1
                return 0
            levels6 = self.routes6.levels
            if strict:
                inner = from_bytes(buf[pos + 8:pos + 24], "big")
                for mask, table in levels6:
                    owner = table.get(inner & mask)
                    if owner is not None and owner[0] == sender:
                        break
                else:
                    self.rx_drop_spoofed_source += 1
                    return 0
            if from_bytes(buf[pos + 24:pos + 40], "big") & self.own6_mask != self.own6_net:
                self.rx_drop_dst_outside += 1
                return 0
            if not dec_hops(buf, pos):
                self.rx_drop_ttl += 1
                back = from_bytes(buf[pos + 8:pos + 24], "big")
                send_back(packet6.time_exceeded(view[pos:pos + total], self.own6_addr),
                          back, levels6)
                return 0
            return total

        def ttl_answer(offender: memoryview,
                       levels: list[tuple[int, dict[int, tuple[str, int]]]]) -> None:
            """Time exceeded back to the peer that routes the offender's source."""
            send_back(time_exceeded(offender, self.own_addr),
                      from_bytes(offender[12:16], "big"), levels)

        def send_back(reply: bytes | None, back: int,
                      levels: list[tuple[int, dict[int, tuple[str, int]]]]) -> None:
            """An ICMP error to the peer whose subnet (in `levels`) holds `back`."""
            if reply is None:
                return
            for mask, table in levels:
                addr = table.get(back & mask)
                if addr is not None:
                    break
            else:
                return
            out = self._sock_for(addr)
            if out is None or not self._icmp_allowed(reply):
                return
            try:
                out.sendto(reply, addr)
            except OSError:
                return
            self.icmp_time_exceeded_sent += 1

        def write(parts: list, count: int, nbytes: int) -> None:
            try:
                writev(fd, parts)
            except OSError:
                self.rx_drop_tun_error += count
                return
            self.rx_packets += count
            self.rx_bytes += nbytes

        def write_batch(pkts: list[Pending]) -> None:
            """Write a receive batch's packets to the TUN, in order; with a vnet header,
            runs of in-order segments of one TCP flow go as one GSO super-packet (the
            kernel's GRO, done here)."""
            if not coalesce or len(pkts) == 1:
                for pos, total in pkts:
                    write([*plain, view[pos:pos + total]], 1, total)
                return
            i = 0
            while i < len(pkts):
                j = coalescible_run(pkts, i)
                if j - i == 1:
                    pos, total = pkts[i]
                    write([*plain, view[pos:pos + total]], 1, total)
                else:
                    write_super(pkts[i:j])
                i = j

        def tcp_key(pos: int, total: int) -> tuple | None:
            # Plain IPv4 (no options), TCP, not a fragment, flags ACK or ACK|PSH, payload.
            if buf[pos] != 0x45 or buf[pos + 9] != 6 or (buf[pos + 6] & 0x3F) or buf[pos + 7]:
                return None
            thl = (buf[pos + 32] >> 4) << 2
            flags = buf[pos + 33]
            if thl < 20 or total <= 20 + thl or flags not in (0x10, 0x18):
                return None
            # TOS, TTL, DF, flow, ack, offset/AE bits, window and options must match to merge.
            return (buf[pos + 1], buf[pos + 8], buf[pos + 6] & 0x40, buf[pos + 32],
                    bytes(view[pos + 12:pos + 24]), bytes(view[pos + 28:pos + 32]),
                    bytes(view[pos + 34:pos + 36]), bytes(view[pos + 40:pos + 20 + thl]))

        def coalescible_run(pkts: list[Pending], i: int) -> int:
            """The end of the run from pkts[i] that goes as one write: in-order segments
            of one flow, each as long as the first but the last, PSH on the last only,
            COALESCE_MAX_SEGMENTS and COALESCE_MAX_BYTES at most (the C merge_run)."""
            pos, total = pkts[i]
            key = tcp_key(pos, total)
            if key is None:
                return i + 1
            thl = (buf[pos + 32] >> 4) << 2
            mss = total - 20 - thl
            seq = from_bytes(buf[pos + 24:pos + 28], "big") + mss
            size = total
            j = i + 1
            while (j < len(pkts) and j - i < COALESCE_MAX_SEGMENTS
                   and buf[pkts[j - 1][0] + 33] == 0x10):
                pos, total = pkts[j]
                payload = total - 20 - thl
                if (payload > mss or size + payload > COALESCE_MAX_BYTES
                        or tcp_key(pos, total) != key
                        or from_bytes(buf[pos + 24:pos + 28], "big") != seq & 0xFFFFFFFF):
                    break
                size += payload
                seq += payload
                j += 1
                if payload < mss:
                    break  # only the last segment may be short
            return j

        def write_super(run: list[Pending]) -> None:
            pos, total = run[0]
            thl = (buf[pos + 32] >> 4) << 2
            hl = 20 + thl
            mss = total - hl
            payload = sum(t - hl for _, t in run)
            ip = bytearray(view[pos:pos + 20])
            ip[2], ip[3] = (hl + payload) >> 8, (hl + payload) & 0xFF
            ip[10] = ip[11] = 0
            c = checksum(ip)
            ip[10], ip[11] = c >> 8, c & 0xFF
            tcp = bytearray(view[pos + 20:pos + hl])
            tcp[13] |= buf[run[-1][0] + 33] & 0x08  # PSH of the last segment
            # NEEDS_CSUM: the kernel completes the checksum from the pseudo-header sum.
            pseudo = (from_bytes(ip[12:14], "big") + from_bytes(ip[14:16], "big")
                      + from_bytes(ip[16:18], "big") + from_bytes(ip[18:20], "big")
                      + 6 + thl + payload)
            while pseudo >> 16:
                pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
            tcp[16], tcp[17] = pseudo >> 8, pseudo & 0xFF
            hdr = pack_vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hl, mss,
                            20, 16)
            write([hdr, ip, tcp, *(view[p + hl:p + t] for p, t in run)], len(run),
                  hl * len(run) + payload)
            self.coalesced_writes += 1

        def on_readable() -> None:
            peers = self.peers
            levels = self.routes.levels
            strict = self.check_source
            own_net, own_mask = self.own_net, self.own_mask
            while True:
                # One receive batch (recvmmsg in the C datapath): up to RX_BATCH receives,
                # then what they held goes to the TUN together.
                pkts: list[Pending] = []
                received = 0
                for i in range(RX_BATCH):
                    try:
                        n, anc, _flags, src = recvmsg_into(slots[i], ancsize)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # e.g. ICMP port unreachable reported on the socket
                    received += 1
                    src_ip = src[0]  # (host, port), or a 4-tuple from the v6 socket
                    base = i * slot
                    seg = n
                    for level, kind, data in anc:
                        if level == SOL_UDP and kind == UDP_GRO:
                            size = from_bytes(data[:4], "little")
                            if 0 < size < n:
                                seg = size
                                self.gro_receives += 1
                    datagrams = (n + seg - 1) // seg if n else 1
                    self.rx_datagrams += datagrams
                    if strict and src_ip not in peers:
                        self.rx_drop_unknown_source += datagrams
                        continue
                    if seg == n:
                        total = check(base, n, src_ip, strict, levels, own_net, own_mask)
                        if total:
                            if coalesce:
                                pkts.append((base, total))
                            else:  # nothing to merge: no need to wait for the batch
                                write([*plain, view[base:base + total]], 1, total)
                        continue
                    for pos in range(base, base + n, seg):
                        total = check(pos, min(seg, base + n - pos), src_ip, strict, levels,
                                      own_net, own_mask)
                        if total:
                            pkts.append((pos, total))
                    if not coalesce:
                        write_batch(pkts)
                        pkts = []
                if pkts:
                    write_batch(pkts)
                if received < RX_BATCH:
                    break

        return on_readable


def _hung_up(fd: int) -> bool:
    """Does poll() report an error or hang-up on `fd` (as the C loop checks)?"""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))


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
