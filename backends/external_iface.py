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
from collections.abc import Callable, Sequence
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

    def on_segment(self, ip: ipaddress.IPv4Address) -> bool:
        """True if `ip` is directly reachable on this interface's segment."""
        return self.network is not None and ip in self.network


#: Looks for the interface one flag value names: (links, value, --public-ip) -> it or None.
_Search = Callable[[Sequence[Link], str, str], ExternalInterface | None]


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


def _by_iface(links: Sequence[Link], want: str, public_ip: str) -> ExternalInterface | None:
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
) -> ExternalInterface:
    """Apply flanneld's interface rules to `links`: each --iface in turn, then each
    --iface-regex, then --iface-can-reach; the default route only when none is given."""
    problems: list[str] = []
    # (flag as named in errors, search, its argument, what to say when nothing is found)
    searches: list[tuple[str, _Search, str, str]] = [
        *((f"--iface {w}", _by_iface, w, "no such interface or address") for w in iface),
        *((f"--iface-regex {p}", _by_regex, p, "nothing matches") for p in iface_regex),
    ]
    for flag, search, want, missing in searches:
        try:
            found = search(links, want, public_ip)
        except InterfaceError as exc:
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
                    problems.append(f"--iface-can-reach: {exc}")
        problems.append("--iface-can-reach: no usable interface")
    if problems:
        raise InterfaceError("no usable interface: " + "; ".join(problems))
    if default_oif is None:
        raise InterfaceError(
            "no default route: choose the interface with --iface, --iface-regex"
            " or --iface-can-reach"
        )
    for link in links:
        if link.index == default_oif:
            return _ext(link, None, public_ip)
    raise InterfaceError(f"interface index {default_oif} vanished while choosing the interface")
