"""The pure hooks of the C datapath, `_fastpath.segment` (TUN TSO super-packet -> wire
packets) and `_fastpath.coalesce` (wire packets -> TUN writes), against an independent
reference: the packet builders, parsers and Internet checksum of tests/support/packets.py
(struct only, nothing from backends/) and the segmentation written here. Nothing is shared
with backends/udp/packet.py or the C code, so a mistake common to both cannot hide."""

from __future__ import annotations

import random
import struct

import pytest

# make setup builds the extension; without it this import fails loudly, never skips.
from backends.udp import _fastpath
from tests.support.packets import (
    ACK,
    CWR,
    ECE,
    FIN,
    MASK32,
    PSH,
    RST,
    SYN,
    URG,
    inet_checksum,
    ip_header_ok,
    l4_checksum_ok,
    ones_sum,
    parse_ip,
    parse_tcp,
    pseudo_header,
    tcp_packet,
    udp_packet,
)

VNET = struct.Struct("=BBHHHH")  # struct virtio_net_hdr, host byte order
ZERO_VNET = bytes(10)
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
MERGE_SEGS, MERGE_BYTES = 64, 65000

# The builders' default addresses (10.5.1.2 -> 10.5.2.9), as bytes, and another source.
SRC, DST = bytes([10, 5, 1, 2]), bytes([10, 5, 2, 9])
OTHER = bytes([10, 5, 1, 3])

# TCP options (multiples of 4 bytes).
TS_OPTS = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x01020304, 0xA0B0C0D0)  # 12
SYN_OPTS = b"\x02\x04\x05\xb4\x01\x03\x03\x07\x04\x02\x00\x00"  # MSS NOP WS SACKOK EOL EOL
MAX_OPTS = (TS_OPTS + b"\x01\x01\x05\x1a"  # 40: NOP NOP TS, NOP NOP SACK with 3 blocks
            + struct.pack("!6I", 1, 2, 3, 4, 0xFFFFFFF0, 0xFFFFFFFF))
TCP_OPTS = {"none": b"", "ts": TS_OPTS, "mss_ws_sack": SYN_OPTS, "max": MAX_OPTS}
# IP options: NOP NOP NOP EOL (ihl 6); record route filling the header (ihl 15).
IP_OPTS = {"none": b"", "pad": b"\x01\x01\x01\x00",
           "max": b"\x07\x27\x04" + bytes(36) + b"\x00"}
assert len(MAX_OPTS) == 40 and len(IP_OPTS["max"]) == 40


