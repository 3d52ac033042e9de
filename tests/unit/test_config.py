"""Unit tests for agent.config: flanneld's rules in docs/interop.md#the-network-config."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest

from agent.allocator import OutOfSubnets, choose_subnet
from agent.config import (
    ConfigError,
    config_families,
    ignored,
    leased_families,
    parse_config,
    unsupported,
)


def cfg(**fields: object):
    return parse_config(json.dumps(fields))


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def addr(text: str):
    return ipaddress.ip_address(text)


# -- SubnetLen ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("10.0.0.0/8", 24),
        ("10.5.0.0/16", 24),
        ("10.5.0.0/22", 24),
        ("10.5.0.0/23", 25),
        ("10.5.0.0/26", 28),
        ("10.5.0.0/28", 30),
    ],
)
def test_subnet_len_default(network: str, expected: int) -> None:
    assert cfg(Network=network).subnet_len == expected


def test_subnet_len_unset_on_slash_29_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/29")
    assert "SubnetLen" in str(exc.value)


def test_subnet_len_explicit_on_slash_28_is_kept() -> None:
    assert cfg(Network="10.5.0.0/28", SubnetLen=30).subnet_len == 30


def test_subnet_len_explicit_is_kept() -> None:
    assert cfg(Network="10.5.0.0/16", SubnetLen=20).subnet_len == 20


def test_subnet_len_longer_than_30_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", SubnetLen=31)
    assert "SubnetLen" in str(exc.value)


def test_subnet_len_30_is_allowed() -> None:
    assert cfg(Network="10.5.0.0/16", SubnetLen=30).subnet_len == 30


@pytest.mark.parametrize("sublen", [17, 16, 8])
def test_fewer_than_four_subnets_is_an_error(sublen: int) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", SubnetLen=sublen)
    assert "SubnetLen" in str(exc.value)


def test_exactly_four_subnets_is_allowed() -> None:
    c = cfg(Network="10.5.0.0/16", SubnetLen=18)
    assert c.subnet_len == 18
    assert c.subnet_min == addr("10.5.64.0")
    assert c.subnet_max == addr("10.5.192.0")


# -- SubnetMin / SubnetMax -----------------------------------------------------------------


def test_subnet_min_max_defaults() -> None:
    c = cfg(Network="10.5.0.0/16")
    assert c.subnet_min == addr("10.5.1.0")  # the 2nd subnet
    assert c.subnet_max == addr("10.5.255.0")  # the last subnet


def test_subnet_min_max_defaults_small_subnets() -> None:
    c = cfg(Network="10.5.0.0/26")
    assert c.subnet_len == 28
    assert c.subnet_min == addr("10.5.0.16")
    assert c.subnet_max == addr("10.5.0.48")


def test_subnet_min_max_given() -> None:
    c = cfg(Network="10.5.0.0/16", SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    assert (c.subnet_min, c.subnet_max) == (addr("10.5.10.0"), addr("10.5.20.0"))


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_bound_outside_network(field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", **{field: "10.6.0.0"})
    assert field in str(exc.value)


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_bound_not_aligned(field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", **{field: "10.5.3.128"})
    assert field in str(exc.value)


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_bound_not_an_address(field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", **{field: "ten"})
    assert field in str(exc.value)


def test_min_above_max() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", SubnetMin="10.5.20.0", SubnetMax="10.5.10.0")
    assert "SubnetMin" in str(exc.value)


def test_min_equal_max_is_allowed() -> None:
    c = cfg(Network="10.5.0.0/16", SubnetMin="10.5.7.0", SubnetMax="10.5.7.0")
    assert c.subnet_min == c.subnet_max == addr("10.5.7.0")


# -- Network -----------------------------------------------------------------------------


def test_host_bits_masked() -> None:
    c = cfg(Network="10.5.3.7/16")
    assert c.network == net("10.5.0.0/16")
    assert c.subnet_min == addr("10.5.1.0")


def test_network_required() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(SubnetLen=24)
    assert "Network" in str(exc.value)


@pytest.mark.parametrize("value", ["10.5.0.0/33", "bogus", "fd00::/48"])
def test_network_not_ipv4_cidr(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network=value)
    assert "Network" in str(exc.value)


def test_empty_network_counts_as_absent() -> None:
    with pytest.raises(ConfigError, match="Network: required"):
        cfg(Network="")


# -- field names, Backend --------------------------------------------------------------


def test_field_names_case_insensitive() -> None:
    c = parse_config(
        '{"network":"10.7.0.0/16","subnetlen":26,"subnetmin":"10.7.0.64",'
        '"SUBNETMAX":"10.7.1.0","backend":{"type":"VXLAN","vni":4}}'
    )
    assert c.network == net("10.7.0.0/16")
    assert c.subnet_len == 26
    assert c.subnet_min == addr("10.7.0.64")
    assert c.subnet_max == addr("10.7.1.0")
    assert c.backend_type == "vxlan"
    assert c.backend["vni"] == 4


def test_absent_backend_means_udp() -> None:
    assert cfg(Network="10.5.0.0/16").backend_type == "udp"


def test_null_backend_means_udp() -> None:
    assert cfg(Network="10.5.0.0/16", Backend=None).backend_type == "udp"


def test_backend_without_type_means_udp() -> None:
    assert cfg(Network="10.5.0.0/16", Backend={"Port": 8285}).backend_type == "udp"


@pytest.mark.parametrize(("given", "expected"), [("VXLAN", "vxlan"), ("Host-GW", "host-gw")])
def test_backend_type_lower_cased(given: str, expected: str) -> None:
    assert cfg(Network="10.5.0.0/16", Backend={"Type": given}).backend_type == expected


def test_backend_options_kept_with_folded_names() -> None:
    c = cfg(Network="10.5.0.0/16", Backend={"Type": "vxlan", "VNI": 7, "DirectRouting": True})
    assert c.backend == {"type": "vxlan", "vni": 7, "directrouting": True}


def test_backend_not_an_object() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", Backend="vxlan")
    assert "Backend" in str(exc.value)


@pytest.mark.parametrize("value", [5, "", None, ["vxlan"]])
def test_backend_type_bad(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", Backend={"Type": value})
    assert "Backend.Type" in str(exc.value)


# -- IPv4 / IPv6 enablement --------------------------------------------------------------


def test_both_disabled_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", EnableIPv4=False, EnableIPv6=False)
    assert "EnableIPv4" in str(exc.value)
    assert "EnableIPv6" in str(exc.value)


def test_ipv4_default_enabled_ipv6_default_disabled() -> None:
    c = cfg(Network="10.5.0.0/16", IPv6Network="fd00::/48")
    assert c.enable_ipv4 is True
    assert c.enable_ipv6 is False
    assert c.ipv6_network is None


def test_ipv6_defaults() -> None:
    c = cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00:12:13::/48")
    assert c.ipv6_network == ipaddress.IPv6Network("fd00:12:13::/48")
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == addr("fd00:12:13:1::")
    assert c.ipv6_subnet_max == addr("fd00:12:13:ffff::")


@pytest.mark.parametrize(("prefix", "expected"), [(56, 64), (62, 64), (63, 65), (120, 122)])
def test_ipv6_subnet_len_default(prefix: int, expected: int) -> None:
    c = cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network=f"fd00::/{prefix}")
    assert c.ipv6_subnet_len == expected


def test_ipv6_only() -> None:
    c = cfg(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::/56")
    assert c.network is None
    assert c.enable_ipv4 is False
    assert c.ipv6_subnet_len == 64
    assert not c.subnet_fits(net("10.5.1.0/24"))


def test_ipv6_only_waits_naming_the_backend_that_does_not_carry_ipv6() -> None:
    c = cfg(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::/56")
    problem = unsupported(c, "host-gw", frozenset({4}))
    assert problem == ("EnableIPv4 is false (an IPv6-only network) and the host-gw backend"
                       " does not carry IPv6 yet; set EnableIPv4 to true and an IPv4 Network"
                       " to run on IPv4")
    # A backend that carries IPv6 runs it: nothing to refuse, nothing left out.
    assert unsupported(c, "x", frozenset({4, 6})) is None
    assert ignored(c, "x", frozenset({4, 6})) is None
    assert leased_families(c, frozenset({4, 6})) == {6}
    # The allocator, asked for IPv4 anyway, says so instead of an AssertionError.
    with pytest.raises(OutOfSubnets, match="no IPv4 Network"):
        choose_subnet(c, ipaddress.IPv4Address("192.168.0.1"), [], None, random.Random(1),
                      families=frozenset({4}))


def test_dual_stack_runs_on_ipv4_and_says_what_is_left_out() -> None:
    dual = cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56")
    assert unsupported(dual, "vxlan", frozenset({4})) is None
    note = ignored(dual, "vxlan", frozenset({4}))
    assert note == ("EnableIPv6: the vxlan backend does not carry IPv6 yet; only the IPv4"
                    " Network 10.5.0.0/16 is leased, the lease has no IPv6 part and"
                    " subnet.env no FLANNEL_IPV6_* lines")
    assert leased_families(dual, frozenset({4})) == {4}
    # Flipped to {4, 6}: both leased, nothing said.
    assert ignored(dual, "vxlan", frozenset({4, 6})) is None
    assert leased_families(dual, frozenset({4, 6})) == {4, 6}
    plain = cfg(Network="10.5.0.0/16")
    assert unsupported(plain) is None and ignored(plain) is None
    assert config_families(plain) == {4}


@pytest.mark.parametrize(("fields", "message"), [
    ({"EnableIPv6": True}, "IPv6Network: required when EnableIPv6 is true"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/125"},
     "IPv6SubnetLen: not set and IPv6Network fd00::/125 is too small for a default"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/64", "IPv6SubnetLen": 65},
     "IPv6SubnetLen: /65 leaves fewer than 4 subnets in IPv6Network fd00::/64"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::"},
     "IPv6SubnetMin: fd01:: is not inside fd00::/48"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00:1::"},
     "IPv6SubnetMax: fd00:1:: is not inside fd00::/48"),
    ({"EnableIPv6": True, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd00:0:0:1::1"},
     "IPv6SubnetMin: fd00:0:0:1::1 is not on a /64 boundary"),
    ({"EnableIPv6": True, "IPv6Network": "10.6.0.0/16"},
     "IPv6Network: '10.6.0.0/16' is not an IPv6 network"),
    ({"EnableIPv6": True, "IPv6Network": "::ffff:0:0/104"},
     "IPv6Network: ::ffff:0:0/104 overlaps the IPv4-mapped range ::ffff:0:0/96"),
])
def test_ipv6_config_mistakes_are_one_line_naming_the_field(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", **fields)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_ipv6_network_required_when_enabled() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", EnableIPv6=True)
    assert "IPv6Network" in str(exc.value)


def test_ipv6_network_must_be_ipv6() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="10.6.0.0/16")
    assert "IPv6Network" in str(exc.value)


def test_ipv6_subnet_len_too_short() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=57)
    assert "IPv6SubnetLen" in str(exc.value)


def test_ipv6_subnet_len_too_long() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=127)
    assert "IPv6SubnetLen" in str(exc.value)


def test_ipv6_bound_not_aligned() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(
            Network="10.5.0.0/16",
            EnableIPv6=True,
            IPv6Network="fd00::/56",
            IPv6SubnetMin="fd00:0:0:1::1",
        )
    assert "IPv6SubnetMin" in str(exc.value)


def test_ipv6_bound_must_be_ipv6() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(
            Network="10.5.0.0/16",
            EnableIPv6=True,
            IPv6Network="fd00::/56",
            IPv6SubnetMax="10.5.0.0",
        )
    assert "IPv6SubnetMax" in str(exc.value)


def test_ipv6_subnet_fits() -> None:
    c = cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56")
    assert c.ipv6_subnet_fits(ipaddress.IPv6Network("fd00:0:0:5::/64"))
    assert not c.ipv6_subnet_fits(ipaddress.IPv6Network("fd00::/64"))  # the 1st is left out
    assert not c.ipv6_subnet_fits(ipaddress.IPv6Network("fd00:0:0:5::/65"))
    assert not c.ipv6_subnet_fits(ipaddress.IPv6Network("fd00:0:1::/64"))


# -- not JSON, wrong types -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "Network: 10.5.0.0/16", b"\xff\xfe"])
def test_not_json(text: str | bytes) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(text)


@pytest.mark.parametrize("text", ["[]", '"10.5.0.0/16"', "16", "null"])
def test_not_an_object(text: str) -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config(text)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"Network": 10}, "Network"),
        ({"Network": ["10.5.0.0/16"]}, "Network"),
        ({"Network": "10.5.0.0/16", "SubnetLen": "24"}, "SubnetLen"),
        ({"Network": "10.5.0.0/16", "SubnetLen": 24.5}, "SubnetLen"),
        ({"Network": "10.5.0.0/16", "SubnetLen": True}, "SubnetLen"),
        ({"Network": "10.5.0.0/16", "SubnetMin": 167051520}, "SubnetMin"),
        ({"Network": "10.5.0.0/16", "EnableIPv4": "yes"}, "EnableIPv4"),
        ({"Network": "10.5.0.0/16", "EnableIPv6": 1}, "EnableIPv6"),
        ({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/56",
          "IPv6SubnetLen": "64"}, "IPv6SubnetLen"),
    ],
)
def test_wrong_types(fields: dict, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(**fields)
    assert str(exc.value).startswith(name)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_bytes_input_accepted() -> None:
    assert parse_config(b'{"Network":"10.5.0.0/16"}').network == net("10.5.0.0/16")


# -- subnet_fits --------------------------------------------------------------------------


def test_subnet_fits() -> None:
    c = cfg(Network="10.5.0.0/16", SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    assert c.subnet_fits(net("10.5.10.0/24"))
    assert c.subnet_fits(net("10.5.15.0/24"))
    assert c.subnet_fits(net("10.5.20.0/24"))
    assert not c.subnet_fits(net("10.5.9.0/24"))  # below SubnetMin
    assert not c.subnet_fits(net("10.5.21.0/24"))  # above SubnetMax
    assert not c.subnet_fits(net("10.5.15.0/25"))  # wrong length
    assert not c.subnet_fits(net("10.5.0.0/23"))  # wrong length
    assert not c.subnet_fits(net("10.6.15.0/24"))  # outside Network


def test_first_subnet_does_not_fit_by_default() -> None:
    c = cfg(Network="10.5.0.0/16")
    assert not c.subnet_fits(net("10.5.0.0/24"))
    assert c.subnet_fits(net("10.5.1.0/24"))
    assert c.subnet_fits(net("10.5.255.0/24"))
