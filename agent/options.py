"""The agent's settings: flanneld's flags, their FLANNELD_* variables, the usage text and the
etcd settings, all from one table.

Pure: no I/O. The table is `Options` itself: each field is one flag (`etcd_prefix` is
`--etcd-prefix` and `FLANNELD_ETCD_PREFIX`) declared with its parser, default and help, each
written once; `FLAGS`, `usage()`, `parse_args()` and `EtcdSettings`' defaults are derived
from it. `agent.cli` does the printing and the exit codes.

Every flag may be written `-name value`, `--name value` or `--name=value`; booleans take no
value or `=true/false`. Each is also read from `FLANNELD_<NAME>` (upper case, `-` to `_`)
and the command line wins. A bad value is a UsageError naming the flag or the variable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


class UsageError(ValueError):
    """A flag or FLANNELD_* value is wrong; the message names it."""


# -- value parsers: text -> value, ValueError saying what the value must be -----------------


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


def _ipv6_or_empty(text: str) -> str:
    if text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError("must be an IPv6 address") from None
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a regular expression ({exc})") from None
    return text


def _str(text: str) -> str:
    return text


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One flag, as derived from a field of Options."""

    name: str  # without dashes: "etcd-prefix"
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeat: bool = False  # may be given several times; the values make a list
    is_bool: bool = False  # a switch: `--name` alone means true
    env_list: bool = False  # its FLANNELD_* variable is a comma list

    @property
    def attr(self) -> str:
        """The Options attribute: `etcd_prefix`."""
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable: `FLANNELD_ETCD_PREFIX`."""
        return "FLANNELD_" + self.attr.upper()


@dataclass(frozen=True)
class _Spec:
    parse: Callable[[str], Any]
    help: str
    repeat: bool = False
    is_bool: bool = False
    env_list: bool = False


_SPEC = "tweed.flag"


def value(parse: Callable[[str], T], default: T, help: str) -> T:
    """A flag that takes one value; the last one given wins."""
    return field(default=default, metadata={_SPEC: _Spec(parse, help)})


def switch(default: bool, help: str) -> bool:
    """A boolean flag: `--name`, `--name=true` or `--name=false`."""
    return field(default=default, metadata={_SPEC: _Spec(_bool, help, is_bool=True)})


def repeated(parse: Callable[[str], str], help: str, *, env_list: bool = False) -> list[str]:
    """A flag that may be given several times, in order; empty by default."""
    spec = _Spec(parse, help, repeat=True, env_list=env_list)
    return field(default_factory=list, metadata={_SPEC: spec})


@dataclass(frozen=True)
class Options:
    """The parsed settings. Each field is a flag: the name with `-` for `_`."""

    etcd_endpoints: str = value(_str, "http://127.0.0.1:4001,http://127.0.0.1:2379",
                                "comma-separated list of etcd endpoints")
    etcd_prefix: str = value(_str, "/coreos.com/network", "etcd prefix")
    etcd_keyfile: str = value(_str, "", "SSL key file used to secure etcd communication")
    etcd_certfile: str = value(_str, "",
                               "SSL certification file used to secure etcd communication")
    etcd_cafile: str = value(_str, "", "SSL CA file used to secure etcd communication")
    etcd_username: str = value(_str, "", "username for BasicAuth to etcd")
    etcd_password: str = value(_str, "", "password for BasicAuth to etcd")
    # Interface lists are comma lists in FLANNELD_IFACE; a regex may itself contain
    # commas ({m,n}), so FLANNELD_IFACE_REGEX is one regex. (`repeated` gives a field with
    # a list factory, not one shared list: RUF009 does not apply.)
    iface: list[str] = repeated(  # noqa: RUF009
        _str, "interface (name or IP) to use for inter-host traffic; repeatable", env_list=True)
    iface_regex: list[str] = repeated(  # noqa: RUF009
        _regex, "regex of interface names or IPs to pick from; repeatable")
    iface_can_reach: str = value(_ipv4_or_empty, "",
                                 "pick the interface that routes to this IP")
    public_ip: str = value(_ipv4_or_empty, "",
                           "IP accessible by other nodes for inter-host traffic")
    public_ipv6: str = value(_ipv6_or_empty, "",
                             "IPv6 accessible by other nodes for inter-host traffic")
    subnet_file: str = value(_str, "/run/flannel/subnet.env", "file the subnet env is written to")
    subnet_lease_renew_margin: int = value(
        _int_range(1, 1439), 60, "renew the lease this many minutes before it expires")
    ip_masq: bool = switch(False, "set up IP masquerade for traffic leaving the overlay")
    ip_masq_fully_random_disable: bool = switch(
        False, "do not use --random-fully in the MASQUERADE rules")
    iptables_resync: int = value(
        _int_range(1, 86400), 5, "seconds between checks that the iptables rules are in place")
    iptables_forward_rules: bool = switch(
        True, "add accept rules for the network to the FORWARD chain (FLANNEL-FWD)")
    healthz_ip: str = value(_ipv4_or_empty, "127.0.0.1", "address the health server listens on")
    # 8475: flanneld has no default (0); this one is clear of flannel's 8285/8472, etcd's,
    # the Prometheus exporter range 9100-9999 and Kubernetes' 10249-10259 (docs/metrics.md).
    healthz_port: int = value(
        _int_range(0, 65535), 8475, "port of the health and metrics server (0: off)")
    version: bool = switch(False, "print the version and exit")
    v: int = value(_int_range(0, 10), 0, "log verbosity (1 and up: debug)")
    # tweed's own flags
    subnet_lease_ttl: int = value(
        _int_range(60, 10 * 86400), 86400,
        "tweed: lifetime of the etcd lease on our subnet, in seconds")
    # Drift is repaired from kernel notifications; this full re-read is only the backstop
    # (for what no notification reports), so it can be rare: at 5,000 vxlan peers each one
    # reads 15,000 entries.
    resync_period: float = value(
        _positive_float, 300.0,
        "tweed: seconds between full re-reads of the kernel state (a backstop: changes are"
        " repaired from kernel notifications)")


def _flags() -> tuple[Flag, ...]:
    out = []
    for f in fields(Options):
        spec: _Spec = f.metadata[_SPEC]
        default = f.default if f.default_factory is MISSING else f.default_factory()
        out.append(Flag(f.name.replace("_", "-"), spec.parse, default, spec.help,
                        spec.repeat, spec.is_bool, spec.env_list))
    return tuple(out)


#: Every flag, in the order of the usage text.
FLAGS: tuple[Flag, ...] = _flags()
_BY_NAME = {f.name: f for f in FLAGS}


# -- parsing ---------------------------------------------------------------------------------


def _set(values: dict[str, Any], flag: Flag, text: str, where: str) -> None:
    try:
        parsed = flag.parse(text)
    except ValueError as exc:
        raise UsageError(f"invalid value {text!r} for {where}: {exc}") from None
    if flag.repeat:
        values.setdefault(flag.attr, []).append(parsed)
    else:
        values[flag.attr] = parsed


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
    args = iter(argv)
    for arg in args:
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
            else:
                following = next(args, None)
                if following is None:
                    raise UsageError(f"flag --{name} needs a value")
                text = following
        _set(cli, flag, text, f"--{name}")

    env: dict[str, Any] = {}
    for flag in FLAGS:
        # An empty variable is skipped, as flanneld's SetFlagsFromEnv does.
        if flag.attr in cli or not environ.get(flag.env):
            continue
        text = environ[flag.env]
        parts = [p for p in text.split(",") if p] if flag.env_list else [text]
        for part in parts:
            _set(env, flag, part, flag.env)
    return Options(**{**env, **cli})


# -- etcd ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: flanneld's --etcd-* flags, with their defaults."""

    endpoints: tuple[str, ...]
    prefix: str = Options.etcd_prefix
    keyfile: str = Options.etcd_keyfile
    certfile: str = Options.etcd_certfile
    cafile: str = Options.etcd_cafile
    username: str = Options.etcd_username
    password: str = Options.etcd_password


def etcd_settings(opts: Options) -> EtcdSettings:
    """The --etcd-* options; the endpoints list split at commas (empty items dropped)."""
    return EtcdSettings(
        endpoints=tuple(e for e in opts.etcd_endpoints.split(",") if e),
        prefix=opts.etcd_prefix, keyfile=opts.etcd_keyfile, certfile=opts.etcd_certfile,
        cafile=opts.etcd_cafile, username=opts.etcd_username, password=opts.etcd_password,
    )