def ref_segment(pkt: bytes, gso: int) -> list[bytes]:
    """What a TSO super-packet must become on the wire (Linux tcp_gso_segment)."""
    ip, tcp, payload = parse_tcp(pkt)
    n = -(-len(payload) // gso)
    out = []
    for k in range(n):
        data = payload[k * gso:(k + 1) * gso]
        iph = bytearray(ip.header)
        struct.pack_into("!HHHBBH", iph, 2, ip.ihl + tcp.thl + len(data),
                         (ip.ident + k) & 0xFFFF, struct.unpack_from("!H", iph, 6)[0],
                         ip.ttl, ip.proto, 0)
        struct.pack_into("!H", iph, 10, inet_checksum(bytes(iph)))
        th = bytearray(tcp.header)
        struct.pack_into("!I", th, 4, (tcp.seq + k * gso) & MASK32)
        f = tcp.flags
        if k < n - 1:
            f &= ~(FIN | PSH)
        if k > 0:
            f &= ~CWR
        th[13] = f
        struct.pack_into("!H", th, 16, 0)
        pseudo = pseudo_header(ip.src, ip.dst, 6, len(th) + len(data))
        struct.pack_into("!H", th, 16, inet_checksum(pseudo + th + data))
        out.append(bytes(iph + th + data))
    return out


def vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def tso_vnet(pkt: bytes, gso: int, gso_type: int = GSO_TCPV4) -> bytes:
    ip, tcp, _ = parse_tcp(pkt)
    return vnet(NEEDS_CSUM, gso_type, ip.ihl + tcp.thl, gso, ip.ihl, 16)


def payload_of(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# ---- segment: TCP super-packets -------------------------------------------------------

def check_segments(sup: bytes, gso: int, segs: list[bytes]) -> None:
    """Every field of every segment, by the reference parser and checksum."""
    ip0, tcp0, payload0 = parse_tcp(sup)
    n = -(-len(payload0) // gso)
    hl = ip0.ihl + tcp0.thl
    assert len(segs) == n
    payloads = []
    for k, s in enumerate(segs):
        ip, tcp, data = parse_tcp(s)
        assert (ip.version, ip.ihl, ip.options) == (4, ip0.ihl, ip0.options)
        assert ip.total == len(s) == hl + len(data)
        assert ip.ident == (ip0.ident + k) & 0xFFFF
        assert ip_header_ok(s), f"segment {k}: bad IP header checksum"
        assert (ip.tos, ip.df, ip.mf, ip.frag, ip.reserved_bit, ip.ttl, ip.proto) == (
            ip0.tos, ip0.df, ip0.mf, ip0.frag, ip0.reserved_bit, ip0.ttl, 6)
        assert (ip.src, ip.dst) == (ip0.src, ip0.dst)
        assert (tcp.sport, tcp.dport, tcp.ack, tcp.window, tcp.urg) == (
            tcp0.sport, tcp0.dport, tcp0.ack, tcp0.window, tcp0.urg)
        assert (tcp.thl, tcp.low_nibble, tcp.options) == (tcp0.thl, tcp0.low_nibble,
                                                          tcp0.options)
        assert tcp.seq == (tcp0.seq + k * gso) & MASK32
        want = tcp0.flags
        if k < n - 1:
            want &= ~(FIN | PSH)
        if k > 0:
            want &= ~CWR
        assert tcp.flags == want, f"segment {k}/{n}: flags {tcp.flags:#x} != {want:#x}"
        assert l4_checksum_ok(s), f"segment {k}: bad TCP checksum"
        assert data == payload0[k * gso:(k + 1) * gso]
        payloads.append(data)
    assert b"".join(payloads) == payload0
    assert len(segs[-1]) == hl + len(payload0) - (n - 1) * gso
    assert all(len(s) == hl + gso for s in segs[:-1])
    assert segs == ref_segment(sup, gso)


GSO_SIZES = (536, 1000, 1380, 1448)
SIZES = {
    "1": lambda g: 1,
    "gso-1": lambda g: g - 1,
    "gso": lambda g: g,
    "gso+1": lambda g: g + 1,
    "3gso": lambda g: 3 * g,
    "7gso+13": lambda g: 7 * g + 13,
    "64000": lambda g: 64000,
    "max": lambda g: 65535 - 20 - 32,  # the largest IPv4 packet
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gso", GSO_SIZES)
def test_segment_sizes(gso: int, size: str) -> None:
    rng = random.Random(f"{gso}/{size}")
    payload = payload_of(rng, SIZES[size](gso))
    sup = tcp_packet(payload, seq=rng.getrandbits(32), ident=rng.getrandbits(16),
                     flags=ACK | PSH, tcp_opts=TS_OPTS, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, gso), sup)
    check_segments(sup, gso, segs)
    assert len(segs) == -(-len(payload) // gso)


FLAG_CASES = {
    "ack": (ACK, GSO_TCPV4),
    "ack_psh": (ACK | PSH, GSO_TCPV4),
    "ack_psh_fin": (ACK | PSH | FIN, GSO_TCPV4),
    "ack_cwr_ece_ecn": (ACK | CWR | ECE, GSO_TCPV4 | GSO_ECN),
    "ack_ece": (ACK | ECE, GSO_TCPV4),
    "ack_urg_psh": (ACK | URG | PSH, GSO_TCPV4),
}


@pytest.mark.parametrize("flag_case", FLAG_CASES)
@pytest.mark.parametrize("ip_opts", IP_OPTS)
@pytest.mark.parametrize("tcp_opts", TCP_OPTS)
def test_segment_headers(tcp_opts: str, ip_opts: str, flag_case: str) -> None:
    flags, gso_type = FLAG_CASES[flag_case]
    rng = random.Random(f"{tcp_opts}/{ip_opts}/{flag_case}")
    gso = 1448 - len(TCP_OPTS[tcp_opts])
    payload = payload_of(rng, 3 * gso + rng.randrange(1, gso))
    sup = tcp_packet(payload, flags=flags, tcp_opts=TCP_OPTS[tcp_opts],
                     ip_opts=IP_OPTS[ip_opts], urg=100 if flags & URG else 0,
                     tos=0x02 if gso_type & GSO_ECN else 0, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, gso, gso_type), sup)
    check_segments(sup, gso, segs)
    # The explicit flag rules, on top of check_segments' formula.
    got = [parse_tcp(s)[1].flags for s in segs]
    assert all(f & ACK for f in got)
    assert [bool(f & PSH) for f in got] == [False] * 3 + [bool(flags & PSH)]
    assert [bool(f & FIN) for f in got] == [False] * 3 + [bool(flags & FIN)]
    assert [bool(f & CWR) for f in got] == [bool(flags & CWR)] + [False] * 3
    assert all(bool(f & ECE) == bool(flags & ECE) for f in got)


@pytest.mark.parametrize(("ident", "seq", "nsegs"), [
    (0xFFFF, 1, 3),
    (0xFFFE, 2**32 - 1, 5),
    (0xFFF0, 2**32 - 1448, 40),
    (0, 2**32 - 2 * 1448 - 7, 4),
    (0x8000, 2**31, 2),
])
def test_segment_wraps_id_and_seq(ident: int, seq: int, nsegs: int) -> None:
    rng = random.Random(ident ^ seq)
    payload = payload_of(rng, (nsegs - 1) * 1448 + 700)
    sup = tcp_packet(payload, seq=seq, ident=ident, flags=ACK | PSH, tcp_opts=TS_OPTS,
                     df=False, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, 1448), sup)
    check_segments(sup, 1448, segs)
    got = [(parse_ip(s).ident, parse_tcp(s)[1].seq) for s in segs]
    assert got == [((ident + k) % 65536, (seq + k * 1448) % 2**32) for k in range(nsegs)]


@pytest.mark.parametrize("seed", range(40))
def test_segment_random(seed: int) -> None:
    rng = random.Random(seed)
    gso = rng.choice((*GSO_SIZES, 1, 7, 100, 9000, 65000))
    tcp_opts = rng.choice(list(TCP_OPTS.values()))
    ip_opts = rng.choice(list(IP_OPTS.values()))
    hl = 40 + len(tcp_opts) + len(ip_opts)
    most = min(65535 - hl, gso * 1024)
    payload = payload_of(rng, min(most, rng.choice((rng.randrange(1, most + 1),
                                                    rng.randrange(1, 3000)))))
    flags = ACK | rng.choice((0, PSH, PSH | FIN, CWR, ECE, CWR | ECE, URG | PSH))
    sup = tcp_packet(payload, seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                     ident=rng.getrandbits(16), window=rng.getrandbits(16), flags=flags,
                     tos=rng.getrandbits(8), ttl=rng.randrange(1, 256),
                     df=rng.random() < 0.7, tcp_opts=tcp_opts, ip_opts=ip_opts,
                     urg=rng.getrandbits(16) if flags & URG else 0,
                     low_nibble=rng.choice((0, 1)),
                     tcp_csum=rng.choice(("pseudo", "valid", rng.getrandbits(16))),
                     ip_csum=rng.choice(("valid", rng.getrandbits(16))))
    gso_type = GSO_TCPV4 | (GSO_ECN if flags & CWR else 0)
    check_segments(sup, gso, _fastpath.segment(tso_vnet(sup, gso, gso_type), sup))


def test_segment_exactly_1024_segments_is_the_limit() -> None:
    payload = payload_of(random.Random(5), 1024 * 10)
    sup = tcp_packet(payload, tcp_csum="pseudo")
    check_segments(sup, 10, _fastpath.segment(tso_vnet(sup, 10), sup))
    longer = tcp_packet(payload + b"x", tcp_csum="pseudo")
    with pytest.raises(ValueError):
        _fastpath.segment(tso_vnet(longer, 10), longer)


# ---- segment: plain packets, checksum completion -----------------------------------

def partial_tcp(payload: bytes, ip_opts: bytes = b"") -> bytes:
    return tcp_packet(payload, flags=ACK | PSH, tcp_opts=TS_OPTS, ip_opts=ip_opts,
                      tcp_csum="pseudo")


def partial_udp(payload: bytes, ip_opts: bytes = b"") -> bytes:
    pseudo = ones_sum(pseudo_header(SRC, DST, 17, 8 + len(payload)))
    return udp_packet(payload, csum=pseudo, ip_opts=ip_opts)


@pytest.mark.parametrize("ip_opts", ["none", "pad"])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 99, 1400, 1401, 8000, 65000])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_segment_completes_a_partial_checksum(proto: str, length: int, ip_opts: str) -> None:
    rng = random.Random(f"{proto}/{length}/{ip_opts}")
    opts = IP_OPTS[ip_opts]
    if proto == "tcp":
        pkt, offset = partial_tcp(payload_of(rng, length), opts), 16
    else:
        pkt, offset = partial_udp(payload_of(rng, length), opts), 6
    start = 20 + len(opts)
    out = _fastpath.segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, start, offset), pkt)
    assert len(out) == 1
    got = out[0]
    at = start + offset
    assert len(got) == len(pkt)
    assert got[:at] == pkt[:at] and got[at + 2:] == pkt[at + 2:]
    assert l4_checksum_ok(got)
    zeroed = pkt[:at] + b"\0\0" + pkt[at + 2:]
    want = inet_checksum(pseudo_header(SRC, DST, 6 if proto == "tcp" else 17,
                                       len(pkt) - start) + zeroed[start:])
    field = struct.unpack_from("!H", got, at)[0]
    if want == 0:  # (not with these seeds: see the test of that case below)
        assert field == 0xFFFF or (proto == "tcp" and field == 0)
    else:
        assert field == want


