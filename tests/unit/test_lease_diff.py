"""Unit tests for agent.lease.diff_peers: a lease listing against the peers known. Pure."""

from __future__ import annotations

import ipaddress

from agent.lease import PeerEvent, PeerEventKind, PeerLease, diff_peers
from agent.lease_codec import LeaseAttrs

ADDED, REMOVED = PeerEventKind.ADDED, PeerEventKind.REMOVED


def peer(third: int, host: int | None = None) -> PeerLease:
    ip = ipaddress.IPv4Address(f"192.168.100.{host if host is not None else third}")
    return PeerLease(ipaddress.IPv4Network(f"10.5.{third}.0/24"),
                     LeaseAttrs(ip, None, "host-gw", None))


def name(p: PeerLease) -> str:
    return str(p.subnet).replace("/", "-")


def listing(*peers: PeerLease) -> dict[str, PeerLease]:
    return {name(p): p for p in peers}


def test_nothing_known_everything_is_added_in_listing_order() -> None:
    a, b = peer(7), peer(3)
    assert diff_peers({}, listing(a, b)) == [PeerEvent(ADDED, a), PeerEvent(ADDED, b)]


def test_the_same_listing_gives_no_events() -> None:
    known = listing(peer(1), peer(2))
    assert diff_peers(known, dict(known)) == []
    assert diff_peers({}, {}) == []


def test_a_name_gone_is_removed_with_the_lease_that_was_known() -> None:
    a, b = peer(1), peer(2)
    assert diff_peers(listing(a, b), listing(b)) == [PeerEvent(REMOVED, a)]
    assert diff_peers(listing(a, b), {}) == [PeerEvent(REMOVED, a), PeerEvent(REMOVED, b)]


def test_a_changed_lease_is_added_again_not_removed() -> None:
    old, new = peer(4), peer(4, host=44)  # same subnet key, the host moved
    assert diff_peers(listing(old), listing(new)) == [PeerEvent(ADDED, new)]


def test_removals_come_before_additions() -> None:
    gone, stays, changed_old, changed_new, fresh = (
        peer(1), peer(2), peer(3), peer(3, host=33), peer(5))
    events = diff_peers(listing(gone, stays, changed_old), listing(stays, changed_new, fresh))
    assert events == [PeerEvent(REMOVED, gone), PeerEvent(ADDED, changed_new),
                      PeerEvent(ADDED, fresh)]


def test_keys_decide_identity_not_values() -> None:
    # The same lease under another key name is a removal and an addition.
    p = peer(6)
    assert diff_peers({"old-key": p}, {"new-key": p}) == [PeerEvent(REMOVED, p),
                                                         PeerEvent(ADDED, p)]


def test_the_inputs_are_left_alone() -> None:
    known, fresh = listing(peer(1)), listing(peer(2))
    diff_peers(known, fresh)
    assert known == listing(peer(1)) and fresh == listing(peer(2))
