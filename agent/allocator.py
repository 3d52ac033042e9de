"""Subnet allocator: which subnet(s) a host should lease, given the config and the leases.

Pure logic, no I/O; randomness comes in as an argument so tests are repeatable.
Order of preference is flanneld's: our own lease (same PublicIP; PublicIPv6 for an
IPv6-only lease), then the subnets the last run wrote to subnet.env, then a uniform pick
among the first 100 free subnets. With dual stack the IPv6 subnet is chosen with the IPv4
one, each family by the same rules (flanneld's LocalManager.tryAcquireLease and
allocateSubnet): the own lease is reused only when both parts fit, and the random picks
are made independently among each family's first 100 free subnets.

Subnets are walked as integers: a /48 IPv6Network with /64 subnets holds 65,536 of them,
and only the (at most 100) free ones found, and the one chosen, become objects.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import NetworkConfig, config_families
from agent.lease_codec import LeaseAttrs

#: How many free subnets to collect before picking one at random (flanneld's number).
CANDIDATES = 100

AnyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutOfSubnets(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax (or the IPv6 ones) is taken."""


@dataclass(frozen=True)
class Existing:
    """A lease already in the registry."""

    subnet: ipaddress.IPv4Network | None  # None: an IPv6-only key
    attrs: LeaseAttrs | None  # None: the value did not decode, the subnet is still taken
    ttl: bool = True  # False: a reservation (no etcd lease), never expires
    name: str = ""  # the registry key name
    mod_revision: int = 0
    ipv6: ipaddress.IPv6Network | None = None  # the key's IPv6 part, if any


@dataclass(frozen=True)
class Choice:
    """The allocator's decision: the subnet of each family leased (None: not leased)."""

    subnet: ipaddress.IPv4Network | None
    reuse: Existing | None = None  # set when we take over our own existing lease
    stale: tuple[Existing, ...] = ()  # own leases that no longer fit: delete them
    ipv6: ipaddress.IPv6Network | None = None


def _free(lo: int, hi: int, sublen: int, bits: int, taken: Iterable[AnyNetwork],
          limit: int) -> list[int]:
    """The network addresses (integers) of up to `limit` free /sublen subnets, walking
    from `lo` to `hi`. A taken subnet of another length (left from an older config)
    blocks every subnet it overlaps."""
    size = 1 << (bits - sublen)
    same: set[int] = set()
    spans: list[tuple[int, int]] = []
    for t in taken:
        start = int(t.network_address)
        if t.prefixlen == sublen:
            same.add(start)
        else:
            # Not t.broadcast_address: it caches itself in the (long-kept) network object.
            spans.append((start, start + (1 << (bits - t.prefixlen)) - 1))
    out: list[int] = []
    addr = lo
    while addr <= hi and len(out) < limit:
        end = addr + size - 1
        if addr not in same and not any(s <= end and addr <= e for s, e in spans):
            out.append(addr)
        addr += size
    return out


def free_subnets(
    config: NetworkConfig, taken: Iterable[ipaddress.IPv4Network], limit: int = CANDIDATES
) -> list[ipaddress.IPv4Network]:
    """Walk from SubnetMin upward and collect up to `limit` free IPv4 subnets."""
    assert config.subnet_min is not None and config.subnet_max is not None
    found = _free(int(config.subnet_min), int(config.subnet_max), config.subnet_len, 32,
                  taken, limit)
    return [ipaddress.IPv4Network((a, config.subnet_len)) for a in found]


def free_ipv6_subnets(
    config: NetworkConfig, taken: Iterable[ipaddress.IPv6Network], limit: int = CANDIDATES
) -> list[ipaddress.IPv6Network]:
    """Walk from IPv6SubnetMin upward and collect up to `limit` free IPv6 subnets."""
    assert config.ipv6_subnet_min is not None and config.ipv6_subnet_max is not None
    found = _free(int(config.ipv6_subnet_min), int(config.ipv6_subnet_max),
                  config.ipv6_subnet_len, 128, taken, limit)
    return [ipaddress.IPv6Network((a, config.ipv6_subnet_len)) for a in found]