def test_segment_completion_at_the_very_end_of_the_packet() -> None:
    # csum_start + csum_offset + 2 == len is the last place the field may be.
    pkt = bytes(range(20, 40)) + b"\x12\x34\x56\x78\xab\xcd"
    pkt = b"\x45" + pkt[1:]
    out = _fastpath.segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 4), pkt)
    assert len(out) == 1 and out[0][:24] == pkt[:24]
    # The field held the start value 0xabcd: the sum with it, over the region, verifies.
    region = out[0][20:24] + out[0][24:26]
    assert ones_sum(b"\xab\xcd" + region) == 0xFFFF


# A UDP checksum that computes to 0 must be sent as 0xFFFF (RFC 768; Linux
# skb_checksum_help writes CSUM_MANGLED_0): 0 means "no checksum" and the receiver would
# skip verification. (This test found that bug; fixed in 45ebfcf.)
def test_segment_udp_checksum_that_computes_to_zero_is_sent_as_ffff() -> None:
    payload = bytearray(payload_of(random.Random(9), 100))
    payload[-2:] = b"\0\0"
    base = partial_udp(bytes(payload))
    s = ones_sum(pseudo_header(SRC, DST, 17, 108) + base[20:26] + b"\0\0" + base[28:])
    payload[-2:] = struct.pack("!H", 0xFFFF - s)  # now the whole sum is 0xFFFF
    pkt = partial_udp(bytes(payload))
    assert inet_checksum(pseudo_header(SRC, DST, 17, 108) + pkt[20:26] + b"\0\0"
                         + pkt[28:]) == 0
    out = _fastpath.segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6), pkt)
    assert struct.unpack_from("!H", out[0], 26)[0] == 0xFFFF


