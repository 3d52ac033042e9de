"""IPv4 packet surgery for the udp backend: header checks, TTL decrement, ICMP replies.

Pure logic, no I/O, working in place on bytearrays so the data path copies nothing.
The TTL decrement patches the header checksum incrementally (RFC 1624, eqn. 3), as a
router does, instead of summing the header again.
"""

from __future__ import annotations

import struct

IPV4_MIN_HEADER = 20
PROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0


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
    ihl = (offender[0] & 0x0F) * 4
    quote = bytes(offender[: ihl + 8])  # the header and 8 bytes of payload (RFC 792)
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quote)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    total = IPV4_MIN_HEADER + len(icmp)
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, PROTO_ICMP, 0,
                    bytes(offender[16:20]) if src is None else src, bytes(offender[12:16]))
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header + icmp)
