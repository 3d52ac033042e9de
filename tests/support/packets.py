"""Packets for the tests: IPv4 with UDP, TCP or ICMP, built and taken apart with struct;
and the UDP datagrams of a capture file (tcpdump -w), read without tweed's help.

Every test that needs a packet (the datapath suite, the C segmentation and coalescing
hooks, the packet helpers, the udp lab and its flanneld-style relay) builds it here. The
Internet checksum here is its own: nothing in this module imports tweed (backends/), so a
mistake shared by the code under test and the packets it is tested with cannot hide.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any, Literal

MASK32 = 0xFFFFFFFF
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
#: The IP flags field's DF and MF bits (the rest of the 16-bit field is the offset).
DF, MF = 0x4000, 0x2000

Address = str | bytes
Checksum = Literal["valid"] | int


# ---- the Internet checksum ------------------------------------------------------------

def ones_sum(data: bytes | bytearray) -> int:
    """Ones' complement sum of big-endian 16-bit words (an odd last byte padded with a
    zero), end-around carry folded."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071): 0 when `data` holds a correct checksum."""
    return ~ones_sum(data) & 0xFFFF


def pseudo_header(src: Address, dst: Address, proto: int, length: int) -> bytes:
    """The IPv4 pseudo-header that TCP and UDP checksums cover."""
    return addr(src) + addr(dst) + struct.pack("!BBH", 0, proto, length)


def addr(a: Address) -> bytes:
    """An IPv4 address as 4 bytes, from dotted text or bytes."""
    return socket.inet_aton(a) if isinstance(a, str) else bytes(a)


# ---- building -------------------------------------------------------------------------

def ip_packet(src: Address, dst: Address, payload: bytes = b"p" * 40, *,
              proto: int = PROTO_UDP, ttl: int = 64, tos: int = 0, ident: int = 0,
              df: bool = False, mf: bool = False, frag: int = 0, options: bytes = b"",
              version: int = 4, total: int | None = None, csum: Checksum = "valid") -> bytes:
    """An IPv4 packet: header (options zero-padded to a multiple of 4) then `payload`.
    `frag` is OR'ed into the flags/offset field as is (an offset, or raw flag bits);
    `total` overrides the total length field; `csum` a raw header checksum."""
    opts = options + bytes(-len(options) % 4)
    ihl = 20 + len(opts)
    field = (DF if df else 0) | (MF if mf else 0) | frag
    length = ihl + len(payload) if total is None else total
    h = bytearray(struct.pack("!BBHHHBBH4s4s", version << 4 | ihl // 4, tos, length,
                              ident & 0xFFFF, field, ttl, proto, 0, addr(src), addr(dst))
                  + opts)
    struct.pack_into("!H", h, 10, inet_checksum(h) if csum == "valid" else csum)
    return bytes(h) + payload


def sized_packet(src: Address, dst: Address, size: int, *, fill: int | None = None,
                 **ip: Any) -> bytes:
    """An IPv4 packet of exactly `size` bytes whose payload repeats one byte (`fill`,
    by default size & 0xFF, so that packets of different sizes differ)."""
    opts = ip.get("options", b"")
    hlen = 20 + len(opts) + (-len(opts) % 4)
    byte = size & 0xFF if fill is None else fill
    return ip_packet(src, dst, bytes([byte]) * (size - hlen), **ip)


def udp_packet(payload: bytes = b"u" * 32, *, src: Address = "10.5.1.2",
               dst: Address = "10.5.2.9", sport: int = 8472, dport: int = 8285,
               csum: Checksum = 0, ip_opts: bytes = b"", **ip: Any) -> bytes:
    """An IPv4 UDP packet; `csum` 0 (none, the default), "valid", or a raw value."""
    length = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    if csum == "valid":
        value = inet_checksum(pseudo_header(src, dst, PROTO_UDP, length) + udp) or 0xFFFF
    else:
        value = csum
    struct.pack_into("!H", udp, 6, value)
    return ip_packet(src, dst, bytes(udp), proto=PROTO_UDP, options=ip_opts, **ip)


def tcp_packet(payload: bytes = b"", *, src: Address = "10.5.1.2", dst: Address = "10.5.2.9",
               seq: int = 1000, ack: int = 77777, flags: int = ACK, window: int = 502,
               sport: int = 40000, dport: int = 5201, ident: int = 0x1234, ttl: int = 64,
               tos: int = 0, df: bool = True, mf: bool = False, frag: int = 0,
               ip_opts: bytes = b"", tcp_opts: bytes = b"", urg: int = 0, low_nibble: int = 0,
               tcp_csum: Literal["valid", "pseudo"] | int = "valid",
               ip_csum: Checksum = "valid") -> bytes:
    """An IPv4 TCP packet. tcp_csum: "valid", "pseudo" (the folded, uncomplemented
    pseudo-header sum, as Linux leaves a CHECKSUM_PARTIAL packet) or a raw value.
    low_nibble: the 4 bits after the data offset (reserved, AE)."""
    thl = 20 + len(tcp_opts)
    assert thl % 4 == 0, "TCP options must fill whole words"
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & MASK32, ack & MASK32,
                                (thl // 4) << 4 | low_nibble, flags, window, 0, urg)
                    + tcp_opts)
    pseudo = pseudo_header(src, dst, PROTO_TCP, thl + len(payload))
    if tcp_csum == "valid":
        value = inet_checksum(pseudo + tcp + payload)
    elif tcp_csum == "pseudo":
        value = ones_sum(pseudo)
    else:
        value = tcp_csum
    struct.pack_into("!H", tcp, 16, value)
    return ip_packet(src, dst, bytes(tcp) + payload, proto=PROTO_TCP, ttl=ttl, tos=tos,
                     ident=ident, df=df, mf=mf, frag=frag, options=ip_opts, csum=ip_csum)


