"""Unit tests for agent.options and agent.cli: Go-style flags, FLANNELD_* environment, usage
errors, exit codes."""

from __future__ import annotations

import os

import pytest

from agent import __version__, options
from agent.cli import main
from agent.options import Options, UsageError, parse_args


def parse(*argv: str, **env: str) -> Options:
    return parse_args(list(argv), env)


# -- defaults ------------------------------------------------------------------------------


def test_defaults_match_flanneld() -> None:
    opts = parse()
    assert opts.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert opts.etcd_prefix == "/coreos.com/network"
    assert opts.subnet_file == "/run/flannel/subnet.env"
    assert opts.subnet_lease_renew_margin == 60
    assert opts.ip_masq is False
    assert opts.iface == []
    assert opts.iface_regex == []
    assert opts.public_ip == ""
    assert opts.version is False
    assert opts == Options()


def test_flag_defaults_agree_with_options_defaults() -> None:
    defaults = Options()
    for flag in options.FLAGS:
        assert getattr(defaults, flag.name.replace("-", "_")) == flag.default, flag.name


# -- flag syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["-iface", "eth0"], ["--iface", "eth0"], ["--iface=eth0"], ["-iface=eth0"]],
)
def test_go_style_flag_syntax(argv: list[str]) -> None:
    assert parse(*argv).iface == ["eth0"]


def test_repeatable_iface_keeps_order() -> None:
    assert parse("--iface", "eth1", "-iface=10.0.0.5", "--iface", "eth0").iface == [
        "eth1",
        "10.0.0.5",
        "eth0",
    ]


def test_repeatable_iface_regex() -> None:
    assert parse("--iface-regex", "^eth", "--iface-regex=^10\\.").iface_regex == ["^eth", "^10\\."]


def test_bool_flag_without_value() -> None:
    assert parse("--ip-masq").ip_masq is True
    assert parse("-ip-masq").ip_masq is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("false", False), ("true", True), ("0", False), ("1", True), ("F", False), ("T", True)],
)
def test_bool_flag_with_value(text: str, expected: bool) -> None:
    assert parse(f"--ip-masq={text}").ip_masq is expected


def test_bool_flag_does_not_take_next_argument() -> None:
    opts = parse("--ip-masq", "--iface", "eth0")
    assert opts.ip_masq is True
    assert opts.iface == ["eth0"]


def test_value_flags() -> None:
    opts = parse(
        "--etcd-endpoints=http://10.0.0.1:2379",
        "--etcd-prefix",
        "/my/net",
        "--subnet-file",
        "/tmp/s.env",
        "--subnet-lease-renew-margin=5",
        "--public-ip",
        "192.168.1.9",
        "--healthz-port",
        "8471",
        "--iface-can-reach=8.8.8.8",
    )
    assert opts.etcd_endpoints == "http://10.0.0.1:2379"
    assert opts.etcd_prefix == "/my/net"
    assert opts.subnet_file == "/tmp/s.env"
    assert opts.subnet_lease_renew_margin == 5
    assert opts.public_ip == "192.168.1.9"
    assert opts.healthz_port == 8471
    assert opts.iface_can_reach == "8.8.8.8"


def test_value_with_equals_sign_kept_whole() -> None:
    assert parse("--etcd-password=a=b").etcd_password == "a=b"


def test_later_flag_wins() -> None:
    assert parse("--etcd-prefix=/a", "--etcd-prefix=/b").etcd_prefix == "/b"


@pytest.mark.parametrize("margin", ["1", "1439"])
def test_renew_margin_bounds_accepted(margin: str) -> None:
    assert parse(f"--subnet-lease-renew-margin={margin}").subnet_lease_renew_margin == int(margin)


# -- environment -------------------------------------------------------------------------


def test_env_is_used() -> None:
    opts = parse(
        FLANNELD_ETCD_PREFIX="/env/net",
        FLANNELD_IP_MASQ="true",
        FLANNELD_SUBNET_LEASE_RENEW_MARGIN="30",
        FLANNELD_PUBLIC_IP="10.1.1.1",
    )
    assert opts.etcd_prefix == "/env/net"
    assert opts.ip_masq is True
    assert opts.subnet_lease_renew_margin == 30
    assert opts.public_ip == "10.1.1.1"


