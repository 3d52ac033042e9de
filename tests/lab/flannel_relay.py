"""A stand-in for flanneld's udp backend, from docs/interop.md#udp, that also inspects what it
receives: a TUN `flannel0` without any offload, and a UDP socket on port 8285 carrying
exactly one raw IPv4 packet per datagram each way, one read and one send per packet (as
flanneld's C loop does). It shares no code with tweed: besides the stdlib it uses only the
tests' own packet checks (tests/support/packets.py).

Every datagram it receives is checked the way flanneld's kernel would take it: no longer
than the TUN's MTU, one whole IPv4 packet (total length = datagram length), a valid IP
header checksum and, for TCP, a valid TCP checksum. Valid packets go to the TUN. On SIGTERM
it prints its counts as one JSON line and exits.

    python -m tests.lab.flannel_relay LOCAL_IP PEER_IP MTU   (from the top of the tree)
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys

from tests.support.packets import PROTO_TCP, ip_header_ok, l4_checksum_ok

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PORT = 8285


def problem(d: bytes, mtu: int) -> str | None:
    """Why flanneld's side would not take this datagram as one good packet, or None."""
    if len(d) > mtu:
        return f"datagram of {len(d)} bytes over the MTU {mtu}"
    if len(d) < 20 or d[0] >> 4 != 4:
        return "not IPv4"
    total = struct.unpack_from("!H", d, 2)[0]
    if total != len(d):
        return f"IP total length {total} in a datagram of {len(d)}"
    if not ip_header_ok(d):
        return "bad IP header checksum"
    if d[9] == PROTO_TCP and not l4_checksum_ok(d):
        return "bad TCP checksum"
    return None


def main(local: str, peer: str, mtu: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"flannel0", IFF_TUN | IFF_NO_PI))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local, PORT))
    stats = {"received": 0, "tcp": 0, "sent": 0, "largest": 0, "bad": 0, "problems": []}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        try:
            readable, _, _ = select.select([fd, sock], [], [], 0.2)
        except InterruptedError:
            continue
        if fd in readable:
            sock.sendto(os.read(fd, 65535), (peer, PORT))
            stats["sent"] += 1
        if sock in readable:
            d, _addr = sock.recvfrom(65535)
            stats["received"] += 1
            stats["largest"] = max(stats["largest"], len(d))
            why = problem(d, mtu)
            if why:
                stats["bad"] += 1
                if len(stats["problems"]) < 5:
                    stats["problems"].append(why)
                continue
            stats["tcp"] += d[9] == 6
            os.write(fd, d)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
