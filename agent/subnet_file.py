"""subnet.env: the file Docker (and mk-docker-opts) read to learn the host's subnet and MTU.

Rendering and parsing are pure; `write_subnet_file` is the only I/O and writes atomically
(temp file in the same folder, fsync, rename) so a reader never sees half a file;
`write_problem` is the one line for a file that cannot be written.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from agent.atomic_file import atomic_write


@dataclass(frozen=True)
class SubnetEnv:
    """The values flanneld writes to subnet.env."""

    network: ipaddress.IPv4Network | None
    subnet: ipaddress.IPv4Network | None
    mtu: int
    ipmasq: bool
    ipv6_network: ipaddress.IPv6Network | None = None
    ipv6_subnet: ipaddress.IPv6Network | None = None


def _gateway(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The subnet's first usable address with its prefix: Docker's --bip (flanneld's
    WriteSubnetFile writes FLANNEL_IPV6_SUBNET the same way: network address + 1)."""
    return f"{subnet.network_address + 1}/{subnet.prefixlen}"


def render_subnet_env(env: SubnetEnv) -> str:
    """The file's text, in flanneld's order."""
    lines = []
    if env.network is not None:
        lines.append(f"FLANNEL_NETWORK={env.network}")
    if env.subnet is not None:
        lines.append(f"FLANNEL_SUBNET={_gateway(env.subnet)}")
    if env.ipv6_network is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={env.ipv6_network}")
    if env.ipv6_subnet is not None:
        lines.append(f"FLANNEL_IPV6_SUBNET={_gateway(env.ipv6_subnet)}")
    lines.append(f"FLANNEL_MTU={env.mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if env.ipmasq else 'false'}")
    return "\n".join(lines) + "\n"


def parse_subnet_env(text: str) -> dict[str, str]:
    """KEY=VALUE pairs of a subnet.env (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def previous_subnet(text: str) -> ipaddress.IPv4Network | None:
    """The subnet a previous run leased, from its subnet.env text; None if absent or bad."""
    value = parse_subnet_env(text).get("FLANNEL_SUBNET")
    if not value:
        return None
    try:
        return ipaddress.IPv4Interface(value).network
    except ValueError:
        return None


def previous_ipv6_subnet(text: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet a previous run leased (FLANNEL_IPV6_SUBNET, its first address and
    prefix, as flanneld writes it); None if absent or bad."""
    value = parse_subnet_env(text).get("FLANNEL_IPV6_SUBNET")
    if not value:
        return None
    try:
        return ipaddress.IPv6Interface(value).network
    except ValueError:
        return None


def _read(path: Path) -> str | None:
    try:
        # A stray non-UTF-8 byte elsewhere in the file must not hide a good subnet line.
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def read_previous_subnet(path: Path) -> ipaddress.IPv4Network | None:
    """previous_subnet() of the file at `path`; None if it cannot be read."""
    text = _read(path)
    return None if text is None else previous_subnet(text)


def read_previous_ipv6_subnet(path: Path) -> ipaddress.IPv6Network | None:
    """previous_ipv6_subnet() of the file at `path`; None if it cannot be read."""
    text = _read(path)
    return None if text is None else previous_ipv6_subnet(text)


def write_subnet_file(path: Path, env: SubnetEnv) -> None:
    """Write subnet.env atomically with mode 0644, creating the parent folder."""
    atomic_write(path, render_subnet_env(env), 0o644)


def write_problem(path: Path, exc: OSError) -> str:
    """The one line for subnet.env (or its folder) that cannot be written: the file, the
    flag and what to do."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file where a folder goes
        why = f"{path.parent} (or a folder above it) is a file, not a folder"
    return (f"--subnet-file: cannot write {path}: {why}; tweed writes"
            f" subnet.env (and the vxlan state file) in {path.parent}: make that folder"
            f" writable for tweed (systemd: ReadWritePaths=), or choose another"
            f" --subnet-file")
