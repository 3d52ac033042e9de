"""The IPv6 addresses of the host's interfaces, read through pyroute2: a thin adapter.

The Netlink protocol (backends/kernel/types.py) lists each link's IPv4 addresses only;
until it lists IPv6 ones too, the daemon reads them here, once at start and only when its
lease has an IPv6 part, for backends.external_iface.choose_interface. The addresses of a
link keep the kernel's order (flanneld's "first address" is the first of that dump).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket


def _read() -> dict[int, list[ipaddress.IPv6Address]]:
    from pyroute2 import IPRoute

    out: dict[int, list[ipaddress.IPv6Address]] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET6):
            text = msg.get_attr("IFA_ADDRESS")
            if text:
                addr = ipaddress.IPv6Address(str(text).split("%")[0])
                out.setdefault(int(msg["index"]), []).append(addr)
    return out


async def read_ipv6_addresses() -> dict[int, list[ipaddress.IPv6Address]]:
    """ifindex -> the link's IPv6 addresses, in the kernel's order."""
    return await asyncio.to_thread(_read)
