"""Subnet allocator: which subnet a host should lease, given the config and the leases.

Pure logic, no I/O; randomness comes in as an argument so tests are repeatable.
Order of preference is flanneld's: our own lease (same PublicIP), then the subnet the last
run wrote to subnet.env, then a uniform pick among the first 100 free subnets.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import NetworkConfig
from agent.lease_codec import LeaseAttrs

#: How many free subnets to collect before picking one at random (flanneld's number).
CANDIDATES = 100


class OutOfSubnets(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax is taken."""


@dataclass(frozen=True)
class Existing:
    """A lease already in the registry."""

    subnet: ipaddress.IPv4Network
    attrs: LeaseAttrs | None  # None: the value did not decode, the subnet is still taken
    ttl: bool = True  # False: a reservation (no etcd lease), never expires
    name: str = ""  # the registry key name
    mod_revision: int = 0


@dataclass(frozen=True)
class Choice:
    """The allocator's decision."""

    subnet: ipaddress.IPv4Network
    reuse: Existing | None = None  # set when we take over our own existing lease
    stale: tuple[Existing, ...] = ()  # own leases that no longer fit: delete them


def free_subnets(
    config: NetworkConfig, taken: set[ipaddress.IPv4Network], limit: int = CANDIDATES
) -> list[ipaddress.IPv4Network]:
    """Walk from SubnetMin upward and collect up to `limit` free subnets."""
    assert config.subnet_min is not None and config.subnet_max is not None
    size = 1 << (32 - config.subnet_len)
    out: list[ipaddress.IPv4Network] = []
    addr = int(config.subnet_min)
    last = int(config.subnet_max)
    # Leases of another length (left from an older config) block every subnet they overlap.
    others = [t for t in taken if t.prefixlen != config.subnet_len]
    while addr <= last and len(out) < limit:
        net = ipaddress.IPv4Network((addr, config.subnet_len))
        if net not in taken and not any(net.overlaps(t) for t in others):
            out.append(net)
        addr += size
    return out


def choose_subnet(
    config: NetworkConfig,
    public_ip: ipaddress.IPv4Address,
    existing: Iterable[Existing],
    previous: ipaddress.IPv4Network | None,
    rng: random.Random,
) -> Choice:
    """Pick the subnet to lease; raise OutOfSubnets when none is free (or, for a config
    without an IPv4 Network, which the daemon refuses before it gets here, none can be)."""
    if config.network is None:
        raise OutOfSubnets("the network config has no IPv4 Network: no subnet to lease")
    leases = list(existing)
    own = [e for e in leases if e.attrs is not None and e.attrs.public_ip == public_ip]
    fitting = [e for e in own if config.subnet_fits(e.subnet)]
    stale = tuple(e for e in own if not config.subnet_fits(e.subnet))
    if fitting:
        # Prefer a reservation: an operator pinned it, it must win over a TTL lease.
        fitting.sort(key=lambda e: (e.ttl, e.subnet))
        return Choice(fitting[0].subnet, reuse=fitting[0], stale=stale)
    taken = {e.subnet for e in leases}
    if (
        previous is not None
        and config.subnet_fits(previous)
        and not any(previous.overlaps(t) for t in taken)
    ):
        return Choice(previous, stale=stale)
    free = free_subnets(config, taken)
    if not free:
        raise OutOfSubnets(
            f"out of subnets: every /{config.subnet_len} between {config.subnet_min}"
            f" and {config.subnet_max} in {config.network} is leased"
        )
    return Choice(rng.choice(free), stale=stale)
