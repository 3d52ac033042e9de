"""What the daemon shows of itself to its observers: `AgentState`.

The metrics collector (agent.metrics) and the systemd reporter (agent.sd_notify) sample the
agent's state; this protocol says which parts they may read, with their types, so the
arrow from them to the daemon is written down instead of hidden behind getattr. The daemon
implements it; tests may hand them any object that does.

Only types are imported here (nothing runs at import time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, get_args

if TYPE_CHECKING:
    from agent.config import NetworkConfig
    from agent.health import Heartbeat
    from agent.lease_manager import LeaseManager
    from agent.registry import Registry
    from backends.base import Network
    from backends.iptables.keeper import IptablesKeeper

#: How the network config in etcd compares with the running one: the same, changed (a
#: restart would apply it), invalid, or deleted.
ConfigState = Literal["running", "changed", "invalid", "deleted"]
CONFIG_STATES: tuple[ConfigState, ...] = get_args(ConfigState)


class AgentState(Protocol):
    """The agent as its observers see it; the parts not there yet are None."""

    def not_ready_reason(self) -> str | None:
        """Why /readyz says not ready, or None when ready."""
        ...

    @property
    def config(self) -> NetworkConfig | None:
        """The network config the agent runs on, once a valid one was read."""
        ...

    @property
    def config_state(self) -> ConfigState:
        """How the config in etcd compares with `config`."""
        ...

    @property
    def heartbeat(self) -> Heartbeat:
        """The event loop's pulse."""
        ...

    @property
    def registry(self) -> Registry | None:
        """The store of leases, with its request counts."""
        ...

    @property
    def manager(self) -> LeaseManager | None:
        """Our lease, the peers', and the lease manager's counters."""
        ...

    @property
    def network(self) -> Network | None:
        """The backend's network: programmed or not, kernel and datapath counters."""
        ...

    @property
    def iptables(self) -> IptablesKeeper | None:
        """The iptables keeper, with --ip-masq or --iptables-forward-rules."""
        ...

    @property
    def failures(self) -> dict[str, int]:
        """Failures the running agent retries, by step (agent.daemon.FAILURE_STEPS)."""
        ...
