"""External interface choice: which host interface and address the overlay runs over.

flanneld's rules: `--iface` (names or IPs, first match wins), else `--iface-regex`
(matched against names and addresses), else `--iface-can-reach` (the interface the kernel
would route to that IP), else the interface of the default route. `--public-ip` overrides
the address advertised to peers. The choice is pure (`choose_interface`); reading the
links is the caller's I/O.

IPv6 (when the lease has an IPv6 part): `--iface` may name an IPv6 address of the
interface; the interface's IPv6 address is that one, else its first global one (in the
kernel's order, as flanneld reads it; link-local ones are never taken, as peers on other
links cannot reach them); `--public-ipv6` overrides the IPv6 address advertised. The
IPv6 addresses come in beside the links (`addresses6`: ifindex -> addresses), as the
Link type holds IPv4 ones only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from backends.kernel.types import Link


@dataclass(frozen=True)
class ExternalInterface:
    """The host interface the overlay runs over."""

    name: str
    index: int
    mtu: int
    iface_addr: ipaddress.IPv4Address  # the address on the interface
    public_ip: ipaddress.IPv4Address  # what peers send to (--public-ip, else iface_addr)
    network: ipaddress.IPv4Network | None = None  # the L2 segment of iface_addr
    #: The IPv6 address on the interface, and what peers send IPv6 to (--public-ipv6,
    #: else iface_addr6); both None unless the lease has an IPv6 part.
    iface_addr6: ipaddress.IPv6Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None

    def on_segment(self, ip: ipaddress.IPv4Address) -> bool:
        """True if `ip` is directly reachable on this interface's segment."""
        return self.network is not None and ip in self.network


#: Looks for the interface one flag value names: (links, value, --public-ip) -> it or None.
_Search = Callable[[Sequence[Link], str, str], ExternalInterface | None]


class InterfaceError(RuntimeError):
    """No usable interface; the message names the flag that could not be satisfied."""


class NoIPv4(InterfaceError):
    """The interface has no IPv4 address, or the host no IPv4 default route: what an
    IPv6-only host meets. The daemon reports it only once the config says IPv4 is needed."""


def _first_addr(link: Link) -> ipaddress.IPv4Address | None:
    for a in link.addresses:
        if not a.ip.is_link_local:
            return a.ip
    return None


def _ext(link: Link, addr: ipaddress.IPv4Address | None, public_ip: str) -> ExternalInterface:
    if addr is None:
        addr = _first_addr(link)
    if addr is None:
        raise NoIPv4(f"interface {link.name} has no IPv4 address")
    pub = ipaddress.IPv4Address(public_ip) if public_ip else addr
    network = next((a.network for a in link.addresses if a.ip == addr), None)
    return ExternalInterface(link.name, link.index, link.mtu, addr, pub, network)


def global_ipv6(addresses: Sequence[ipaddress.IPv6Address]) -> ipaddress.IPv6Address | None:
    """The first address peers on other links can reach (not link-local, loopback,
    multicast or unspecified); ULAs (fd00::/8) count, as in Go's IsGlobalUnicast."""
    for a in addresses:
        if not (a.is_link_local or a.is_loopback or a.is_multicast or a.is_unspecified):
            return a
    return None


def _by_iface(links: Sequence[Link], want: str, public_ip: str,
              addresses6: Mapping[int, Sequence[ipaddress.IPv6Address]] | None = None,
              ) -> ExternalInterface | None:
    try:
        ip6 = ipaddress.IPv6Address(want)
    except ValueError:
        ip6 = None
    if ip6 is not None:
        for link in links:
            if ip6 in (addresses6 or {}).get(link.index, ()):
                return dataclasses.replace(_ext(link, None, public_ip), iface_addr6=ip6)
        return None
    try:
        ip = ipaddress.IPv4Address(want)
    except ValueError:
        ip = None
    for link in links:
        if ip is not None and any(a.ip == ip for a in link.addresses):
            return _ext(link, ip, public_ip)
        if ip is None and link.name == want:
            return _ext(link, None, public_ip)
    return None


