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


class PeerEventKind(enum.StrEnum):
    """What happened to a peer's lease."""

    ADDED = "added"  # appeared or changed: an upsert
    REMOVED = "removed"


@dataclass(frozen=True)
class Lease:
    """The lease this host holds."""

    subnet: ipaddress.IPv4Network
    name: str
    attrs: LeaseAttrs
    mod_revision: int
    expires_at: float | None  # time.monotonic() deadline; None for a reservation

    @property
    def reservation(self) -> bool:
        return self.expires_at is None


@dataclass(frozen=True, slots=True)
class PeerLease:
    """Another host's lease: its subnet lives behind attrs.public_ip. One per peer, kept
    for as long as the peer is: slots, no instance dict."""

    subnet: ipaddress.IPv4Network
    attrs: LeaseAttrs


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