@pytest.mark.parametrize("pkt", [
    tcp_packet(b"hello", tcp_csum=0xBEEF, ip_csum=0xDEAD),
    udp_packet(b"x" * 333, csum=0x1234),
    tcp_packet(bytes(3000), ip_opts=IP_OPTS["max"], tcp_opts=MAX_OPTS, tcp_csum="pseudo"),
    bytes([0x45]) + bytes(19),
], ids=["tcp", "udp", "big_tcp", "bare_header"])
def test_segment_without_flags_returns_the_packet_as_is(pkt: bytes) -> None:
    assert _fastpath.segment(ZERO_VNET, pkt) == [pkt]
    # DATA_VALID (2) alone asks for nothing either.
    assert _fastpath.segment(vnet(flags=2), pkt) == [pkt]


SUPER = tcp_packet(bytes(5000), tcp_opts=TS_OPTS, tcp_csum="pseudo")
PLAIN = tcp_packet(b"abc")

# ---- IPv6 (issue 14): TSO6 super-packets, cut against a reference written here ----------
V6_SRC, V6_DST = bytes.fromhex("fd000005000100000000000000000010"), bytes.fromhex(
    "fd000005000200000000000000000007")


def tcp6(payload: bytes, *, seq: int = 1000, flags: int = ACK | PSH, opts: bytes = b"",
         nxt_hdrs: bytes = b"", first_nxt: int = 6) -> bytes:
    """A TCP/IPv6 packet (checksum as a sender's stack leaves it: complete)."""
    thl = 20 + len(opts)
    th = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, thl // 4 << 4, flags,
                               512, 0, 0) + opts)
    seg = bytes(th) + payload
    pseudo = V6_SRC + V6_DST + struct.pack("!IxxxB", len(seg), 6)
    struct.pack_into("!H", th, 16, inet_checksum(pseudo + seg))
    body = nxt_hdrs + bytes(th) + payload
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), first_nxt, 64, V6_SRC,
                       V6_DST) + body


def ref_segment6(pkt: bytes, gso: int) -> list[bytes]:
    """What Linux's tcp_gso_segment makes of a TCP/IPv6 super-packet (no ext headers)."""
    thl = (pkt[52] >> 4) * 4
    payload = pkt[40 + thl:]
    seq = struct.unpack_from("!I", pkt, 44)[0]
    n = -(-len(payload) // gso)
    out = []
    for k in range(n):
        data = payload[k * gso:(k + 1) * gso]
        ip = bytearray(pkt[:40])
        struct.pack_into("!H", ip, 4, thl + len(data))
        th = bytearray(pkt[40:40 + thl])
        struct.pack_into("!I", th, 4, (seq + k * gso) & MASK32)
        f = th[13]
        if k < n - 1:
            f &= ~(FIN | PSH)
        if k > 0:
            f &= ~CWR
        th[13] = f
        struct.pack_into("!H", th, 16, 0)
        pseudo = V6_SRC + V6_DST + struct.pack("!IxxxB", thl + len(data), 6)
        struct.pack_into("!H", th, 16, inet_checksum(pseudo + th + data))
        out.append(bytes(ip + th + data))
    return out


PLAIN6 = tcp6(b"abc")
SUPER6 = tcp6(bytes(range(256)) * 20, flags=ACK | PSH | FIN | CWR)
SUPER6_EXT = tcp6(bytes(3000), nxt_hdrs=bytes([6, 0]) + bytes(6), first_nxt=0)


@pytest.mark.parametrize("gso", [1, 536, 1000, 1440, 5119, 5120, 6000])
@pytest.mark.parametrize("opts", ["none", "ts", "max"])
def test_segment_tso6(gso: int, opts: str) -> None:
    rng = random.Random(gso)
    pkt = tcp6(rng.randbytes(5120), seq=0xFFFFFF00, flags=ACK | PSH | FIN | CWR,
               opts=TCP_OPTS[opts])
    thl = 20 + len(TCP_OPTS[opts])
    if -(-5120 // gso) > 1024:
        with pytest.raises(ValueError, match="too many"):
            _fastpath.segment(vnet(NEEDS_CSUM, GSO_TCPV6, 40 + thl, gso, 40, 16), pkt)
        return
    got = _fastpath.segment(vnet(NEEDS_CSUM, GSO_TCPV6, 40 + thl, gso, 40, 16), pkt)
    assert got == ref_segment6(pkt, gso)
    for seg in got:  # each verifies on its own (the reference could share a mistake)
        body = seg[40:]
        assert struct.unpack_from("!H", seg, 4)[0] == len(body)
        assert ones_sum(V6_SRC + V6_DST + struct.pack("!IxxxB", len(body), 6) + body) == 0xFFFF


def test_segment_tso6_with_ecn_flag_and_a_plain_v6_packet() -> None:
    got = _fastpath.segment(vnet(NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 72, 1000, 40, 16), SUPER6)
    assert got == ref_segment6(SUPER6, 1000)
    assert _fastpath.segment(ZERO_VNET, PLAIN6) == [PLAIN6]


def test_segment_completes_a_partial_v6_checksum() -> None:
    # As the kernel hands it with TUN_F_CSUM: the pseudo-header sum in the field.
    pkt = bytearray(PLAIN6)
    seg_len = len(pkt) - 40
    partial = ones_sum(V6_SRC + V6_DST + struct.pack("!IxxxB", seg_len, 6))
    struct.pack_into("!H", pkt, 56, partial)
    (got,) = _fastpath.segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 16), bytes(pkt))
    assert got == PLAIN6


