"""IPv6 packets for the udp datapath's v6 tests, built and taken apart with struct; the
checksum is tests/support/packets.py's (nothing here imports backends/), so a mistake
shared by the code under test and its inputs cannot hide."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tests.support.packets import ones_sum

NEXT_TCP, NEXT_UDP, NEXT_ICMPV6 = 6, 17, 58


def a6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def pseudo6(src: bytes, dst: bytes, nxt: int, length: int) -> bytes:
    """The IPv6 pseudo header (RFC 8200 8.1)."""
    return src + dst + struct.pack("!IxxxB", length, nxt)


def ip6_packet(src: str, dst: str, payload: bytes = b"q" * 40, *, nxt: int = NEXT_UDP,
               hops: int = 64, flow: int = 0x12345, tc: int = 0) -> bytes:
    head = struct.pack("!IHBB16s16s", 6 << 28 | tc << 20 | flow, len(payload), nxt, hops,
                       a6(src), a6(dst))
    return head + payload


def sized6(src: str, dst: str, size: int, *, hops: int = 64, nxt: int = NEXT_UDP,
           fill: int = 0x61) -> bytes:
    return ip6_packet(src, dst, bytes([fill]) * (size - 40), nxt=nxt, hops=hops)


def icmp6(src: str, dst: str, kind: int, code: int = 0, body: bytes = b"\0" * 4 + b"data",
          *, hops: int = 64) -> bytes:
    """An ICMPv6 message with a correct checksum in an IPv6 packet."""
    msg = bytearray(struct.pack("!BBH", kind, code, 0) + body)
    struct.pack_into("!H", msg, 2, ~ones_sum(pseudo6(a6(src), a6(dst), NEXT_ICMPV6,
                                                     len(msg)) + msg) & 0xFFFF)
    return ip6_packet(src, dst, bytes(msg), nxt=NEXT_ICMPV6, hops=hops)


def hopped6(pkt: bytes) -> bytes:
    """One hop on: the hop limit one less, nothing else changed."""
    p = bytearray(pkt)
    p[7] -= 1
    return bytes(p)


@dataclass(frozen=True)
class Icmp6Reply:
    src: bytes
    dst: bytes
    hops: int
    nxt: int
    type: int
    code: int
    checksum_ok: bool
    length_ok: bool
    rest: bytes
    quote: bytes


def parse_icmp6(pkt: bytes) -> Icmp6Reply:
    vtf, plen, nxt, hops, src, dst = struct.unpack_from("!IHBB16s16s", pkt)
    assert vtf >> 28 == 6
    msg = pkt[40:]
    ok = ones_sum(pseudo6(src, dst, NEXT_ICMPV6, len(msg)) + msg) == 0xFFFF
    return Icmp6Reply(src, dst, hops, nxt, msg[0], msg[1], ok, plen == len(msg), msg[4:8],
                      msg[8:])
