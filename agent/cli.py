"""Command line: flanneld's flags (Go flag syntax), FLANNELD_* environment, exit codes.

Every flag may be written `-name value`, `--name value` or `--name=value`; booleans take no
value or `=true/false`. Each is also read from `FLANNELD_<NAME>` (upper case, `-` to `_`)
and the command line wins. A bad value is one line on stderr naming the flag, exit 2.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import __version__


class UsageError(ValueError):
    """A flag or FLANNELD_* value is wrong; the message names it."""


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "t", "true", "yes"):
        return True
    if low in ("0", "f", "false", "no"):
        return False
    raise ValueError("must be true or false")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be an integer in {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be in {lo}..{hi}")
        return value

    return conv


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _ipv4_or_empty(text: str) -> str:
    if text:
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise ValueError("must be an IPv4 address") from None
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a regular expression ({exc})") from None
    return text


def _str(text: str) -> str:
    return text


@dataclass(frozen=True)
class Flag:
    name: str
    conv: Callable[[str], Any]
    default: Any
    help: str
    repeat: bool = False
    is_bool: bool = False


FLAGS: tuple[Flag, ...] = (
    Flag(
        "etcd-endpoints",
        _str,
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
        "comma-separated list of etcd endpoints",
    ),
    Flag("etcd-prefix", _str, "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", _str, "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", _str, "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", _str, "", "SSL CA file used to secure etcd communication"),
    Flag("etcd-username", _str, "", "username for BasicAuth to etcd"),
    Flag("etcd-password", _str, "", "password for BasicAuth to etcd"),
    Flag("iface", _str, [], "interface (name or IP) to use for inter-host traffic; repeatable",
         repeat=True),
    Flag("iface-regex", _regex, [], "regex of interface names or IPs to pick from; repeatable",
         repeat=True),
    Flag("iface-can-reach", _ipv4_or_empty, "", "pick the interface that routes to this IP"),
    Flag("public-ip", _ipv4_or_empty, "", "IP accessible by other nodes for inter-host traffic"),
    Flag("subnet-file", _str, "/run/flannel/subnet.env", "file the subnet env is written to"),
    Flag("subnet-lease-renew-margin", _int_range(1, 1439), 60,
         "renew the lease this many minutes before it expires"),
    Flag("ip-masq", _bool, False, "set up IP masquerade for traffic leaving the overlay",
         is_bool=True),
    Flag("ip-masq-fully-random-disable", _bool, False,
         "do not use --random-fully in the MASQUERADE rules", is_bool=True),
    Flag("iptables-resync", _int_range(1, 86400), 5,
         "seconds between checks that the iptables rules are in place"),
    Flag("iptables-forward-rules", _bool, True,
         "add accept rules for the network to the FORWARD chain (FLANNEL-FWD)", is_bool=True),
    Flag("healthz-ip", _ipv4_or_empty, "127.0.0.1", "address the health server listens on"),
    Flag("healthz-port", _int_range(0, 65535), 8475,
         "port of the health and metrics server (0: off)"),
    Flag("version", _bool, False, "print the version and exit", is_bool=True),
    Flag("v", _int_range(0, 10), 0, "log verbosity (1 and up: debug)"),
    # tweed's own flags
    Flag("subnet-lease-ttl", _int_range(60, 10 * 86400), 86400,
         "tweed: lifetime of the etcd lease on our subnet, in seconds"),
    Flag("resync-period", _positive_float, 10.0,
         "tweed: seconds between checks that the kernel state is as desired"),
)
_BY_NAME = {f.name: f for f in FLAGS}


@dataclass(frozen=True)
class Options:
    """Parsed settings, with the flag names turned into attributes."""

    etcd_endpoints: str = FLAGS[0].default
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    iface: list[str] = field(default_factory=list)
    iface_regex: list[str] = field(default_factory=list)
    iface_can_reach: str = ""
    public_ip: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    healthz_ip: str = "127.0.0.1"
    # 8475: flanneld has no default (0); this one is clear of flannel's 8285/8472, etcd's,
    # the Prometheus exporter range 9100-9999 and Kubernetes' 10249-10259 (docs/metrics.md).
    healthz_port: int = 8475
    version: bool = False
    v: int = 0
    subnet_lease_ttl: int = 86400
    resync_period: float = 10.0


def _set(values: dict[str, Any], flag: Flag, text: str, where: str) -> None:
    try:
        value = flag.conv(text)
    except ValueError as exc:
        raise UsageError(f"invalid value {text!r} for {where}: {exc}") from None
    if flag.repeat:
        values.setdefault(flag.name, []).append(value)
    else:
        values[flag.name] = value


def usage() -> str:
    lines = ["usage: tweed [flags]",
             "       tweed docker-opts [-f FILE] [-d FILE] [-i] [-c] [-m] [-k KEY]  (-h: help)",
             ""]
    for f in FLAGS:
        default = "" if f.default in ("", [], False) else f" (default {f.default})"
        lines.append(f"  --{f.name}{'' if f.is_bool else ' VALUE'}\n        {f.help}{default}")
    lines.append("\nEvery flag can also be set as FLANNELD_<NAME> in the environment.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    """Parse argv (without the program name) and the environment; raise UsageError."""
    cli: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"unexpected argument {arg!r} (tweed takes only flags)")
        name, eq, text = arg.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise UsageError("help")
        flag = _BY_NAME.get(name)
        if flag is None:
            raise UsageError(f"unknown flag --{name}")
        if not eq:
            if flag.is_bool:
                text = "true"
            elif i < len(args):
                text = args[i]
                i += 1
            else:
                raise UsageError(f"flag --{name} needs a value")
        _set(cli, flag, text, f"--{name}")

    env: dict[str, Any] = {}
    for flag in FLAGS:
        var = "FLANNELD_" + flag.name.upper().replace("-", "_")
        # An empty variable is skipped, as flanneld's SetFlagsFromEnv does.
        if flag.name in cli or not environ.get(var):
            continue
        text = environ[var]
        # Interface lists are comma lists; a regex may itself contain commas ({m,n}).
        parts = [p for p in text.split(",") if p] if flag.name == "iface" else [text]
        for part in parts:
            _set(env, flag, part, var)
    merged = {**env, **cli}
    return Options(**{k.replace("-", "_"): v for k, v in merged.items()})


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc and etcd3aio are chatty at debug and say nothing our own log lines do not.
    for noisy in ("etcd3aio", "grpc", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """The `tweed` console command; `tweed docker-opts ...` is the mk-docker-opts subcommand."""
    args = sys.argv[1:] if argv is None else argv
    # The daemon takes only flags, so a first word can only be a subcommand.
    if args and args[0] == "docker-opts":
        from agent.docker_opts import main as docker_opts

        return docker_opts(args[1:])
    try:
        opts = parse_args(args, os.environ)
    except UsageError as exc:
        if str(exc) == "help":
            print(usage())
            return 0
        print(f"tweed: {exc}", file=sys.stderr)
        return 2
    if opts.version:
        print(__version__)
        return 0
    setup_logging(opts.v)
    from agent.daemon import run

    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