def with_byte(pkt: bytes, at: int, value: int) -> bytes:
    return pkt[:at] + bytes([value]) + pkt[at + 1:]


@pytest.mark.parametrize(("hdr", "pkt"), [
    pytest.param(ZERO_VNET[:9], PLAIN, id="vnet_9_bytes"),
    pytest.param(ZERO_VNET + b"\0", PLAIN, id="vnet_11_bytes"),
    pytest.param(ZERO_VNET, PLAIN[:19], id="shorter_than_ip_header"),
    pytest.param(ZERO_VNET, b"", id="empty"),
    pytest.param(ZERO_VNET, with_byte(PLAIN, 0, 0x55), id="version_5"),
    pytest.param(ZERO_VNET, PLAIN6[:39], id="ipv6_shorter_than_its_header"),
    pytest.param(vnet(1, GSO_TCPV4, 72, 1000, 40, 16), SUPER6, id="ipv6_gso_tcpv4"),
    pytest.param(vnet(1, GSO_TCPV6, 80, 1000, 48, 16), SUPER6_EXT, id="ipv6_tso_ext_header"),
    pytest.param(vnet(1, GSO_TCPV6, 72, 1000, 40, 16), SUPER6[:60], id="ipv6_tso_no_payload"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 39, 6), PLAIN6, id="ipv6_csum_in_header"),
    pytest.param(ZERO_VNET, bytes(70000), id="longer_than_64k"),
    pytest.param(vnet(0, GSO_TCPV6, 52, 1448, 20, 16), SUPER, id="gso_tcpv6"),
    pytest.param(vnet(0, GSO_UDP_L4, 52, 1448, 20, 6), SUPER, id="gso_udp_l4"),
    pytest.param(vnet(0, GSO_UDP, 52, 1448, 20, 6), SUPER, id="gso_ufo"),
    pytest.param(vnet(0, GSO_ECN, 52, 1448, 20, 16), SUPER, id="gso_ecn_alone"),
    pytest.param(vnet(0, GSO_TCPV6 | GSO_ECN, 52, 1448, 20, 16), SUPER, id="gso_tcpv6_ecn"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 0, 20, 16), SUPER, id="gso_size_0"),
    pytest.param(vnet(1, GSO_TCPV4, 28, 1448, 20, 6), udp_packet(bytes(5000)),
                 id="gso_tcp_on_udp"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), with_byte(SUPER, 0, 0x65),
                 id="gso_not_ipv4"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), with_byte(SUPER, 0, 0x44),
                 id="gso_ihl_below_5"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), with_byte(SUPER, 32, 0x40),
                 id="gso_tcp_doff_below_5"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), SUPER[:30], id="gso_cut_in_tcp"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), with_byte(SUPER[:70], 32, 0xF0),
                 id="gso_doff_past_end"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1448, 20, 16), SUPER[:52], id="gso_no_payload"),
    pytest.param(vnet(1, GSO_TCPV4, 52, 1, 20, 16), SUPER, id="gso_over_1024_segments"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, len(PLAIN) - 21), PLAIN,
                 id="csum_one_past_end"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, len(PLAIN), 0), PLAIN,
                 id="csum_start_at_end"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 60000, 16), PLAIN, id="csum_start_far"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 19, 16), PLAIN, id="csum_start_in_ip"),
    pytest.param(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 0xFFFF), PLAIN, id="csum_offset_far"),
])
def test_segment_rejects_malformed_input(hdr: bytes, pkt: bytes) -> None:
    with pytest.raises(ValueError):
        _fastpath.segment(hdr, pkt)


def test_segment_boundaries_next_to_the_malformed_ones_are_accepted() -> None:
    # The neighbours of the rejected cases above pass, so those reject for their reason.
    assert len(_fastpath.segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, len(PLAIN) - 22),
                                 PLAIN)) == 1
    assert len(_fastpath.segment(tso_vnet(SUPER, 1448), SUPER)) == 4
    assert len(_fastpath.segment(tso_vnet(SUPER, 1448, GSO_TCPV4 | GSO_ECN), SUPER)) == 4
    one = tcp_packet(b"\x07", tcp_opts=TS_OPTS, tcp_csum="pseudo")
    check_segments(one, 1448, _fastpath.segment(tso_vnet(one, 1448), one))


# ---- coalesce -------------------------------------------------------------------------