def icmp_message(kind: int, code: int = 0, rest: bytes = bytes(4), data: bytes = b"") -> bytes:
    """An ICMP message (type, code, checksum, 4 bytes `rest`, `data`) with its checksum."""
    m = bytearray(struct.pack("!BBH", kind, code, 0) + rest + data)
    struct.pack_into("!H", m, 2, inet_checksum(m))
    return bytes(m)


def icmp_echo(src: Address, dst: Address, *, reply: bool = False, ident: int = 1,
              seq: int = 1, data: bytes = b"ping", ttl: int = 64) -> bytes:
    """An IPv4 ICMP echo request (or reply)."""
    msg = icmp_message(0 if reply else 8, 0, struct.pack("!HH", ident, seq), data)
    return ip_packet(src, dst, msg, proto=PROTO_ICMP, ttl=ttl)


def hopped(pkt: bytes) -> bytes:
    """What a router makes of `pkt`: TTL one less, header checksum computed afresh."""
    p = bytearray(pkt)
    ihl = (p[0] & 0x0F) * 4
    p[8] -= 1
    p[10] = p[11] = 0
    struct.pack_into("!H", p, 10, inet_checksum(p[:ihl]))
    return bytes(p)


# ---- taking apart ---------------------------------------------------------------------

@dataclass(frozen=True)
class Ip:
    version: int
    ihl: int
    tos: int
    total: int
    ident: int
    df: bool
    mf: bool
    frag: int
    reserved_bit: bool
    ttl: int
    proto: int
    csum: int
    src: bytes
    dst: bytes
    options: bytes
    header: bytes


@dataclass(frozen=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    thl: int
    low_nibble: int  # reserved bits and AE/NS
    flags: int
    window: int
    csum: int
    urg: int
    options: bytes
    header: bytes


def parse_ip(pkt: bytes) -> Ip:
    vihl, tos, total, ident, ff, ttl, proto, csum, src, dst = struct.unpack_from(
        "!BBHHHBBH4s4s", pkt)
    ihl = (vihl & 0x0F) * 4
    return Ip(vihl >> 4, ihl, tos, total, ident, bool(ff & DF), bool(ff & MF), ff & 0x1FFF,
              bool(ff & 0x8000), ttl, proto, csum, src, dst, pkt[20:ihl], pkt[:ihl])


def parse_tcp(pkt: bytes) -> tuple[Ip, Tcp, bytes]:
    """The IP header, the TCP header and the payload (up to the IP total length)."""
    ip = parse_ip(pkt)
    assert ip.proto == PROTO_TCP
    o = ip.ihl
    sport, dport, seq, ack, b12, flags, window, csum, urg = struct.unpack_from(
        "!HHIIBBHHH", pkt, o)
    thl = (b12 >> 4) * 4
    tcp = Tcp(sport, dport, seq, ack, thl, b12 & 0x0F, flags, window, csum, urg,
              pkt[o + 20:o + thl], pkt[o:o + thl])
    return ip, tcp, pkt[o + thl:ip.total]


def ip_header_ok(pkt: bytes) -> bool:
    """The IPv4 header checksum verifies."""
    return ones_sum(pkt[:(pkt[0] & 0x0F) * 4]) == 0xFFFF


def l4_checksum_ok(pkt: bytes) -> bool:
    """The TCP or UDP checksum of an IPv4 packet verifies (pseudo-header included)."""
    ip = parse_ip(pkt)
    seg = pkt[ip.ihl:ip.total]
    return ones_sum(pseudo_header(ip.src, ip.dst, ip.proto, len(seg)) + seg) == 0xFFFF


@dataclass(frozen=True)
class IcmpReply:
    """An ICMP message in an IPv4 packet, with both checksums checked."""

    ihl: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes
    ip_ok: bool
    type: int
    code: int
    icmp_ok: bool
    rest: bytes  # the 4 bytes after the checksum ("unused" in an error)
    quote: bytes  # what follows: the offending packet's start, in an error


def parse_icmp(reply: bytes) -> IcmpReply:
    ip = parse_ip(reply)
    assert ip.version == 4 and ip.total == len(reply)
    icmp = reply[ip.ihl:]
    return IcmpReply(ip.ihl, ip.ttl, ip.proto, ip.src, ip.dst, ip_header_ok(reply), icmp[0],
                     icmp[1], inet_checksum(icmp) == 0, icmp[4:8], icmp[8:])


# ---- captures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Datagram:
    """One UDP datagram of a capture: addresses as text, the UDP payload as captured."""

    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def pcap_datagrams(data: bytes) -> list[Datagram]:
    """The IPv4 UDP datagrams of a classic pcap file (what `tcpdump -w` writes) on Ethernet
    (link type 1), in capture order; other frames are skipped. Frames must be whole (no
    snap length cut), or AssertionError."""
    magic = data[:4]
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
             b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}[magic]
    linktype = struct.unpack_from(order + "I", data, 20)[0]
    assert linktype == 1, f"link type {linktype}, not Ethernet"
    out = []
    at = 24
    while at + 16 <= len(data):
        _sec, _frac, incl, orig = struct.unpack_from(order + "IIII", data, at)
        frame = data[at + 16:at + 16 + incl]
        at += 16 + incl
        assert incl == orig, "a frame cut by the snap length"
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = parse_ip(frame[14:])
        if ip.proto != PROTO_UDP or ip.frag or ip.mf:
            continue
        udp = frame[14 + ip.ihl:14 + ip.total]
        sport, dport, length = struct.unpack_from("!HHH", udp)
        out.append(Datagram(socket.inet_ntoa(ip.src), sport, socket.inet_ntoa(ip.dst), dport,
                            udp[8:length]))
    return out
