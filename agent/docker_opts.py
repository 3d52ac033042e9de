"""`tweed docker-opts`: Docker daemon options from subnet.env, as flannel's mk-docker-opts.sh.

Owns the subcommand: its getopts-style flags (-f, -d, -i, -c, -k KEY, -m), the pure
rendering of the output file and the thin I/O around it (read subnet.env, check the routing
table, write the output atomically). The output is the script's, byte for byte:

    DOCKER_OPT_BIP="--bip=10.1.74.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=true"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"

With dual stack (FLANNEL_IPV6_SUBNET in subnet.env, which tweed writes only when its
backend carries IPv6) tweed adds DOCKER_OPT_IPV6="--ipv6" and
DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=<the IPv6 subnet>"; the script knows no IPv6.

Where the script is silent tweed is not: a missing subnet.env, a missing or malformed
FLANNEL_SUBNET or FLANNEL_MTU are one-line errors (exit 1) instead of an empty DOCKER_OPTS
that would start Docker on its default bridge. Usage errors exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.atomic_file import atomic_write
from agent.subnet_file import parse_subnet_env

USAGE = """\
usage: tweed docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k KEY]

Write Docker daemon options taken from flannel's subnet.env.
  -f FILE  subnet env file to read (default /run/flannel/subnet.env)
  -d FILE  file to write (default /run/docker_opts.env; - for standard output)
  -i       only the individual options, e.g. DOCKER_OPT_MTU="--mtu=1450"
  -c       only the combined options, DOCKER_OPTS="..."
  -k KEY   name of the combined variable (default DOCKER_OPTS); its value in the
           environment, if any, is put in front of the options
  -m       leave out --ip-masq
Without -i and -c both are written."""


class DockerOptsUsage(ValueError):
    """Bad command line; exit status 2."""


class DockerOptsError(RuntimeError):
    """The options cannot be produced (file, key or route problem); exit status 1."""


@dataclass(frozen=True)
class DockerOptsArgs:
    env_file: str = "/run/flannel/subnet.env"
    out_file: str = "/run/docker_opts.env"
    individual: bool = False
    combined: bool = False
    key: str = "DOCKER_OPTS"
    ip_masq: bool = True  # -m turns it off


_WITH_VALUE = {"f": "env_file", "d": "out_file", "k": "key"}
_SWITCHES = {"i": ("individual", True), "c": ("combined", True), "m": ("ip_masq", False)}


def parse_args(argv: Sequence[str]) -> DockerOptsArgs:
    """getopts("f:d:icmk:") semantics: clustered switches (-ic), values attached (-fFILE) or
    separate (-f FILE), `--` ends the flags. No positional arguments."""
    values: dict[str, object] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise DockerOptsUsage(f"unexpected argument {args[i]!r}")
            break
        if arg in ("-h", "--help"):
            raise DockerOptsUsage("help")
        if not arg.startswith("-") or arg == "-":
            raise DockerOptsUsage(f"unexpected argument {arg!r}")
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in _SWITCHES:
                name, value = _SWITCHES[letter]
                values[name] = value
            elif letter in _WITH_VALUE:
                if j < len(arg):
                    text, j = arg[j:], len(arg)
                elif i < len(args):
                    text = args[i]
                    i += 1
                else:
                    raise DockerOptsUsage(f"flag -{letter} needs a value")
                values[_WITH_VALUE[letter]] = text
            else:
                raise DockerOptsUsage(f"unknown flag -{letter}")
    key = values.get("key", "DOCKER_OPTS")
    if not isinstance(key, str) or not key.isidentifier() or not key.isascii():
        raise DockerOptsUsage(f"-k {key!r}: not a variable name")
    return DockerOptsArgs(**values)  # type: ignore[arg-type]


def _quote(value: str) -> str:
    """Double-quoted for sh and for systemd's EnvironmentFile= alike."""
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{out}"'