def stream(lengths: list[int], *, seed: int = 0, seq0: int = 5000, ident0: int = 100,
           per: dict[int, dict] | None = None, **common) -> list[bytes]:
    """Consecutive segments of one flow (payload sizes `lengths`), with per-index changes."""
    rng = random.Random(seed)
    out, seq = [], seq0
    for i, n in enumerate(lengths):
        kw = {"tcp_opts": TS_OPTS, **common, **(per or {}).get(i, {})}
        kw.setdefault("seq", seq)
        kw.setdefault("ident", (ident0 + i) & 0xFFFF)
        out.append(tcp_packet(payload_of(rng, n), **kw))
        seq = (seq + n) & MASK32
    return out


def from_on(index: int, count: int, **change) -> dict[int, dict]:
    return {i: dict(change) for i in range(index, count)}


def check_merged(hdr: bytes, pkt: bytes, run: list[bytes]) -> None:
    """One coalesced TUN write against the segments it merges."""
    ip0, tcp0, _ = parse_tcp(run[0])
    hl = ip0.ihl + tcp0.thl
    assert hl == 20 + tcp0.thl
    assert VNET.unpack(hdr) == (NEEDS_CSUM, GSO_TCPV4, hl, len(run[0]) - hl, 20, 16)
    ip, tcp, data = parse_tcp(pkt)
    assert ip.total == len(pkt)
    assert ip_header_ok(pkt)
    # The IP header is the first segment's, but for its length and checksum.
    assert (ip.ihl, ip.tos, ip.ident, ip.df, ip.mf, ip.frag, ip.ttl, ip.src, ip.dst) == (
        ip0.ihl, ip0.tos, ip0.ident, ip0.df, ip0.mf, ip0.frag, ip0.ttl, ip0.src, ip0.dst)
    # The TCP header is the first segment's, with the last one's PSH.
    last_psh = parse_tcp(run[-1])[1].flags & PSH
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.thl, tcp.low_nibble, tcp.window,
            tcp.urg, tcp.options) == (tcp0.sport, tcp0.dport, tcp0.seq, tcp0.ack, tcp0.thl,
                                      tcp0.low_nibble, tcp0.window, tcp0.urg, tcp0.options)
    assert tcp.flags == tcp0.flags | last_psh
    assert data == b"".join(parse_tcp(p)[2] for p in run)
    assert pkt[hl:] == data
    # The checksum field holds the pseudo-header sum for the whole TCP length...
    tcp_len = len(pkt) - 20
    assert tcp.csum == ones_sum(pseudo_header(ip.src, ip.dst, 6, tcp_len))
    # ...so that the kernel finishing it (NEEDS_CSUM) makes a valid TCP checksum.
    done = bytearray(pkt)
    struct.pack_into("!H", done, 36, inet_checksum(pkt[20:]))
    assert l4_checksum_ok(bytes(done))


def runs_of(inputs: list[bytes], out: list[tuple[bytes, bytes]]) -> list[int]:
    """The run length of each TUN write, each write checked against its inputs."""
    lengths, i = [], 0
    for hdr, pkt in out:
        assert isinstance(hdr, bytes) and isinstance(pkt, bytes)
        if hdr == ZERO_VNET:
            assert pkt == inputs[i], f"packet {i} not passed on unchanged"
            lengths.append(1)
            i += 1
            continue
        _, _, data = parse_tcp(pkt)
        k, got = 0, 0
        while got < len(data):
            got += len(parse_tcp(inputs[i + k])[2])
            k += 1
        assert got == len(data)
        assert k >= 2, "a merged write must hold at least two segments"
        check_merged(hdr, pkt, inputs[i:i + k])
        lengths.append(k)
        i += k
    assert i == len(inputs)
    return lengths


def coalesce_runs(pkts: list[bytes]) -> list[int]:
    return runs_of(pkts, _fastpath.coalesce(pkts))


MSS = 1000
SIX = [MSS] * 6


def flow_b(seq: int = 5000 + 3 * MSS) -> bytes:
    return tcp_packet(b"b" * MSS, src=OTHER, seq=seq, tcp_opts=TS_OPTS)


def frag_of(pkt: bytes, *, mf: bool, frag: int) -> bytes:
    ip, tcp, data = parse_tcp(pkt)
    return tcp_packet(data, seq=tcp.seq, ident=ip.ident, tcp_opts=tcp.options, mf=mf,
                      frag=frag)


def swap(pkts: list[bytes], a: int, b: int) -> list[bytes]:
    pkts = list(pkts)
    pkts[a], pkts[b] = pkts[b], pkts[a]
    return pkts


def insert(pkts: list[bytes], at: int, pkt: bytes) -> list[bytes]:
    return [*pkts[:at], pkt, *pkts[at:]]


