"""Data plane backends, and the one registry that finds them by the config's Backend.Type.

`REGISTRY` maps each type to its Backend class; nothing else branches on the type. The
daemon asks `backend_problem(config)` whether a config's backend could be built (its
options checked, nothing built) and `build_backend(config, ctx)` for the backend itself.
A backend's module is imported only when its type is asked for, so importing `backends`
(or any module below it) stays cheap: a host-gw agent never loads the udp datapaths.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import NetworkConfig
    from backends.base import Backend, BackendContext

#: Backend.Type -> "module:class" of its Backend. Types flanneld has that tweed does not
#: build (ipip, wireguard, ...) are a clear startup error.
REGISTRY: dict[str, str] = {
    "host-gw": "backends.hostgw:HostGwBackend",
    "udp": "backends.udp.network:UdpBackend",
    "vxlan": "backends.vxlan:VxlanBackend",
}
AVAILABLE = tuple(REGISTRY)


def backend_class(btype: str) -> type[Backend]:
    """The Backend class of a Backend.Type; BackendError if this build has none."""
    # Imported here, not above: backends.base pulls in the config and kernel modules,
    # which the pure modules below this package must not pay for.
    from backends.base import BackendError

    target = REGISTRY.get(btype)
    if target is None:
        raise BackendError(f"Backend.Type {btype!r} is not available in tweed (available: "
                           f"{', '.join(AVAILABLE)})")
    module, _, name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), name)
    return cls


def backend_problem(config: NetworkConfig) -> str | None:
    """Why building the backend of `config` would fail at start, or None.

    parse_config checks the config's own fields; a backend checks its options only when
    it is built. A config changed at run time is judged with both, so that one a restart
    could not use is reported as invalid rather than as "restart to apply".
    """
    from backends.base import BackendError

    try:
        backend_class(config.backend_type).check_options(config.backend)
    except BackendError as exc:
        return str(exc)
    return None


def build_backend(config: NetworkConfig, ctx: BackendContext) -> Backend:
    """The backend named by the config, built with `ctx`; BackendError if this build has
    no such backend (its options are checked by its register_network)."""
    return backend_class(config.backend_type)(ctx)
