"""The lease values both planes share: our `Lease`, a `PeerLease`, and the `PeerEvent`s that
carry peer changes from the lease manager to the backends, and `diff_peers`, the rule that
turns a lease listing (or one watch event) into those events.

Pure: no I/O. The etcd-driven `LeaseManager` (agent/lease_manager.py) produces these; the
backends consume them without knowing where they came from.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from agent.lease_codec import LeaseAttrs

#: `subnet` of an IPv6-only lease (no IPv4 part). `subnet` stays an IPv4Network so that the
#: backends, which carry IPv4 only today, need no change; `has_ipv4` says which it is.
NO_IPV4 = ipaddress.IPv4Network("0.0.0.0/32")


class PeerEventKind(enum.StrEnum):
    """What happened to a peer's lease."""

    ADDED = "added"  # appeared or changed: an upsert
    REMOVED = "removed"


@dataclass(frozen=True)
class Lease:
    """The lease this host holds: an IPv4 subnet, an IPv6 one, or both (dual stack)."""

    subnet: ipaddress.IPv4Network  # NO_IPV4 when the lease is IPv6-only
    name: str
    attrs: LeaseAttrs
    mod_revision: int
    expires_at: float | None  # time.monotonic() deadline; None for a reservation
    ipv6_subnet: ipaddress.IPv6Network | None = None

    @property
    def reservation(self) -> bool:
        return self.expires_at is None

    @property
    def has_ipv4(self) -> bool:
        return self.subnet != NO_IPV4

    def describe(self) -> str:
        """The subnets for log lines: `10.5.1.0/24`, `10.5.1.0/24 and fd00::/64`."""
        return _describe(self.subnet, self.ipv6_subnet)


@dataclass(frozen=True, slots=True)
class PeerLease:
    """Another host's lease: its subnet lives behind attrs.public_ip. One per peer, kept
    for as long as the peer is: slots, no instance dict. `ipv6_subnet` is set only when
    this host leases IPv6 and the peer's key has an IPv6 part (its PublicIPv6 is then
    attrs.public_ipv6)."""

    subnet: ipaddress.IPv4Network  # NO_IPV4 for an IPv6-only peer
    attrs: LeaseAttrs
    ipv6_subnet: ipaddress.IPv6Network | None = None

    @property
    def has_ipv4(self) -> bool:
        return self.subnet != NO_IPV4


def _describe(v4: ipaddress.IPv4Network, v6: ipaddress.IPv6Network | None) -> str:
    if v4 == NO_IPV4:
        return str(v6)
    return str(v4) if v6 is None else f"{v4} and {v6}"


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer appeared or changed (ADDED, an upsert) or went away (REMOVED)."""

    kind: PeerEventKind
    lease: PeerLease


def diff_peers(known: Mapping[str, PeerLease], fresh: Mapping[str, PeerLease]) -> list[PeerEvent]:
    """The events that turn the peers `known` into the peers `fresh`, both keyed by subnet
    key name: REMOVED for each name gone, then ADDED for each name new or changed (an
    unchanged peer gives none)."""
    events = [
        PeerEvent(PeerEventKind.REMOVED, p) for n, p in known.items() if n not in fresh
    ]
    events += [
        PeerEvent(PeerEventKind.ADDED, p) for n, p in fresh.items() if known.get(n) != p
    ]
    return events
