"""What every backend offers the daemon, and what the daemon tells every backend.

A Backend is built once per host from a BackendContext (the registry in `backends` does
that, by the config's Backend.Type); `register_network(config)` gives a Network, which
says what to advertise in our lease (`lease_attrs`) and which MTU containers get, is
`setup()` once the lease is held, then takes batches of peer events (`apply`) and runs
its own periodic resync (`run`) until `close()`.

Address families are a capability of the Backend class: `families`, a class attribute,
says which it carries ({4} when a backend does not say; `carried_families` reads it). The
daemon leases, advertises and writes to subnet.env only the families that the config
enables and the backend carries, so a backend that gains IPv6 sets `families =
frozenset({4, 6})` and is handed leases with an IPv6 part (`Lease.ipv6_subnet`, peers'
`PeerLease.ipv6_subnet` and `LeaseAttrs.public_ipv6`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.config import NetworkConfig
from agent.lease import Lease, PeerEvent
from agent.lease_codec import LeaseAttrs
from backends.external_iface import ExternalInterface
from backends.kernel.sync import KernelSync
from backends.kernel.types import Netlink

__all__ = ["DEFAULT_FAMILIES", "Backend", "BackendContext", "BackendError",
           "ExternalInterface", "Network", "carried_families"]

#: What a backend that does not say carries: IPv4 only.
DEFAULT_FAMILIES: frozenset[int] = frozenset({4})


def carried_families(backend: object) -> frozenset[int]:
    """The address families a Backend class (or instance) carries: its `families`
    attribute, {4} when it has none."""
    return frozenset(getattr(backend, "families", DEFAULT_FAMILIES))


@dataclass(frozen=True)
class BackendContext:
    """What the daemon gives every backend it builds."""

    netlink: Netlink
    #: The host interface the overlay runs over (--iface and friends).
    ext: ExternalInterface
    #: Seconds between checks that the kernel state is as desired (--resync-period).
    resync: float
    #: Where a backend keeps state between runs (the subnet file's folder), and the prefix
    #: of its file names there (the subnet file's name): vxlan keeps its VtepMAC in
    #: `<state_dir>/<state_prefix>.flannel.<VNI>.json`.
    state_dir: Path
    state_prefix: str


class BackendError(RuntimeError):
    """The backend cannot run with this config or on this host; the message says why."""


class Network(Protocol):
    """One overlay network as programmed on this host."""

    lease_attrs: LeaseAttrs
    mtu: int
    #: Brings the kernel to the desired state; the daemon tells it when a batch arrived
    #: (`expect`) and metrics read its operation counters and delay histogram.
    kernel: KernelSync

    async def setup(self, lease: Lease) -> None:
        """Create devices and addresses for our lease (idempotent)."""
        ...

    async def apply(self, events: list[PeerEvent]) -> None:
        """Program the kernel for a batch of peer changes."""
        ...

    async def run(self) -> None:
        """Periodic resync against the kernel, forever."""
        ...

    def ready(self) -> bool:
        """True once the last apply or resync left the kernel as desired."""
        ...

    def counters(self) -> dict[str, int]:
        """The datapath's packet counters, for metrics; empty when the kernel carries
        the packets."""
        ...

    async def close(self) -> None:
        """Stop; kernel state is left in place so a restart disturbs no traffic."""
        ...


class Backend(Protocol):
    """A way of carrying packets between hosts; built as `cls(ctx)` by the registry.

    May also have `families: frozenset[int]` (a class attribute; see carried_families):
    not a protocol member, so that backends which carry IPv4 only need not say so.
    """

    name: str

    def __init__(self, ctx: BackendContext) -> None:
        ...

    @staticmethod
    def check_options(backend: dict[str, Any]) -> None:
        """Raise BackendError naming the first of the config's Backend options (keys
        lower-cased) that this backend cannot use; builds nothing, touches nothing."""
        ...

    async def register_network(self, config: NetworkConfig) -> Network:
        ...