BASE = stream(SIX)
GROUPINGS = {
    "one_flow": (BASE, [6]),
    "two_segments": (BASE[:2], [2]),
    "one_segment": (BASE[:1], [1]),
    "nothing": ([], []),
    "psh_on_last": (stream(SIX, per={5: {"flags": ACK | PSH}}), [6]),
    "psh_on_first": (stream(SIX, per={0: {"flags": ACK | PSH}}), [1, 5]),
    "psh_in_middle": (stream(SIX, per={2: {"flags": ACK | PSH}}), [3, 3]),
    "psh_on_all": (stream(SIX, flags=ACK | PSH), [1] * 6),
    "other_flow_between": (insert(BASE, 3, flow_b()), [3, 1, 3]),
    "interleaved_flows": ([BASE[0], flow_b(5000), BASE[1], flow_b(6000)], [1, 1, 1, 1]),
    "other_port": (insert(BASE, 3, tcp_packet(b"p" * MSS, sport=40001, seq=8000,
                                              tcp_opts=TS_OPTS)), [3, 1, 3]),
    "other_dst": (insert(BASE, 3, tcp_packet(b"p" * MSS, dst=OTHER, seq=8000,
                                             tcp_opts=TS_OPTS)), [3, 1, 3]),
    "out_of_order": (swap(BASE, 2, 3), [2, 1, 1, 2]),
    "retransmission": (insert(BASE, 3, BASE[2]), [3, 4]),
    "gap": (BASE[:2] + BASE[3:], [2, 3]),
    "seq_off_by_one": (stream(SIX, per={3: {"seq": 5000 + 3 * MSS + 1}}), [3, 1, 2]),
    "fin": (stream(SIX, per={2: {"flags": ACK | FIN}}), [2, 1, 3]),
    "syn": (stream(SIX, per={2: {"flags": SYN}}), [2, 1, 3]),
    "rst": (stream(SIX, per={2: {"flags": ACK | RST}}), [2, 1, 3]),
    "urg": (stream(SIX, per={2: {"flags": ACK | URG, "urg": 5}}), [2, 1, 3]),
    "ece": (stream(SIX, per={2: {"flags": ACK | ECE}}), [2, 1, 3]),
    "cwr": (stream(SIX, per={2: {"flags": ACK | CWR}}), [2, 1, 3]),
    "no_ack": (stream(SIX, per={2: {"flags": PSH}}), [2, 1, 3]),
    "ack_changes": (stream(SIX, per=from_on(3, 6, ack=99999)), [3, 3]),
    "ack_differs_once": (stream(SIX, per={3: {"ack": 99999}}), [3, 1, 2]),
    "window_changes": (stream(SIX, per=from_on(3, 6, window=1000)), [3, 3]),
    "tos_changes": (stream(SIX, per=from_on(3, 6, tos=0x03)), [3, 3]),
    "ttl_changes": (stream(SIX, per=from_on(3, 6, ttl=63)), [3, 3]),
    "df_changes": (stream(SIX, per=from_on(3, 6, df=False)), [3, 3]),
    "no_df_anywhere": (stream(SIX, df=False), [6]),
    "ts_option_changes": (stream(SIX, per=from_on(3, 6, tcp_opts=TS_OPTS[:-1] + b"\x99")),
                          [3, 3]),
    "options_vanish": (stream(SIX, per=from_on(3, 6, tcp_opts=b"")), [3, 3]),
    "options_other_kind": (stream(SIX, per=from_on(3, 6, tcp_opts=SYN_OPTS)), [3, 3]),
    "no_options": (stream(SIX, tcp_opts=b""), [6]),
    "max_options": (stream(SIX, tcp_opts=MAX_OPTS), [6]),
    "ip_id_ignored": (stream(SIX, per={3: {"ident": 7}}), [6]),
    "short_in_middle": (stream([MSS, MSS, 500, MSS, MSS, MSS]), [3, 3]),
    "short_last": (stream([MSS] * 5 + [1]), [6]),
    "long_in_middle": (stream([MSS, MSS, 1200, MSS, MSS, MSS]), [2, 2, 2]),
    "short_first": (stream([500] + [MSS] * 5), [1, 5]),
    "all_one_byte": (stream([1] * 6), [6]),
    "mf_fragment": ([*BASE[:2], frag_of(BASE[2], mf=True, frag=0), *BASE[3:]], [2, 1, 3]),
    "offset_fragment": ([*BASE[:2], frag_of(BASE[2], mf=False, frag=100), *BASE[3:]],
                        [2, 1, 3]),
    "ip_options_in_middle": (stream(SIX, per={2: {"ip_opts": IP_OPTS["pad"]}}), [2, 1, 3]),
    "ip_options_everywhere": (stream(SIX, ip_opts=IP_OPTS["pad"]), [1] * 6),
    "udp_between": (insert(BASE, 2, udp_packet(bytes(MSS))), [2, 1, 4]),
    "pure_ack_between": (insert(BASE, 2, tcp_packet(b"", seq=7000, tcp_opts=TS_OPTS)),
                         [2, 1, 4]),
    "seq_wraps": (stream(SIX, seq0=2**32 - 2500), [6]),
    "64_segments": (stream([100] * 64), [64]),
    "65_segments": (stream([100] * 65), [64, 1]),
    "130_segments": (stream([500] * 130), [64, 64, 2]),
    "65000_bytes_exactly": (stream([1160] * 57, tcp_opts=b""), [56, 1]),
    "over_65000_bytes": (stream([1448] * 50), [44, 6]),
    "short_last_to_65000": (stream([1448] * 44 + [1236]), [45]),
    "short_last_over_65000": (stream([1448] * 44 + [1237]), [44, 1]),
}


