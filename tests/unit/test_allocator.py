"""Unit tests for agent.allocator: flanneld's order of preference when choosing a subnet."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest

from agent.allocator import CANDIDATES, Existing, OutOfSubnets, choose_subnet, free_subnets
from agent.config import parse_config
from agent.lease_codec import LeaseAttrs

ME = ipaddress.IPv4Address("192.168.100.1")
OTHER = ipaddress.IPv4Address("192.168.100.2")


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def config(**fields: object):
    fields.setdefault("Network", "10.5.0.0/16")
    return parse_config(json.dumps(fields))


def lease(subnet: str, ip: ipaddress.IPv4Address = OTHER, ttl: bool = True) -> Existing:
    return Existing(
        net(subnet), LeaseAttrs(ip, None, "host-gw"), ttl, subnet.replace("/", "-"), 7
    )


def rng(seed: int = 1) -> random.Random:
    return random.Random(seed)


# -- own lease -----------------------------------------------------------------------------


def test_reuses_own_lease_by_public_ip() -> None:
    mine = lease("10.5.42.0/24", ME)
    existing = [lease("10.5.1.0/24"), mine, lease("10.5.43.0/24")]
    choice = choose_subnet(config(), ME, existing, None, rng())
    assert choice.subnet == net("10.5.42.0/24")
    assert choice.reuse == mine
    assert choice.stale == ()


def test_own_lease_wins_over_previous_subnet() -> None:
    choice = choose_subnet(
        config(), ME, [lease("10.5.42.0/24", ME)], net("10.5.9.0/24"), rng()
    )
    assert choice.subnet == net("10.5.42.0/24")


def test_own_lease_that_does_not_fit_is_stale_and_a_new_one_chosen() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    old = lease("10.5.42.0/24", ME)
    choice = choose_subnet(c, ME, [old], None, rng())
    assert choice.stale == (old,)
    assert choice.reuse is None
    assert c.subnet_fits(choice.subnet)
    assert choice.subnet != old.subnet


def test_own_lease_of_wrong_length_is_stale() -> None:
    c = config(SubnetLen=25)
    old = lease("10.5.42.0/24", ME)
    choice = choose_subnet(c, ME, [old], None, rng())
    assert choice.stale == (old,)
    assert choice.reuse is None
    assert choice.subnet.prefixlen == 25


def test_stale_and_fitting_own_leases_together() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    old = lease("10.5.42.0/24", ME)
    good = lease("10.5.12.0/24", ME)
    choice = choose_subnet(c, ME, [old, good], None, rng())
    assert choice.reuse == good
    assert choice.stale == (old,)


def test_reservation_preferred_over_ttl_lease() -> None:
    ttl_lease = lease("10.5.3.0/24", ME, ttl=True)
    reservation = lease("10.5.50.0/24", ME, ttl=False)
    choice = choose_subnet(config(), ME, [ttl_lease, reservation], None, rng())
    assert choice.reuse == reservation
    assert choice.subnet == net("10.5.50.0/24")


def test_lease_of_another_host_is_not_reused() -> None:
    choice = choose_subnet(config(), ME, [lease("10.5.42.0/24", OTHER)], None, rng())
    assert choice.reuse is None
    assert choice.subnet != net("10.5.42.0/24")


# -- previous subnet ---------------------------------------------------------------------


def test_previous_subnet_used_when_free() -> None:
    choice = choose_subnet(config(), ME, [lease("10.5.1.0/24")], net("10.5.77.0/24"), rng())
    assert choice.subnet == net("10.5.77.0/24")
    assert choice.reuse is None


def test_previous_subnet_ignored_when_taken() -> None:
    existing = [lease("10.5.77.0/24")]
    for seed in range(20):
        choice = choose_subnet(config(), ME, existing, net("10.5.77.0/24"), rng(seed))
        assert choice.subnet != net("10.5.77.0/24")


def test_previous_subnet_ignored_when_taken_by_undecodable_lease() -> None:
    existing = [Existing(net("10.5.77.0/24"), None)]
    choice = choose_subnet(config(), ME, existing, net("10.5.77.0/24"), rng())
    assert choice.subnet != net("10.5.77.0/24")


@pytest.mark.parametrize("previous", ["10.5.77.0/25", "10.6.77.0/24", "10.5.0.0/24"])
def test_previous_subnet_ignored_when_not_fitting(previous: str) -> None:
    c = config(SubnetMin="10.5.1.0", SubnetMax="10.5.100.0")
    for seed in range(20):
        choice = choose_subnet(c, ME, [], net(previous), rng(seed))
        assert choice.subnet != net(previous)
        assert c.subnet_fits(choice.subnet)


def test_previous_subnet_outside_min_max_ignored() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    choice = choose_subnet(c, ME, [], net("10.5.21.0/24"), rng())
    assert choice.subnet != net("10.5.21.0/24")
    assert c.subnet_fits(choice.subnet)


# -- random pick ---------------------------------------------------------------------------


def test_free_subnets_walks_from_min_skipping_taken() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.15.0")
    taken = {net("10.5.11.0/24"), net("10.5.13.0/24")}
    assert free_subnets(c, taken) == [
        net("10.5.10.0/24"),
        net("10.5.12.0/24"),
        net("10.5.14.0/24"),
        net("10.5.15.0/24"),
    ]


def test_free_subnets_limit() -> None:
    c = config()
    free = free_subnets(c, set())
    assert len(free) == CANDIDATES == 100
    assert free[0] == net("10.5.1.0/24")
    assert free[-1] == net("10.5.100.0/24")
    assert free_subnets(c, set(), limit=3) == [
        net("10.5.1.0/24"),
        net("10.5.2.0/24"),
        net("10.5.3.0/24"),
    ]


def test_choice_is_repeatable_with_seeded_rng() -> None:
    a = choose_subnet(config(), ME, [], None, rng(42)).subnet
    b = choose_subnet(config(), ME, [], None, rng(42)).subnet
    assert a == b


def test_random_pick_only_among_first_100_free() -> None:
    # 150 free subnets between SubnetMin and SubnetMax, with taken ones interleaved.
    c = config(SubnetLen=26, SubnetMin="10.5.0.64", SubnetMax="10.5.50.0")
    all_subnets = list(net("10.5.0.0/16").subnets(new_prefix=26))
    in_range = [s for s in all_subnets if c.subnet_fits(s)]
    taken_list = in_range[::4]  # every 4th is leased by someone else
    free_all = [s for s in in_range if s not in set(taken_list)]
    assert len(free_all) == 150
    first_100 = set(free_all[:100])
    existing = [lease(str(s)) for s in taken_list]

    picks = set()
    r = rng(7)
    for _ in range(1500):
        choice = choose_subnet(c, ME, existing, None, r)
        assert choice.subnet in first_100
        picks.add(choice.subnet)
    # Uniform among the 100: every one of them comes up in 1500 draws.
    assert picks == first_100


def test_respects_subnet_min_max() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.12.0")
    r = rng(3)
    picks = {choose_subnet(c, ME, [], None, r).subnet for _ in range(200)}
    assert picks == {net("10.5.10.0/24"), net("10.5.11.0/24"), net("10.5.12.0/24")}


def test_only_free_one_is_chosen() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.12.0")
    existing = [lease("10.5.10.0/24"), lease("10.5.12.0/24")]
    for seed in range(10):
        assert choose_subnet(c, ME, existing, None, rng(seed)).subnet == net("10.5.11.0/24")


def test_undecodable_leases_count_as_taken() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.12.0")
    existing = [Existing(net("10.5.10.0/24"), None), Existing(net("10.5.11.0/24"), None)]
    for seed in range(10):
        assert choose_subnet(c, ME, existing, None, rng(seed)).subnet == net("10.5.12.0/24")


def test_exhaustion_raises_out_of_subnets() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.11.0")
    existing = [lease("10.5.10.0/24"), Existing(net("10.5.11.0/24"), None)]
    with pytest.raises(OutOfSubnets) as exc:
        choose_subnet(c, ME, existing, None, rng())
    msg = str(exc.value)
    assert "out of subnets" in msg
    assert "10.5.10.0" in msg and "10.5.11.0" in msg
    assert "/24" in msg


def test_exhaustion_with_previous_taken() -> None:
    c = config(SubnetMin="10.5.10.0", SubnetMax="10.5.10.0")
    with pytest.raises(OutOfSubnets):
        choose_subnet(c, ME, [lease("10.5.10.0/24")], net("10.5.10.0/24"), rng())


def test_lease_of_other_length_blocks_overlapping_subnets() -> None:
    c = config(SubnetLen=25, SubnetMin="10.5.1.0", SubnetMax="10.5.1.128")
    with pytest.raises(OutOfSubnets):
        choose_subnet(c, ME, [lease("10.5.1.0/24")], None, rng())