def docker_options(env: Mapping[str, str], where: str, ip_masq: bool = True) -> dict[str, str]:
    """DOCKER_OPT_* name -> option, from subnet.env's values; DockerOptsError names the
    key and `where` (the file) when FLANNEL_SUBNET or FLANNEL_MTU is missing or bad.
    An IPv6-only subnet.env (FLANNEL_IPV6_SUBNET, no FLANNEL_SUBNET) gives no --bip."""
    subnet = env.get("FLANNEL_SUBNET", "")
    subnet6 = env.get("FLANNEL_IPV6_SUBNET", "")
    mtu = env.get("FLANNEL_MTU", "")
    required = [("FLANNEL_MTU", mtu)]
    if not subnet6:
        required.insert(0, ("FLANNEL_SUBNET", subnet))
    for key, value in required:
        if not value:
            raise DockerOptsError(f"{where} has no {key}; is tweed running and ready?")
    opts = {"DOCKER_OPT_MTU": f"--mtu={mtu}"}
    if subnet:
        try:
            ipaddress.IPv4Interface(subnet)
        except ValueError:
            raise DockerOptsError(
                f"FLANNEL_SUBNET={subnet} in {where} is not an IPv4 address/prefix") from None
        opts["DOCKER_OPT_BIP"] = f"--bip={subnet}"
    if subnet6:
        try:
            net6 = ipaddress.IPv6Interface(subnet6).network
        except ValueError:
            raise DockerOptsError(f"FLANNEL_IPV6_SUBNET={subnet6} in {where} is not an"
                                  " IPv6 address/prefix") from None
        # Docker's --fixed-cidr-v6 is a network: the subnet, not its first address.
        opts["DOCKER_OPT_IPV6"] = "--ipv6"
        opts["DOCKER_OPT_FIXED_CIDR_V6"] = f"--fixed-cidr-v6={net6}"
    if not mtu.isdigit() or not 68 <= int(mtu) <= 65535:
        raise DockerOptsError(f"FLANNEL_MTU={mtu} in {where} is not an MTU (68..65535)")
    masq = env.get("FLANNEL_IPMASQ", "")
    if masq and ip_masq:
        # tweed masquerades (--ip-masq) or Docker does, never both.
        if masq == "true":
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif masq == "false":
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(
                f"FLANNEL_IPMASQ={masq} in {where} is neither true nor false")
    return opts


def render(opts: Mapping[str, str], individual: bool, combined: bool, key: str = "DOCKER_OPTS",
           prefix: str = "") -> str:
    """The output file. Both parts when neither `individual` nor `combined` is asked for.
    Options in name order; the combined value is `prefix`, a space if there is one, then
    " <option>" for each (hence the script's leading space)."""
    if not individual and not combined:
        individual = combined = True
    lines = []
    joined = f"{prefix} " if prefix else ""
    for name in sorted(opts):
        if individual:
            lines.append(f"{name}={_quote(opts[name])}")
        joined += f" {opts[name]}"
    if combined:
        lines.append(f"{key}={_quote(joined)}")
    return "".join(f"{line}\n" for line in lines)


def gateway_routes_to(subnet: str, routes: Iterable[tuple[str, str | None]]) -> list[str]:
    """Routes (destination, gateway) to exactly our subnet through a gateway, as text.

    Such a route (say, a stale host-gw route from when another host held the subnet) makes
    the kernel refuse docker0's own prefix route, and containers would be unreachable;
    mk-docker-opts.sh refuses to go on, and so does tweed."""
    net = ipaddress.IPv4Interface(subnet).network
    return [f"{dst} via {gw}" for dst, gw in routes
            if gw and ipaddress.IPv4Network(dst, strict=False) == net]


def main_table_routes() -> list[tuple[str, str | None]]:
    """(destination, gateway) of the IPv4 routes in the main table of this namespace."""
    from pyroute2 import IPRoute

    out: list[tuple[str, str | None]] = []
    with IPRoute() as ipr:
        for msg in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"
            gw = msg.get_attr("RTA_GATEWAY")
            if gw is None:
                for hop in msg.get_attr("RTA_MULTIPATH") or ():
                    gw = gw or hop.get_attr("RTA_GATEWAY")
            out.append((f"{dst}/{msg['dst_len']}", gw))
    return out


def run(args: DockerOptsArgs, environ: Mapping[str, str]) -> str:
    """Read, check and render; returns the text to write. DockerOptsError on a problem."""
    try:
        text = Path(args.env_file).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise DockerOptsError(f"{args.env_file} does not exist; is tweed running?") from None
    except OSError as exc:
        raise DockerOptsError(f"cannot read {args.env_file}: {exc.strerror}") from None
    env = parse_subnet_env(text)
    opts = docker_options(env, args.env_file, args.ip_masq)
    try:
        conflicts = (gateway_routes_to(env["FLANNEL_SUBNET"], main_table_routes())
                     if env.get("FLANNEL_SUBNET") else [])
    except OSError as exc:
        raise DockerOptsError(f"cannot read the routing table: {exc}") from None
    if conflicts:
        raise DockerOptsError(
            f"the routing table already has a route to this host's subnet: {conflicts[0]}; "
            "remove it before starting Docker")
    # The script sources subnet.env, so a value there wins over the environment's.
    prefix = env.get(args.key, environ.get(args.key, ""))
    return render(opts, args.individual, args.combined, args.key, prefix)


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """`tweed docker-opts ARGS`; returns the exit status."""
    try:
        args = parse_args(argv)
    except DockerOptsUsage as exc:
        if str(exc) == "help":
            print(USAGE)
            return 0
        print(f"tweed docker-opts: {exc}\n{USAGE.splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        text = run(args, os.environ if environ is None else environ)
        if args.out_file == "-":
            sys.stdout.write(text)
        else:
            atomic_write(Path(args.out_file), text, 0o644)
    except DockerOptsError as exc:
        print(f"tweed docker-opts: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tweed docker-opts: cannot write {args.out_file}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0