def test_command_line_wins_over_env() -> None:
    opts = parse(
        "--etcd-prefix=/cli",
        "--ip-masq=false",
        "--iface",
        "eth9",
        FLANNELD_ETCD_PREFIX="/env",
        FLANNELD_IP_MASQ="true",
        FLANNELD_IFACE="eth0,eth1",
    )
    assert opts.etcd_prefix == "/cli"
    assert opts.ip_masq is False
    assert opts.iface == ["eth9"]


def test_env_iface_comma_list() -> None:
    assert parse(FLANNELD_IFACE="eth0,10.0.0.5,,eth1").iface == ["eth0", "10.0.0.5", "eth1"]


def test_unrelated_env_ignored() -> None:
    assert parse(FLANNEL_ETCD_PREFIX="/nope", ETCD_PREFIX="/nope").etcd_prefix == (
        "/coreos.com/network"
    )


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(UsageError) as exc:
        parse(FLANNELD_SUBNET_LEASE_RENEW_MARGIN="0")
    assert "FLANNELD_SUBNET_LEASE_RENEW_MARGIN" in str(exc.value)


def test_empty_env_value_is_ignored() -> None:
    opts = parse(
        FLANNELD_HEALTHZ_PORT="",
        FLANNELD_SUBNET_LEASE_RENEW_MARGIN="",
        FLANNELD_ETCD_PREFIX="",
    )
    assert opts.healthz_port == 8475
    assert opts.subnet_lease_renew_margin == 60
    assert opts.etcd_prefix == "/coreos.com/network"


def test_bad_env_value_ignored_when_flag_given() -> None:
    opts = parse("--subnet-lease-renew-margin=3", FLANNELD_SUBNET_LEASE_RENEW_MARGIN="0")
    assert opts.subnet_lease_renew_margin == 3


# -- usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--subnet-lease-renew-margin", "0"], "--subnet-lease-renew-margin"),
        (["--subnet-lease-renew-margin=1440"], "--subnet-lease-renew-margin"),
        (["--subnet-lease-renew-margin=soon"], "--subnet-lease-renew-margin"),
        (["--healthz-port", "http"], "--healthz-port"),
        (["--healthz-port=65536"], "--healthz-port"),
        (["--public-ip", "1.2.3"], "--public-ip"),
        (["--public-ip=fd00::1"], "--public-ip"),
        (["--iface-can-reach=nowhere"], "--iface-can-reach"),
        (["--iface-regex", "(eth"], "--iface-regex"),
        (["--ip-masq=maybe"], "--ip-masq"),
        (["--bogus"], "--bogus"),
        (["--etcd-prefix"], "--etcd-prefix"),  # no value left
    ],
)
def test_usage_error_names_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_args(argv, {})
    assert flag in str(exc.value)


def test_unknown_flag_message() -> None:
    with pytest.raises(UsageError, match="unknown flag --bogus"):
        parse("-bogus=1")


def test_positional_argument_rejected() -> None:
    with pytest.raises(UsageError, match="unexpected argument 'eth0'"):
        parse("eth0")


def test_usage_error_is_value_error() -> None:
    assert issubclass(UsageError, ValueError)


# -- main ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--subnet-lease-renew-margin", "0"],
        ["--subnet-lease-renew-margin=1440"],
        ["--healthz-port=x"],
        ["--public-ip=999.1.1.1"],
        ["--iface-regex=["],
        ["--no-such-flag"],
        ["stray"],
    ],
)
def test_main_bad_usage_exit_2_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("FLANNELD_")]:
        monkeypatch.delenv(var)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert err.endswith("\n")
    assert lines[0].startswith("tweed: ")


def test_main_bad_usage_names_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--subnet-lease-renew-margin=1440"]) == 2
    assert "--subnet-lease-renew-margin" in capsys.readouterr().err


def test_main_bad_env_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLANNELD_HEALTHZ_PORT", "abc")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "FLANNELD_HEALTHZ_PORT" in err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).strip() == __version__  # flanneld writes it to stderr, tweed to stdout


def test_main_version_single_dash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-version"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).strip() == __version__


def test_main_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--subnet-lease-renew-margin" in out
    assert "FLANNELD_" in out


def test_health_server_defaults_to_loopback_port_8475_and_0_turns_it_off() -> None:
    opts = parse()
    assert (opts.healthz_ip, opts.healthz_port) == ("127.0.0.1", 8475)
    assert parse("--healthz-port=0").healthz_port == 0
    assert parse(FLANNELD_HEALTHZ_PORT="0").healthz_port == 0
