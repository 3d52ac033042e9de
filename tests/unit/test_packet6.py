"""Unit tests for backends.udp.packet6: the IPv6 router rules of the udp datapaths (hop
limit, ICMPv6 time exceeded and no route with their checksums, when not to answer, the
destinations not forwarded, the rate-limit bucket). Packets come from tests/unit/packets6.py,
whose checksum is not tweed's."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from backends.udp import packet6
from backends.udp.packet import icmp_bucket
from tests.unit.packets6 import a6, icmp6, ip6_packet, parse_icmp6, sized6

OWN6 = a6("fd00:5:1::")
SRC, DST = "fd00:5:1::10", "fd00:5:2::7"


def test_valid_header_and_total_length():
    p = sized6(SRC, DST, 100)
    assert packet6.valid_header(p, 100)
    assert packet6.total_length(p) == 100
    assert not packet6.valid_header(p, 99)  # payload length beyond what was read
    assert not packet6.valid_header(p[:39], 39)
    assert not packet6.valid_header(b"\x45" + p[1:], 100)  # a v4 nibble


def test_hop_limit_decrement():
    p = bytearray(sized6(SRC, DST, 80, hops=2))
    assert packet6.decrement_hop_limit(p)
    assert p[7] == 1 and bytes(p[:7]) == sized6(SRC, DST, 80)[:7]
    assert not packet6.decrement_hop_limit(p)
    assert p[7] == 1  # left as it was
    q = bytearray(b"xx" + sized6(SRC, DST, 80, hops=0))
    assert not packet6.decrement_hop_limit(q, 2)


@pytest.mark.parametrize("dst,dropped", [
    ("ff02::1", True), ("ff02::1:ff00:7", True), ("ff05::2", True), ("fe80::1", True),
    ("febf:ffff::1", True), ("fec0::1", False), ("fd00:5:2::7", False), ("2001:db8::1", False),
    ("::1", False),
])
def test_not_forwarded(dst, dropped):
    assert packet6.not_forwarded(int(ipaddress.IPv6Address(dst))) is dropped


def check_error(reply: bytes, offender: bytes, kind: int, code: int, src: bytes) -> None:
    r = parse_icmp6(reply)
    assert (r.type, r.code, r.nxt, r.hops) == (kind, code, 58, 64)
    assert r.checksum_ok and r.length_ok
    assert r.src == src and r.dst == offender[8:24]
    assert r.rest == bytes(4)
    assert r.quote == offender[:1232]
    assert len(reply) <= 1280


@pytest.mark.parametrize("size", [40, 41, 200, 1280, 1500, 9000])
def test_time_exceeded_quotes_as_much_as_fits_in_1280(size):
    off = sized6(SRC, DST, size, hops=1)
    reply = packet6.time_exceeded(off, OWN6)
    assert reply is not None
    check_error(reply, off, 3, 0, OWN6)
    assert len(reply) == min(48 + size, 1280)


def test_no_route_from_the_destination_by_default():
    off = sized6(SRC, "fd00:9::1", 300)
    reply = packet6.no_route(off)
    assert reply is not None
    check_error(reply, off, 1, 0, a6("fd00:9::1"))
    reply = packet6.no_route(off, OWN6)
    assert reply is not None and parse_icmp6(reply).src == OWN6


def test_checksum_known_value():
    # An echo request ::1 -> ::1, checksummed by hand-independent code (packets6).
    pkt = icmp6("::1", "::1", 128, 0, struct.pack("!HH", 7, 1) + b"abc")
    msg = bytearray(pkt[40:])
    want = struct.unpack("!H", msg[2:4])[0]
    msg[2:4] = b"\0\0"
    assert packet6.icmpv6_checksum(a6("::1"), a6("::1"), msg) == want


@pytest.mark.parametrize("offender", [
    icmp6(SRC, DST, 1, 0, bytes(4) + bytes(48), hops=1),    # destination unreachable
    icmp6(SRC, DST, 3, 0, bytes(4) + bytes(48), hops=1),    # time exceeded
    icmp6(SRC, DST, 2, 0, bytes(4) + bytes(48), hops=1),    # packet too big
    icmp6(SRC, DST, 4, 0, bytes(4) + bytes(48), hops=1),    # parameter problem
    icmp6(SRC, DST, 100, 0, bytes(4), hops=1),              # private experimentation (error range)
    ip6_packet(SRC, DST, b"", nxt=58, hops=1),              # ICMPv6 without a type
    sized6("::", DST, 80, hops=1),                          # from the unspecified address
    sized6("ff02::1", DST, 80, hops=1),                     # from multicast
    sized6(SRC, "ff0e::1", 80, hops=1),                     # to multicast
    # an ICMPv6 error behind a hop-by-hop and a destination options header
    ip6_packet(SRC, DST, bytes([60, 0]) + bytes(6) + bytes([58, 1]) + bytes(14)
               + bytes([1, 0, 0, 0]) + bytes(4), nxt=0, hops=1),
    # a fragment that is not the first
    ip6_packet(SRC, DST, bytes([17, 0, 0x05, 0x01]) + bytes(4) + bytes(40), nxt=44, hops=1),
], ids=["unreach", "time-exceeded", "too-big", "param-problem", "type-100", "icmp-empty",
        "from-unspecified", "from-multicast", "to-multicast", "error-behind-ext-headers",
        "later-fragment"])
def test_no_error_answers(offender):
    assert packet6.time_exceeded(offender, OWN6) is None
    assert packet6.no_route(offender) is None


@pytest.mark.parametrize("offender", [
    icmp6(SRC, DST, 128, 0, struct.pack("!HH", 1, 1) + b"ping", hops=1),  # echo request
    icmp6(SRC, DST, 129, 0, struct.pack("!HH", 1, 1) + b"pong", hops=1),  # echo reply
    ip6_packet(SRC, DST, bytes([6, 0]) + bytes(6) + bytes(20), nxt=0, hops=1),  # TCP behind hbh
    ip6_packet(SRC, DST, bytes([17, 0, 0, 1]) + bytes(4) + bytes(40), nxt=44, hops=1),  # frag 0
])
def test_queries_and_first_fragments_are_answered(offender):
    reply = packet6.time_exceeded(offender, OWN6)
    assert reply is not None
    check_error(reply, offender, 3, 0, OWN6)


def test_invalid_offender_gets_nothing():
    p = sized6(SRC, DST, 100, hops=1)
    assert packet6.time_exceeded(p[:60], OWN6) is None  # payload length says 60 more
    assert packet6.time_exceeded(b"\x45" + p[1:], OWN6) is None


def test_bucket_is_the_v4_bucket_of_the_folded_address():
    addr = int(ipaddress.IPv6Address("fd00:5:1::10"))
    assert packet6.fold(addr) == (0xFD000005 ^ 0x00010000 ^ 0 ^ 0x10)
    assert packet6.icmp_bucket6(addr) == icmp_bucket(packet6.fold(addr))
    buckets = {packet6.icmp_bucket6(addr + i) for i in range(256)}
    assert len(buckets) > 32  # neighbouring hosts spread over the buckets
