"""Unit tests for the iptables flags of agent.options: flanneld's names, defaults, environment."""

from __future__ import annotations

import pytest

from agent.options import UsageError, parse_args, usage


def test_iptables_defaults_are_flanneld_defaults() -> None:
    opts = parse_args([], {})
    assert opts.ip_masq is False
    assert opts.iptables_resync == 5
    assert opts.iptables_forward_rules is True  # flanneld installs FLANNEL-FWD by default
    assert opts.ip_masq_fully_random_disable is False


def test_iptables_flags_on_the_command_line() -> None:
    opts = parse_args(["--ip-masq", "--iptables-resync", "2", "-iptables-forward-rules=false",
                       "--ip-masq-fully-random-disable"], {})
    assert opts.ip_masq is True
    assert opts.iptables_resync == 2
    assert opts.iptables_forward_rules is False
    assert opts.ip_masq_fully_random_disable is True


def test_iptables_flags_from_the_environment_and_the_command_line_wins() -> None:
    env = {"FLANNELD_IP_MASQ": "true", "FLANNELD_IPTABLES_RESYNC": "7",
           "FLANNELD_IPTABLES_FORWARD_RULES": "false",
           "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "1"}
    opts = parse_args([], env)
    assert (opts.ip_masq, opts.iptables_resync, opts.iptables_forward_rules,
            opts.ip_masq_fully_random_disable) == (True, 7, False, True)
    opts = parse_args(["--iptables-resync=3", "--iptables-forward-rules"], env)
    assert opts.iptables_resync == 3 and opts.iptables_forward_rules is True


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_bad_resync_names_the_flag(value: str) -> None:
    with pytest.raises(UsageError, match="--iptables-resync"):
        parse_args(["--iptables-resync", value], {})
    with pytest.raises(UsageError, match="FLANNELD_IPTABLES_RESYNC"):
        parse_args([], {"FLANNELD_IPTABLES_RESYNC": value})


def test_usage_lists_the_iptables_flags() -> None:
    text = usage()
    for name in ("--iptables-resync VALUE", "--iptables-forward-rules",
                 "--ip-masq-fully-random-disable"):
        assert name in text
