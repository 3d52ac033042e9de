"""IPv6 packet rules for the udp backend: header checks, hop limit decrement, which
destinations are not forwarded, ICMPv6 errors (time exceeded, destination unreachable)
as a router sends them, and the rate-limit bucket of a v6 destination.

Pure logic, no I/O, in place on bytearrays as packet.py does for IPv4. The IPv6 header has
no checksum, so the hop limit is one byte to decrement. ICMPv6 errors follow RFC 4443:
never in answer to an ICMPv6 error, nor to a packet from the unspecified address or a
multicast one (2.4(e)); the error carries as much of the offender as fits in the minimum
IPv6 MTU of 1280 bytes (2.4(c)); its checksum covers the v6 pseudo header (RFC 8200
8.1). The C datapath (_fastpath.c) has a twin of each; the datapath suite holds them to
the same behaviour.
"""

from __future__ import annotations

import struct

from backends.udp.packet import ICMP_BUCKET_BITS, checksum

IPV6_HEADER = 40
NEXT_ICMPV6 = 58
#: RFC 4443 2.4(c): an ICMPv6 error is at most the minimum IPv6 MTU.
IPV6_MIN_MTU = 1280
ICMPV6_DEST_UNREACH = 1
ICMPV6_NO_ROUTE = 0
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_HOP_LIMIT = 0
#: Hop limit of the errors we originate (the kernel's default, net.ipv6.conf.*.hop_limit).
HOP_LIMIT = 64
#: Extension headers walked to find the upper-layer protocol of an offender: hop-by-hop,
#: routing, destination options (length in 8-byte units, beyond the first 8), fragment.
EXT_HEADERS = frozenset({0, 43, 60})
EXT_FRAGMENT = 44


def valid_header(buf: bytes | bytearray | memoryview, length: int) -> bool:
    """An IPv6 header that is complete, with a payload length that fits in `length`."""
    if length < IPV6_HEADER or buf[0] >> 4 != 6:
        return False
    return IPV6_HEADER + ((buf[4] << 8) | buf[5]) <= length


def total_length(buf: bytes | bytearray | memoryview, pos: int = 0) -> int:
    """The packet's length from its header: 40 + payload length (no jumbograms)."""
    return IPV6_HEADER + ((buf[pos + 4] << 8) | buf[pos + 5])


def decrement_hop_limit(buf: bytearray | memoryview, pos: int = 0) -> bool:
    """Hop limit - 1 for the IPv6 header at buf[pos:]; False if it would reach 0 (the
    packet must be dropped; the buffer is then left as it was). No checksum to patch."""
    hops = buf[pos + 7]
    if hops <= 1:
        return False
    buf[pos + 7] = hops - 1
    return True


def not_forwarded(dst: int) -> bool:
    """Destinations a router does not forward from flannel0: multicast (ff00::/8) and
    link-local (fe80::/10); the TUN sees the kernel's own ND and MLD chatter for them."""
    return dst >> 120 == 0xFF or dst >> 118 == 0xFE80 >> 6


def _special_source(a: bytes | bytearray | memoryview) -> bool:
    """The unspecified address (::) or a multicast one (ff00::/8)."""
    return a[0] == 0xFF or not any(a)


def is_error_or_unknown(offender: bytes | bytearray | memoryview) -> bool:
    """True when the offender must not get an ICMPv6 error by its content: an ICMPv6
    error (types 0-127) or an ICMPv6 message too short to show its type, found after the
    extension headers; a non-first fragment (its upper layer cannot be seen) counts too,
    as for IPv4. The offender has a valid header."""
    end = total_length(offender)
    nxt, pos = offender[6], IPV6_HEADER
    while nxt in EXT_HEADERS or nxt == EXT_FRAGMENT:
        if pos + 8 > end:
            return True
        if nxt == EXT_FRAGMENT:
            if ((offender[pos + 2] << 8) | offender[pos + 3]) & 0xFFF8:
                return True  # not the first fragment
            size = 8
        else:
            size = (offender[pos + 1] + 1) * 8
        nxt, pos = offender[pos], pos + size
    if nxt != NEXT_ICMPV6:
        return False
    return pos >= end or offender[pos] < 128


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes | bytearray) -> int:
    """The ICMPv6 checksum of `message` (its checksum field zero) from src to dst: the
    Internet checksum over the pseudo header (addresses, upper-layer length, next header
    58) and the message."""
    pseudo = src + dst + struct.pack("!IxxxB", len(message), NEXT_ICMPV6)
    return checksum(pseudo + bytes(message))


def icmpv6_error(offender: bytes | bytearray | memoryview, icmp_type: int, code: int,
                 src: bytes) -> bytes:
    """An ICMPv6 error of `icmp_type`/`code` from `src` to the offender's source, quoting
    as much of the offender as fits in 1280 bytes (RFC 4443 2.4(c))."""
    quote = bytes(offender[: min(total_length(offender), len(offender),
                                 IPV6_MIN_MTU - IPV6_HEADER - 8)])
    dst = bytes(offender[8:24])
    icmp = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quote)
    struct.pack_into("!H", icmp, 2, icmpv6_checksum(src, dst, icmp))
    header = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), NEXT_ICMPV6, HOP_LIMIT,
                         src, dst)
    return header + bytes(icmp)


def _answerable(offender: bytes | bytearray | memoryview) -> bool:
    return (valid_header(offender, len(offender)) and not _special_source(offender[8:24])
            and offender[24] != 0xFF and not is_error_or_unknown(offender))


def time_exceeded(offender: bytes | bytearray | memoryview, src: bytes) -> bytes | None:
    """ICMPv6 time exceeded (hop limit exceeded in transit) from `src` (flannel0's v6
    address) for `offender`, whose hop limit ran out here; None when a router must not
    answer (RFC 4443 2.4(e): an ICMPv6 error, from :: or multicast, to multicast)."""
    if not _answerable(offender):
        return None
    return icmpv6_error(offender, ICMPV6_TIME_EXCEEDED, ICMPV6_HOP_LIMIT, src)


def no_route(offender: bytes | bytearray | memoryview, src: bytes | None = None) -> bytes | None:
    """ICMPv6 destination unreachable, no route to destination (type 1, code 0), for
    `offender`; from `src`, by default from the unreachable destination itself (as the
    IPv4 net unreachable: packet.net_unreachable says why). None when no answer may go."""
    if not _answerable(offender):
        return None
    return icmpv6_error(offender, ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE,
                        bytes(offender[24:40]) if src is None else src)


def fold(addr: int) -> int:
    """A 128-bit address folded to 32 bits (xor of its four words), for the rate-limit
    bucket of a v6 destination: packet.icmp_bucket(fold(addr)), as the C datapath does."""
    return (addr ^ (addr >> 32) ^ (addr >> 64) ^ (addr >> 96)) & 0xFFFFFFFF


def icmp_bucket6(dst: int) -> int:
    """The rate-limit bucket of a v6 destination (an integer)."""
    return ((fold(dst) * 2654435769) & 0xFFFFFFFF) >> (32 - ICMP_BUCKET_BITS)