def lease_fits(config: NetworkConfig, families: frozenset[int],
               v4: ipaddress.IPv4Network | None, v6: ipaddress.IPv6Network | None) -> bool:
    """Whether a lease with these parts is one this host could hold: each family leased
    has a part that fits the config, and no family left out has one (flanneld's
    isSubnetConfigCompat and isIPv6SubnetConfigCompat: a lease with an IPv6 part does not
    fit a host that leases IPv4 only)."""
    ok4 = (v4 is not None and config.subnet_fits(v4)) if 4 in families else v4 is None
    ok6 = (v6 is not None and config.ipv6_subnet_fits(v6)) if 6 in families else v6 is None
    return ok4 and ok6


def _overlaps_any(net: AnyNetwork, taken: Iterable[AnyNetwork]) -> bool:
    return any(net.version == t.version and net.overlaps(t) for t in taken)


def choose_subnet(
    config: NetworkConfig,
    public_ip: ipaddress.IPv4Address,
    existing: Iterable[Existing],
    previous: ipaddress.IPv4Network | None,
    rng: random.Random,
    *,
    families: frozenset[int] | None = None,
    public_ipv6: ipaddress.IPv6Address | None = None,
    previous6: ipaddress.IPv6Network | None = None,
) -> Choice:
    """Pick the subnet(s) to lease for `families` (default: those the config enables);
    raise OutOfSubnets naming the family and range when one has none free.

    Our own leases are those whose PublicIP is ours (PublicIPv6 when IPv4 is not leased).
    `previous`/`previous6` (subnet.env's FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET) are taken
    per family when they fit and nothing overlaps them; flanneld takes them only together.
    """
    fams = config_families(config) if families is None else families
    if 4 in fams and config.network is None:
        raise OutOfSubnets("the network config has no IPv4 Network: no subnet to lease")
    if 6 in fams and config.ipv6_network is None:
        raise OutOfSubnets("the network config has no IPv6Network: no IPv6 subnet to lease")
    leases = list(existing)

    def ours(e: Existing) -> bool:
        if e.attrs is None:
            return False
        if 4 in fams:
            return e.attrs.public_ip == public_ip
        return public_ipv6 is not None and e.attrs.public_ipv6 == public_ipv6

    own = [e for e in leases if ours(e)]
    fitting = [e for e in own if lease_fits(config, fams, e.subnet, e.ipv6)]
    stale = tuple(e for e in own if not lease_fits(config, fams, e.subnet, e.ipv6))
    if fitting:
        # Prefer a reservation: an operator pinned it, it must win over a TTL lease.
        fitting.sort(key=lambda e: (
            e.ttl, int(e.subnet.network_address) if e.subnet is not None else -1,
            int(e.ipv6.network_address) if e.ipv6 is not None else -1))
        best = fitting[0]
        return Choice(best.subnet, reuse=best, stale=stale, ipv6=best.ipv6)
    # Our stale leases are deleted before the new one is written: they take nothing.
    others = [e for e in leases if e not in stale]
    taken4 = [e.subnet for e in others if e.subnet is not None]
    taken6 = [e.ipv6 for e in others if e.ipv6 is not None]
    v4: ipaddress.IPv4Network | None = None
    v6: ipaddress.IPv6Network | None = None
    if 4 in fams:
        if (previous is not None and config.subnet_fits(previous)
                and not _overlaps_any(previous, taken4)):
            v4 = previous
        else:
            free = free_subnets(config, taken4)
            if not free:
                raise OutOfSubnets(
                    f"out of subnets: every /{config.subnet_len} between {config.subnet_min}"
                    f" and {config.subnet_max} in {config.network} is leased")
            v4 = rng.choice(free)
    if 6 in fams:
        if (previous6 is not None and config.ipv6_subnet_fits(previous6)
                and not _overlaps_any(previous6, taken6)):
            v6 = previous6
        else:
            free6 = free_ipv6_subnets(config, taken6)
            if not free6:
                raise OutOfSubnets(
                    f"out of IPv6 subnets: every /{config.ipv6_subnet_len} between"
                    f" {config.ipv6_subnet_min} and {config.ipv6_subnet_max} in"
                    f" {config.ipv6_network} is leased")
            v6 = rng.choice(free6)
    return Choice(v4, stale=stale, ipv6=v6)