def _by_regex(links: Sequence[Link], pattern: str, public_ip: str) -> ExternalInterface | None:
    rx = re.compile(pattern)
    for link in links:
        for a in link.addresses:
            if rx.search(str(a.ip)):
                return _ext(link, a.ip, public_ip)
    for link in links:
        if rx.search(link.name) and _first_addr(link) is not None:
            return _ext(link, None, public_ip)
    return None


def choose_interface(
    links: Sequence[Link],
    *,
    iface: Sequence[str] = (),
    iface_regex: Sequence[str] = (),
    can_reach_oif: int | None = None,
    default_oif: int | None = None,
    public_ip: str = "",
    ipv6: bool = False,
    addresses6: Mapping[int, Sequence[ipaddress.IPv6Address]] | None = None,
    public_ipv6: str = "",
) -> ExternalInterface:
    """Apply flanneld's interface rules to `links`: each --iface in turn, then each
    --iface-regex, then --iface-can-reach; the default route only when none is given.
    With `ipv6` (the lease has an IPv6 part) the result also says the interface's IPv6
    address and the one to advertise; InterfaceError when there is neither."""
    ext = _choose(links, iface, iface_regex, can_reach_oif, default_oif, public_ip,
                  addresses6)
    if not ipv6:
        return dataclasses.replace(ext, iface_addr6=None, public_ipv6=None)
    addr6 = ext.iface_addr6 or global_ipv6((addresses6 or {}).get(ext.index, ()))
    pub6 = ipaddress.IPv6Address(public_ipv6) if public_ipv6 else addr6
    if pub6 is None:
        raise InterfaceError(
            f"interface {ext.name} has no global IPv6 address to advertise for the IPv6"
            " subnet: give it one, or set --public-ipv6")
    return dataclasses.replace(ext, iface_addr6=addr6, public_ipv6=pub6)


def _choose(
    links: Sequence[Link],
    iface: Sequence[str],
    iface_regex: Sequence[str],
    can_reach_oif: int | None,
    default_oif: int | None,
    public_ip: str,
    addresses6: Mapping[int, Sequence[ipaddress.IPv6Address]] | None,
) -> ExternalInterface:
    problems: list[str] = []
    no_ipv4 = 0  # how many of the problems are NoIPv4
    # (flag as named in errors, search, its argument, what to say when nothing is found)
    def by_iface(links: Sequence[Link], want: str, public_ip: str) -> ExternalInterface | None:
        return _by_iface(links, want, public_ip, addresses6)

    searches: list[tuple[str, _Search, str, str]] = [
        *((f"--iface {w}", by_iface, w, "no such interface or address") for w in iface),
        *((f"--iface-regex {p}", _by_regex, p, "nothing matches") for p in iface_regex),
    ]
    for flag, search, want, missing in searches:
        try:
            found = search(links, want, public_ip)
        except InterfaceError as exc:
            no_ipv4 += isinstance(exc, NoIPv4)
            problems.append(f"{flag}: {exc}")
            continue
        if found is not None:
            return found
        problems.append(f"{flag}: {missing}")
    if can_reach_oif is not None:
        for link in links:
            if link.index == can_reach_oif:
                try:
                    return _ext(link, None, public_ip)
                except InterfaceError as exc:
                    no_ipv4 += isinstance(exc, NoIPv4)
                    problems.append(f"--iface-can-reach: {exc}")
        problems.append("--iface-can-reach: no usable interface")
    if problems:
        kind = NoIPv4 if no_ipv4 == len(problems) else InterfaceError
        raise kind("no usable interface: " + "; ".join(problems))
    if default_oif is None:
        raise NoIPv4(
            "no default route: choose the interface with --iface, --iface-regex"
            " or --iface-can-reach"
        )
    for link in links:
        if link.index == default_oif:
            return _ext(link, None, public_ip)
    raise InterfaceError(f"interface index {default_oif} vanished while choosing the interface")
