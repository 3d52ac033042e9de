"""Datapath: moves packets between the TUN device and the UDP socket for the udp backend.

The interface is small (set_route, del_route, run, stop, counters) so that a pure-Python
(backends/udp/python_datapath.py) and a C implementation (backends/udp/c_datapath.py over
_fastpath.c) can stand behind it, chosen by name (backends/udp/selection.py). This module
holds only the contract they share: the protocol, the counter and offload names, and the
wire constants.

Wire format (flanneld's): each UDP datagram carries exactly one raw IPv4 packet. Both
ends decrement the inner TTL, as two routers would. A packet whose TTL runs out is dropped
and answered with an ICMP time exceeded from flannel0's address (our subnet's first
address): written back into the TUN on the sending side, sent back to the peer that routes
the packet's source on the receiving side. A packet from the TUN with no matching peer
subnet gets an ICMP net-unreachable written back into the TUN. ICMP errors are
rate-limited per destination as the kernel's (backends/udp/packet.py, IcmpLimiter). On
receive, datagrams are dropped (and counted by reason) when they come from an address that
is no current peer's PublicIP, are not a whole IPv4 packet, are larger than the TUN's MTU,
carry an inner source outside the sending peer's subnets, or an inner destination outside
this host's subnet (set_subnet; until it is set, every datagram is dropped so); the two
source checks can be turned off for NATed setups, the destination check cannot.

IPv6 (issue 14, beyond flanneld, whose udp backend is IPv4-only): a datagram may carry one
raw IPv6 packet instead, told apart by the version nibble, under the same rules
(backends/udp/packet6.py): hop limit decremented on both ends, ICMPv6 time exceeded from
flannel0's v6 address and ICMPv6 no route, rate-limited like the v4 errors, the same
receive checks against the v6 subnets. Multicast and link-local destinations (ff00::/8,
fe80::/10: the kernel's own ND/MLD chatter on flannel0) are not forwarded
(tx_drop_local_scope). The underlay is independent of the inner family: a peer reachable
at an IPv6 address is sent to over a second, AF_INET6 socket. Two sockets rather than one
dual-stack AF_INET6 socket with v4-mapped addresses: flanneld peers expect plain v4
datagrams from the v4 PublicIP on port 8285, which a v4 socket bound to that address gives
as it always did (a dual socket cannot bind a v4 and a v6 address at once), and the v4
path, the one flanneld interoperates with, is left exactly as fast as it was.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Protocol

#: Counter names, in the order they are reported.
COUNTERS = (
    "tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "rx_datagrams",
    "tx_drop_malformed", "tx_drop_no_route", "tx_drop_ttl", "tx_drop_send_error",
    "rx_drop_unknown_source", "rx_drop_malformed", "rx_drop_oversized",
    "rx_drop_spoofed_source", "rx_drop_ttl", "rx_drop_tun_error", "icmp_unreachable_sent",
    "gso_sends", "gro_receives", "coalesced_writes", "tso_reads",
    "rx_drop_dst_outside", "icmp_time_exceeded_sent", "icmp_rate_limited", "tx_socket_full",
    "tx_drop_local_scope",
)
#: The offloads a datapath may use, as reported by offloads() and in counters() as
#: `offload_<name>` (1 in use, 0 not).
OFFLOADS = ("tun_tso", "udp_gso", "udp_gro", "tun_coalesce")
BUF_SIZE = 65536
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: Linux accepts at most 64 segments per UDP GSO send, and 64 KiB in all.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
#: The batches both datapaths work in, so that their runs and merges come out the same:
#: up to TUN_BATCH reads from the TUN before the packets read are sent (a send run never
#: spans two batches), up to RX_BATCH receives from the socket (each may hold several
#: datagrams with UDP GRO) before the packets received are written to the TUN (in-order
#: TCP segments of a batch are merged, COALESCE_MAX_SEGMENTS and COALESCE_MAX_BYTES at
#: most per write). The C datapath's values are checked against these by a test.
TUN_BATCH = 64
RX_BATCH = 16
COALESCE_MAX_SEGMENTS = 64
COALESCE_MAX_BYTES = 65000
#: struct virtio_net_hdr (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset),
#: in the host's byte order, as a TUN opened with IFF_VNET_HDR reads and writes it.
VNET_HDR = struct.Struct("=BBHHHH")
VNET_NONE = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1


class TunLost(Exception):
    """The TUN device reported an error or hang-up (flannel0 was deleted): run() ends
    with this, and the backend makes a new device and hands it over (set_tun)."""


#: An overlay subnet and an underlay (PublicIP) address: either family, independently.
Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Datapath(Protocol):
    """What the udp backend needs from a packet mover."""

    name: str

    def set_route(self, subnet: Subnet, peer: Address) -> None:
        """Packets for `subnet` go to `peer` (its PublicIP, or its PublicIPv6: over the
        v6 socket); datagrams from `peer` may carry sources in `subnet`. The two families
        are independent: a v6 subnet may sit behind a v4 peer address and the reverse."""
        ...

    def del_route(self, subnet: Subnet) -> None:
        ...

    def set_subnet(self, subnet: Subnet) -> None:
        """This host's subnet of that family: datagrams are delivered only for
        destinations in it, and its first address (flannel0's) is the source of ICMP (v4)
        or ICMPv6 time exceeded. Setting one family leaves the other as it was."""
        ...

    def set_tun(self, tun_fd: int) -> None:
        """Move packets through this TUN fd from now on (a recreated flannel0); only
        while run() is not running."""
        ...

    async def run(self) -> None:
        """Move packets until stop(); raises TunLost when the TUN device is gone."""
        ...

    def stop(self) -> None:
        ...

    def counters(self) -> dict[str, int]:
        ...

    def mode(self) -> str:
        """Which datapath and offloads are in use, for the log."""
        ...

    def offloads(self) -> dict[str, bool]:
        """Each of OFFLOADS and whether it is in use now."""
        ...


def describe_offloads(offloads: dict[str, bool]) -> str:
    """`tun tso on, udp gso on, ...` for the log line."""
    return ", ".join(f"{name.replace('_', ' ')} {'on' if offloads.get(name) else 'off'}"
                     for name in OFFLOADS)


def offload_counters(offloads: dict[str, bool]) -> dict[str, int]:
    """The offloads as `offload_<name>` entries of counters()."""
    return {f"offload_{name}": int(bool(offloads.get(name))) for name in OFFLOADS}
