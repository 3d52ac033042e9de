"""Network config: parse and validate the JSON that operators write to `<prefix>/config`.

Pure logic, no I/O. The rules are flanneld's (docs/interop.md#the-network-config): field names match
case-insensitively, SubnetLen/SubnetMin/SubnetMax get defaults from Network, an absent
Backend means udp. Every error names the field and the rule it broke.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from agent.json_fields import get_bool, get_int, load_object

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
AnyNetwork = IPv4Network | IPv6Network

class ConfigError(ValueError):
    """The network config is invalid; the message names the field and the rule."""


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config; all defaults filled in."""

    enable_ipv4: bool
    enable_ipv6: bool
    network: IPv4Network | None
    subnet_len: int
    subnet_min: ipaddress.IPv4Address | None
    subnet_max: ipaddress.IPv4Address | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: ipaddress.IPv6Address | None
    ipv6_subnet_max: ipaddress.IPv6Address | None
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict)

    def subnet_fits(self, subnet: IPv4Network) -> bool:
        """True if `subnet` is a valid lease under this config (length and range)."""
        if self.network is None or self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def ipv6_subnet_fits(self, subnet: IPv6Network) -> bool:
        """True if `subnet` is a valid IPv6 lease under this config."""
        if self.ipv6_network is None or self.ipv6_subnet_min is None:
            return False
        assert self.ipv6_subnet_max is not None
        return (
            subnet.prefixlen == self.ipv6_subnet_len
            and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max
        )


def config_families(config: NetworkConfig) -> frozenset[int]:
    """The address families the config enables: {4}, {6} or {4, 6}."""
    return frozenset(f for f, on in ((4, config.enable_ipv4), (6, config.enable_ipv6)) if on)


def leased_families(config: NetworkConfig, carried: frozenset[int]) -> frozenset[int]:
    """The families tweed leases: those the config enables that the backend carries. A
    subnet is never advertised (nor written to subnet.env) for a family nobody routes."""
    return config_families(config) & carried


def unsupported(config: NetworkConfig, backend: str = "",
                carried: frozenset[int] = frozenset({4})) -> str | None:
    """Why tweed cannot run a config flanneld accepts with a backend carrying `carried`,
    or None: an IPv6-only config on a backend that does not carry IPv6 (yet)."""
    if not leased_families(config, carried):
        name = f"the {backend} backend" if backend else "the backend"
        return (f"EnableIPv4 is false (an IPv6-only network) and {name} does not carry"
                f" IPv6 yet; set EnableIPv4 to true and an IPv4 Network to run on IPv4")
    return None


def ignored(config: NetworkConfig, backend: str = "",
            carried: frozenset[int] = frozenset({4})) -> str | None:
    """What of a config tweed runs without, or None (said once at start): IPv6 of a
    dual-stack config on a backend that carries IPv4 only."""
    if config.enable_ipv6 and 6 not in carried and leased_families(config, carried):
        name = f"the {backend} backend" if backend else "the backend"
        return (f"EnableIPv6: {name} does not carry IPv6 yet; only the IPv4 Network"
                f" {config.network} is leased, the lease has no IPv6 part and subnet.env"
                f" no FLANNEL_IPV6_* lines")
    return None


