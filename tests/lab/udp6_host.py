"""One host's udp datapath alone, for the IPv6 lab (tests/lab/test_udp6_lab.py): run
inside a host namespace, it makes flannel0 (a TUN with the vnet header, as the backend
opens it), binds the underlay socket(s) on port 8285, gives the datapath our subnets and
the peers' routes from the command line, prints `ready` and moves packets until SIGTERM;
then it prints its counters as one JSON line. No etcd and no agent: the lease side of
IPv6 (a lease's v6 subnet) is another piece of issue 14, and this drives the datapath the
same way the backend does (set_subnet, set_route, run).

    python -m tests.lab.udp6_host --datapath c --bind4 192.168.100.1 \\
        --own 10.5.1.0/24 --own fd00:5:1::/64 --route fd00:5:2::/64=192.168.100.2
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import socket
import subprocess
import sys

from backends.udp.c_datapath import CDatapath
from backends.udp.network import open_socket, open_tun
from backends.udp.python_datapath import PythonDatapath

PORT = 8285
MTU = 1452  # 1500 less a v6 header (40) and UDP (8): fits either underlay


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datapath", choices=["python", "c"], required=True)
    ap.add_argument("--bind4", required=True)
    ap.add_argument("--bind6")
    ap.add_argument("--own", action="append", default=[])
    ap.add_argument("--route", action="append", default=[], help="SUBNET=PEER")
    args = ap.parse_args(argv)
    tun = open_tun("flannel0", vnet_hdr=True)
    subprocess.run(["ip", "link", "set", "flannel0", "mtu", str(MTU), "up"], check=True)
    sock = open_socket(ipaddress.IPv4Address(args.bind4), PORT)
    sock6 = None
    if args.bind6:
        sock6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock6.bind((args.bind6, PORT))
        sock6.setblocking(False)
    common = {"port": PORT, "mtu": MTU, "vnet_hdr": True, "tso": True}
    dp: PythonDatapath | CDatapath
    if args.datapath == "python":
        dp = PythonDatapath(tun.fileno(), sock, sock6=sock6, **common)  # type: ignore[arg-type]
    else:
        dp = CDatapath(tun.fileno(), sock, sock6=sock6, **common)  # type: ignore[arg-type]
    for own in args.own:
        dp.set_subnet(ipaddress.ip_network(own))
    for spec in args.route:
        net, peer = spec.split("=")
        dp.set_route(ipaddress.ip_network(net), ipaddress.ip_address(peer))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, dp.stop)
        print("ready", dp.mode(), flush=True)
        await dp.run()

    asyncio.run(run())
    print(json.dumps(dp.counters()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
