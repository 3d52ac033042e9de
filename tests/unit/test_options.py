"""Unit tests for agent.options as a table: each flag's variable, attribute and default come
from one declaration, and the etcd settings are derived from the options."""

from __future__ import annotations

import dataclasses

from agent.options import FLAGS, EtcdSettings, Options, UsageError, etcd_settings, parse_args


def test_every_option_is_a_flag_in_declaration_order() -> None:
    assert [f.attr for f in FLAGS] == [f.name for f in dataclasses.fields(Options)]
    assert len({f.name for f in FLAGS}) == len(FLAGS)


def test_variable_and_attribute_are_derived_from_the_name() -> None:
    by_name = {f.name: f for f in FLAGS}
    flag = by_name["ip-masq-fully-random-disable"]
    assert flag.env == "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE"
    assert flag.attr == "ip_masq_fully_random_disable"
    assert by_name["v"].env == "FLANNELD_V"


def test_every_flag_is_read_from_its_variable() -> None:
    samples = {"iface": "eth3", "iface-regex": "^eth", "iface-can-reach": "10.9.9.9",
               "public-ip": "10.9.9.8", "public-ipv6": "fd00::8", "healthz-ip": "10.9.9.7",
               "subnet-lease-ttl": "77"}
    for flag in FLAGS:
        if flag.is_bool:
            text = "false" if flag.default else "true"
        else:
            text = samples.get(flag.name, "7")
        opts = parse_args([], {flag.env: text})
        got = getattr(opts, flag.attr)
        assert got != flag.default, flag.name
        assert got == ([flag.parse(text)] if flag.repeat else flag.parse(text)), flag.name


def test_kinds_of_flag() -> None:
    by_name = {f.name: f for f in FLAGS}
    assert by_name["ip-masq"].is_bool and not by_name["ip-masq"].repeat
    assert by_name["iface"].repeat and by_name["iface"].env_list
    assert by_name["iface-regex"].repeat and not by_name["iface-regex"].env_list
    assert not any(f.is_bool for f in FLAGS if f.repeat)


def test_repeated_defaults_are_not_shared() -> None:
    a, b = Options(), Options()
    a.iface.append("eth0")
    assert b.iface == [] and Options().iface == []


def test_etcd_settings_defaults_are_the_flags_defaults() -> None:
    assert etcd_settings(Options()) == EtcdSettings(
        ("http://127.0.0.1:4001", "http://127.0.0.1:2379"))
    defaults = EtcdSettings(())
    opts = Options()
    for f in dataclasses.fields(EtcdSettings):
        if f.name != "endpoints":
            assert getattr(defaults, f.name) == getattr(opts, f"etcd_{f.name}"), f.name


def test_etcd_settings_take_every_etcd_flag() -> None:
    opts = parse_args([
        "--etcd-endpoints=https://a:2379,,https://b:2379,", "--etcd-prefix=/p",
        "--etcd-keyfile=k", "--etcd-certfile=c", "--etcd-cafile=ca", "--etcd-username=u",
        "--etcd-password=pw"], {})
    assert etcd_settings(opts) == EtcdSettings(
        ("https://a:2379", "https://b:2379"), "/p", "k", "c", "ca", "u", "pw")
    # Every --etcd-* flag but the endpoints has its field.
    fields = {f.name for f in dataclasses.fields(EtcdSettings)}
    assert {f.attr.removeprefix("etcd_") for f in FLAGS if f.name.startswith("etcd-")} == fields


def test_public_ipv6_flag_and_variable() -> None:
    assert parse_args(["--public-ipv6=fd00:1::2"], {}).public_ipv6 == "fd00:1::2"
    assert parse_args([], {"FLANNELD_PUBLIC_IPV6": "fd00:1::3"}).public_ipv6 == "fd00:1::3"
    for bad in ("10.0.0.1", "fd00::zz"):
        try:
            parse_args([f"--public-ipv6={bad}"], {})
        except UsageError as exc:
            assert str(exc) == (f"invalid value {bad!r} for --public-ipv6: must be an IPv6"
                                " address")
        else:
            raise AssertionError(f"--public-ipv6={bad} was taken")