def _fold(obj: dict[str, Any]) -> dict[str, Any]:
    """Lower-case the keys, as Go's encoding/json matches field names case-insensitively."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.setdefault(key.lower(), value)
    return out


def _bool(cfg: dict[str, Any], name: str, default: bool) -> bool:
    return get_bool(cfg, name, default, error=ConfigError)


def _int(cfg: dict[str, Any], name: str) -> int:
    return get_int(cfg, name, 0, error=ConfigError)


def _network(cfg: dict[str, Any], name: str, version: int) -> AnyNetwork | None:
    text = cfg.get(name.lower())
    if text in (None, ""):
        return None
    if not isinstance(text, str):
        raise ConfigError(f"{name}: must be a CIDR string, got {text!r}")
    try:
        # strict=False masks the host bits, as flanneld does.
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a CIDR ({exc})") from None
    if net.version != version:
        raise ConfigError(f"{name}: {text!r} is not an IPv{version} network")
    return net


def _address(cfg: dict[str, Any], name: str, version: int) -> Any:
    text = cfg.get(name.lower())
    if text in (None, ""):
        return None
    if not isinstance(text, str):
        raise ConfigError(f"{name}: must be an address string, got {text!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an IP address") from None
    if addr.version != version:
        raise ConfigError(f"{name}: {text!r} is not an IPv{version} address")
    return addr


def _subnet_len(
    net: AnyNetwork, given: int, name: str, net_name: str, *, max_len: int, default_len: int
) -> int:
    """flanneld's SubnetLen rule: default from the network's size, >= 4 subnets, <= max_len."""
    if given:
        if given > max_len:
            raise ConfigError(f"{name}: {given} is longer than /{max_len}")
        if given < net.prefixlen + 2:
            raise ConfigError(
                f"{name}: /{given} leaves fewer than 4 subnets in {net_name} {net}"
                f" (needs /{net.prefixlen + 2} or longer)"
            )
        return given
    if net.prefixlen <= default_len - 2:
        return default_len
    if net.prefixlen <= max_len - 2:
        return net.prefixlen + 2
    raise ConfigError(
        f"{name}: not set and {net_name} {net} is too small for a default"
        f" (a network longer than /{max_len - 2} needs an explicit {name})"
    )


def _bounds(
    cfg: dict[str, Any],
    net: AnyNetwork,
    sublen: int,
    names: tuple[str, str],
    version: int,
) -> tuple[Any, Any]:
    size = 1 << (net.max_prefixlen - sublen)
    lo = _address(cfg, names[0], version)
    hi = _address(cfg, names[1], version)
    if lo is None:
        lo = net.network_address + size  # the first subnet is left out, as flanneld does
    if hi is None:
        hi = net.network_address + (net.num_addresses - size)
    for name, addr in zip(names, (lo, hi), strict=True):
        if addr not in net:
            raise ConfigError(f"{name}: {addr} is not inside {net}")
        if (int(addr) - int(net.network_address)) % size:
            raise ConfigError(f"{name}: {addr} is not on a /{sublen} boundary")
    if lo > hi:
        raise ConfigError(f"{names[0]}: {lo} is above {names[1]} {hi}")
    return lo, hi


@dataclass(frozen=True)
class _Family:
    """The field names and limits of one address family's part of the config."""

    version: int
    enable: str
    network: str
    subnet_len: str
    bounds: tuple[str, str]
    max_len: int
    default_len: int


_IPV4 = _Family(4, "EnableIPv4", "Network", "SubnetLen", ("SubnetMin", "SubnetMax"), 30, 24)
_IPV6 = _Family(6, "EnableIPv6", "IPv6Network", "IPv6SubnetLen",
                ("IPv6SubnetMin", "IPv6SubnetMax"), 126, 64)


_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def _family(cfg: dict[str, Any], fam: _Family) -> tuple[AnyNetwork, int, Any, Any]:
    """One enabled family's network, subnet length and SubnetMin/Max, checked."""
    net = _network(cfg, fam.network, fam.version)
    if net is None:
        raise ConfigError(f"{fam.network}: required when {fam.enable} is true")
    if isinstance(net, IPv6Network) and net.overlaps(_IPV4_MAPPED):
        # Its subnets would be IPv4 addresses in disguise (and written with dots).
        raise ConfigError(f"{fam.network}: {net} overlaps the IPv4-mapped range"
                          f" {_IPV4_MAPPED}; choose an IPv6 network (e.g. a ULA, fd00::/8)")
    sublen = _subnet_len(net, _int(cfg, fam.subnet_len), fam.subnet_len, fam.network,
                         max_len=fam.max_len, default_len=fam.default_len)
    lo, hi = _bounds(cfg, net, sublen, fam.bounds, fam.version)
    return net, sublen, lo, hi


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a network config; raise ConfigError naming the field and rule."""
    raw = load_object(text, ConfigError, "config: not valid JSON", "config: must be a JSON object")
    cfg = _fold(raw)

    enable4 = _bool(cfg, "EnableIPv4", True)
    enable6 = _bool(cfg, "EnableIPv6", False)
    if not enable4 and not enable6:
        raise ConfigError("EnableIPv4/EnableIPv6: at least one must be true")

    net4, sublen4, min4, max4 = _family(cfg, _IPV4) if enable4 else (None, 0, None, None)
    net6, sublen6, min6, max6 = _family(cfg, _IPV6) if enable6 else (None, 0, None, None)
    # _family gives each family's own network type (_network checks the version).
    assert net4 is None or isinstance(net4, IPv4Network)
    assert net6 is None or isinstance(net6, IPv6Network)

    backend = cfg.get("backend")
    if backend is None:
        backend = {"Type": "udp"}
    if not isinstance(backend, dict):
        raise ConfigError("Backend: must be a JSON object")
    bfold = _fold(backend)
    btype = bfold.get("type", "udp")
    if not isinstance(btype, str) or not btype:
        raise ConfigError(f"Backend.Type: must be a non-empty string, got {btype!r}")

    return NetworkConfig(
        enable_ipv4=enable4,
        enable_ipv6=enable6,
        network=net4,
        subnet_len=sublen4,
        subnet_min=min4,
        subnet_max=max4,
        ipv6_network=net6,
        ipv6_subnet_len=sublen6,
        ipv6_subnet_min=min6,
        ipv6_subnet_max=max6,
        backend_type=btype.lower(),
        backend=bfold,
    )
