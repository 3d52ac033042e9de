"""IPv4 packet surgery for the udp backend: header checks, TTL decrement, ICMP replies
(net unreachable, time exceeded) and the token buckets that rate-limit them.

Pure logic, no I/O, working in place on bytearrays so the data path copies nothing.
The TTL decrement patches the header checksum incrementally (RFC 1624, eqn. 3), as a
router does, instead of summing the header again. The C datapath (_fastpath.c) has a twin
of each; the datapath suite holds them to the same behaviour.
"""

from __future__ import annotations

import struct

IPV4_MIN_HEADER = 20
PROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_TIME_EXCEEDED = 11
ICMP_EXC_TTL = 0
#: ICMP types that are errors (RFC 1122 3.2.2: never answered with an error); like the
#: kernel (icmp_send), types above 18 are not answered either.
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
ICMP_MAX_TYPE = 18

#: The kernel's defaults for ICMP errors to one destination (net.ipv4.icmp_ratelimit, in
#: ms, and XRLIM_BURST_FACTOR): one per second, after a burst of six.
ICMP_RATELIMIT_MS = 1000
ICMP_BURST = 6
#: Destinations share this many buckets (by a hash of the address), so memory is fixed
#: and all destinations together get at most ICMP_BUCKETS errors per interval.
ICMP_BUCKET_BITS = 6
ICMP_BUCKETS = 1 << ICMP_BUCKET_BITS


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def valid_header(buf: bytes | bytearray | memoryview, length: int) -> bool:
    """An IPv4 header that is complete and consistent with a datagram of `length` bytes."""
    if length < IPV4_MIN_HEADER or buf[0] >> 4 != 4:
        return False
    ihl = (buf[0] & 0x0F) * 4
    total = (buf[2] << 8) | buf[3]
    return IPV4_MIN_HEADER <= ihl <= total <= length


def decrement_ttl(buf: bytearray | memoryview, pos: int = 0) -> bool:
    """Decrement the TTL of the IPv4 header at buf[pos:] and patch its checksum in place;
    False if the TTL would reach 0 (the packet must be dropped; the buffer is then left as
    it was). Both datapaths' hot paths call this (the C one has its twin in _fastpath.c):
    `pos` lets the caller patch a packet inside a larger buffer without slicing it."""
    ttl = buf[pos + 8]
    if ttl <= 1:
        return False
    buf[pos + 8] = ttl - 1
    # The 16-bit word holding TTL (high byte) and protocol went down by 0x0100, so the
    # one's complement checksum goes up by 0x0100, with end-around carry (RFC 1141), and
    # the one case where that differs from RFC 1624's eqn. 3 (a result of 0xFFFF) is fixed.
    csum = ((buf[pos + 10] << 8) | buf[pos + 11]) + 0x0100
    csum = (csum & 0xFFFF) + (csum >> 16)
    if csum == 0xFFFF:
        # RFC 1624: a computed checksum is never 0xFFFF (that is "-0"); eqn. 3 gives 0.
        csum = 0
    buf[pos + 10] = csum >> 8
    buf[pos + 11] = csum & 0xFF
    return True


def is_first_fragment(buf: bytes | bytearray | memoryview) -> bool:
    """True unless the packet is a fragment with a non-zero offset."""
    return ((buf[6] & 0x1F) << 8 | buf[7]) == 0


def icmp_error(offender: bytes | bytearray | memoryview, icmp_type: int, code: int,
               src: bytes) -> bytes:
    """An ICMP error of `icmp_type`/`code` from `src` to the offender's source, quoting
    the offender's header and 8 bytes of its payload (RFC 792); the offender must have a
    valid header (valid_header)."""
    ihl = (offender[0] & 0x0F) * 4
    quote = bytes(offender[: ihl + 8])
    icmp = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quote)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    total = IPV4_MIN_HEADER + len(icmp)
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, PROTO_ICMP, 0, src,
                    bytes(offender[12:16]))
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header + icmp)


def _special(a: bytes | bytearray | memoryview) -> bool:
    """0.0.0.0, multicast (224/4) or above, i.e. also the limited broadcast."""
    return a[0] >= 224 or bytes(a) == b"\0\0\0\0"


def time_exceeded(offender: bytes | bytearray | memoryview, src: bytes) -> bytes | None:
    """An ICMP time exceeded (TTL exceeded in transit) from `src` (flannel0's address,
    as a router answers from its own) for `offender`, whose TTL ran out here.

    None when a router must not answer (RFC 1812 4.3.2.7, as the kernel's icmp_send): the
    offender is not a valid IPv4 header, a non-first fragment, an ICMP error (or an ICMP
    type it does not know), or from or to 0.0.0.0, a multicast or broadcast address.
    """
    if not valid_header(offender, len(offender)) or not is_first_fragment(offender):
        return None
    if _special(offender[12:16]) or _special(offender[16:20]):
        return None
    if offender[9] == PROTO_ICMP:
        ihl = (offender[0] & 0x0F) * 4
        total = (offender[2] << 8) | offender[3]
        if total <= ihl:
            return None
        kind = offender[ihl]
        if kind > ICMP_MAX_TYPE or kind in ICMP_ERROR_TYPES:
            return None
    return icmp_error(offender, ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, src)


def icmp_bucket(dst: int) -> int:
    """The rate-limit bucket of a destination (an IPv4 address as an integer): the top
    bits of a Fibonacci hash, as the C datapath computes it."""
    return ((dst * 2654435769) & 0xFFFFFFFF) >> (32 - ICMP_BUCKET_BITS)


class IcmpLimiter:
    """Token buckets for the ICMP errors a datapath sends, like the kernel's per
    destination limit (inet_peer_xrlim_allow): each error costs `interval_ms` of tokens,
    tokens grow with time up to ICMP_BURST errors' worth, a bucket starts full. An
    interval of 0 turns the limit off (as net.ipv4.icmp_ratelimit=0 does)."""

    def __init__(self, interval_ms: int = ICMP_RATELIMIT_MS) -> None:
        self.interval = interval_ms
        self.tokens = [0] * ICMP_BUCKETS
        self.last: list[int | None] = [None] * ICMP_BUCKETS

    def allow(self, dst: int, now_ms: int) -> bool:
        """May an error go to `dst` at `now_ms` (a monotonic clock, in ms)?"""
        if self.interval <= 0:
            return True
        i = icmp_bucket(dst)
        cap = ICMP_BURST * self.interval
        last = self.last[i]
        tokens = cap if last is None else min(cap, self.tokens[i] + (now_ms - last))
        self.last[i] = now_ms
        if tokens >= self.interval:
            self.tokens[i] = tokens - self.interval
            return True
        self.tokens[i] = tokens
        return False


def net_unreachable(
    offender: bytes | bytearray | memoryview, src: bytes | None = None
) -> bytes | None:
    """An ICMP destination-unreachable (net unreachable) answering `offender`, from `src`
    (default: the unreachable destination itself. flanneld uses flannel0's own address,
    which the kernel drops as a martian when it comes back in through the TUN, so its
    replies never reach the sender: docs/interop.md, where tweed differs).

    None when no answer may be sent: the offender is ICMP, a non-first fragment, or
    not a valid IPv4 header.
    """
    if not valid_header(offender, len(offender)):
        return None
    if offender[9] == PROTO_ICMP or not is_first_fragment(offender):
        return None
    return icmp_error(offender, ICMP_DEST_UNREACH, ICMP_NET_UNREACH,
                      bytes(offender[16:20]) if src is None else src)