@pytest.mark.parametrize("case", GROUPINGS)
def test_coalesce_grouping(case: str) -> None:
    pkts, want = GROUPINGS[case]
    assert coalesce_runs(pkts) == want


def test_coalesce_of_segment_output_gives_back_the_super_packet() -> None:
    rng = random.Random(1)
    payload = payload_of(rng, 30 * 1448 + 111)
    sup = tcp_packet(payload, seq=2**32 - 40000, ident=0xFFF0, flags=ACK | PSH,
                     tcp_opts=TS_OPTS, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, 1448), sup)
    out = _fastpath.coalesce(segs)
    assert runs_of(segs, out) == [31]
    (hdr, got), = out
    assert VNET.unpack(hdr) == (NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert got == sup  # every byte: ids, lengths, flags, both checksum fields


def test_coalesce_segments_of_two_flows_and_strays() -> None:
    rng = random.Random(2)
    a = ref_segment(tcp_packet(payload_of(rng, 5 * 1448), tcp_opts=TS_OPTS), 1448)
    b = ref_segment(tcp_packet(payload_of(rng, 3 * 1448 + 9), src=OTHER, seq=1,
                               tcp_opts=TS_OPTS), 1448)
    udp = udp_packet(b"dns?")
    pkts = [*a[:3], *b, udp, *a[3:]]
    assert coalesce_runs(pkts) == [3, 4, 1, 2]


@pytest.mark.parametrize("bad", [[b"x" * 19], [b"\x45" + bytes(19), "str"],
                                 [bytes(65536)], [bytearray(40)]])
def test_coalesce_rejects_what_is_not_a_packet(bad: list) -> None:
    with pytest.raises(ValueError):
        _fastpath.coalesce(bad)


def test_coalesce_passes_odd_packets_unchanged() -> None:
    pkts = [bytes([0x45]) + bytes(19), udp_packet(b"u"), bytes([0x60]) + bytes(59),
            tcp_packet(b"", flags=SYN, tcp_opts=SYN_OPTS), tcp_packet(b"z", flags=ACK)]
    assert _fastpath.coalesce(pkts) == [(ZERO_VNET, p) for p in pkts]


# ---- round trip: segment then coalesce ------------------------------------------------

def expected_runs(payload_len: int, gso: int, hl: int) -> list[int]:
    sizes = [min(gso, payload_len - k) for k in range(0, payload_len, gso)]
    runs, i = [], 0
    while i < len(sizes):
        k, total = 1, hl + sizes[i]
        while (i + k < len(sizes) and k < MERGE_SEGS
               and total + sizes[i + k] <= MERGE_BYTES):
            total += sizes[i + k]
            k += 1
        runs.append(k)
        i += k
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_round_trip(seed: int) -> None:
    rng = random.Random(1000 + seed)
    gso = rng.choice((*GSO_SIZES, 100, 8948))
    tcp_opts = rng.choice(list(TCP_OPTS.values()))
    hl = 40 + len(tcp_opts)
    length = rng.choice((rng.randrange(1, gso + 1), rng.randrange(gso, 6 * gso),
                         rng.randrange(1, 65535 - hl + 1)))
    flags = rng.choice((ACK, ACK | PSH))
    sup = tcp_packet(payload_of(rng, length), seq=rng.getrandbits(32),
                     ack=rng.getrandbits(32), ident=rng.getrandbits(16),
                     window=rng.getrandbits(16), tos=rng.getrandbits(8),
                     ttl=rng.randrange(1, 256), df=rng.random() < 0.8, flags=flags,
                     tcp_opts=tcp_opts, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, gso), sup)
    out = _fastpath.coalesce(segs)
    want = expected_runs(length, gso, hl)
    assert runs_of(segs, out) == want
    if want == [1]:
        # One segment: the packet itself with its checksum completed.
        assert out == [(ZERO_VNET, segs[0])]
        assert segs[0][:36] == sup[:36] and segs[0][38:] == sup[38:]
        assert l4_checksum_ok(segs[0])
    elif len(want) == 1:
        assert out[0][1] == sup  # the super-packet, byte for byte
    # Either way the payload comes back whole and in order.
    assert b"".join(parse_tcp(p)[2] for _, p in out) == parse_tcp(sup)[2]
    first_ip, first_tcp, _ = parse_tcp(out[0][1])
    sup_ip, sup_tcp, _ = parse_tcp(sup)
    assert (first_tcp.seq, first_ip.ident, first_tcp.ack, first_tcp.window) == (
        sup_tcp.seq, sup_ip.ident, sup_tcp.ack, sup_tcp.window)


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_with_ip_options_is_never_merged(seed: int) -> None:
    rng = random.Random(seed)
    sup = tcp_packet(payload_of(rng, rng.randrange(2000, 20000)), ip_opts=IP_OPTS["pad"],
                     tcp_opts=TS_OPTS, tcp_csum="pseudo")
    segs = _fastpath.segment(tso_vnet(sup, 1448), sup)
    assert len(segs) > 1
    assert _fastpath.coalesce(segs) == [(ZERO_VNET, s) for s in segs]
