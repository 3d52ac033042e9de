"""External interface choice: which host interface and address the overlay runs over.

flanneld's rules: `--iface` (names or IPs, first match wins), else `--iface-regex`
(matched against names and addresses), else `--iface-can-reach` (the interface the kernel
would route to that IP), else the interface of the default route. `--public-ip` overrides
the address advertised to peers. The choice is pure (`choose_interface`); reading the
links is the caller's I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from backends.netlink import Link


@dataclass(frozen=True)
class ExternalInterface:
    """The host interface the overlay runs over."""

    name: str
    index: int
    mtu: int
    iface_addr: ipaddress.IPv4Address  # the address on the interface
    public_ip: ipaddress.IPv4Address  # what peers send to (--public-ip, else iface_addr)
    network: ipaddress.IPv4Network | None = None  # the L2 segment of iface_addr

    def on_segment(self, ip: ipaddress.IPv4Address) -> bool:
        """True if `ip` is directly reachable on this interface's segment."""
        return self.network is not None and ip in self.network


class InterfaceError(RuntimeError):
    """No usable interface; the message names the flag that could not be satisfied."""


def _first_addr(link: Link) -> ipaddress.IPv4Address | None:
    for a in link.addresses:
        if not a.ip.is_link_local:
            return a.ip
    return None


def _ext(link: Link, addr: ipaddress.IPv4Address | None, public_ip: str) -> ExternalInterface:
    if addr is None:
        addr = _first_addr(link)
    if addr is None:
        raise InterfaceError(f"interface {link.name} has no IPv4 address")
    pub = ipaddress.IPv4Address(public_ip) if public_ip else addr
    network = next((a.network for a in link.addresses if a.ip == addr), None)
    return ExternalInterface(link.name, link.index, link.mtu, addr, pub, network)


def choose_interface(
    links: Sequence[Link],
    *,
    iface: Sequence[str] = (),
    iface_regex: Sequence[str] = (),
    can_reach_oif: int | None = None,
    default_oif: int | None = None,
    public_ip: str = "",
) -> ExternalInterface:
    """Apply flanneld's interface rules to `links`."""
    if iface:
        for want in iface:
            try:
                ip = ipaddress.IPv4Address(want)
            except ValueError:
                ip = None
            for link in links:
                if ip is not None and any(a.ip == ip for a in link.addresses):
                    return _ext(link, ip, public_ip)
                if ip is None and link.name == want:
                    return _ext(link, None, public_ip)
        raise InterfaceError(f"--iface: none of {', '.join(iface)} is an interface or address here")
    if iface_regex:
        for pattern in iface_regex:
            rx = re.compile(pattern)
            for link in links:
                for a in link.addresses:
                    if rx.search(str(a.ip)):
                        return _ext(link, a.ip, public_ip)
            for link in links:
                if rx.search(link.name) and _first_addr(link) is not None:
                    return _ext(link, None, public_ip)
        raise InterfaceError(f"--iface-regex: no interface or address matches {list(iface_regex)}")
    oif = can_reach_oif if can_reach_oif is not None else default_oif
    if oif is None:
        raise InterfaceError(
            "no default route: choose the interface with --iface, --iface-regex"
            " or --iface-can-reach"
        )
    for link in links:
        if link.index == oif:
            return _ext(link, None, public_ip)
    raise InterfaceError(f"interface index {oif} vanished while choosing the interface")
