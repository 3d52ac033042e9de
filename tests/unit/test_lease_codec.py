"""Unit tests for agent.lease_codec: flanneld's subnet keys and lease JSON, byte for byte."""

from __future__ import annotations

import ipaddress

import pytest

from agent.lease_codec import (
    LeaseAttrs,
    LeaseDecodeError,
    SubnetKey,
    decode_lease,
    encode_lease,
    format_subnet_key,
    parse_subnet_key,
)

IP = ipaddress.IPv4Address("192.168.100.1")

VXLAN = (
    b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
)
UDP = b'{"PublicIP":"192.168.100.1","PublicIPv6":null}'
HOSTGW = b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"host-gw"}'


# -- encode ------------------------------------------------------------------------------


def test_encode_vxlan_is_flanneld_bytes() -> None:
    attrs = LeaseAttrs(IP, None, "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    assert encode_lease(attrs) == VXLAN


def test_encode_udp_is_flanneld_bytes() -> None:
    assert encode_lease(LeaseAttrs(IP)) == UDP


def test_encode_hostgw_is_flanneld_bytes() -> None:
    assert encode_lease(LeaseAttrs(IP, None, "host-gw", None)) == HOSTGW


def test_encode_wireguard() -> None:
    attrs = LeaseAttrs(IP, None, "wireguard", {"PublicKey": "abc+/=="})
    assert encode_lease(attrs) == (
        b'{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"wireguard",'
        b'"BackendData":{"PublicKey":"abc+/=="}}'
    )


def test_encode_with_public_ipv6() -> None:
    attrs = LeaseAttrs(IP, ipaddress.IPv6Address("fd00::1"), "host-gw")
    assert encode_lease(attrs) == (
        b'{"PublicIP":"192.168.100.1","PublicIPv6":"fd00::1","BackendType":"host-gw"}'
    )


def test_encode_returns_bytes() -> None:
    assert isinstance(encode_lease(LeaseAttrs(IP)), bytes)


# -- decode ------------------------------------------------------------------------------


def test_decode_vxlan() -> None:
    attrs = decode_lease(VXLAN)
    assert attrs == LeaseAttrs(IP, None, "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})


def test_decode_udp() -> None:
    attrs = decode_lease(UDP)
    assert attrs == LeaseAttrs(IP, None, "", None)


def test_decode_hostgw() -> None:
    assert decode_lease(HOSTGW) == LeaseAttrs(IP, None, "host-gw", None)


def test_decode_accepts_str() -> None:
    assert decode_lease(HOSTGW.decode()) == LeaseAttrs(IP, None, "host-gw", None)


@pytest.mark.parametrize("value", [VXLAN, UDP, HOSTGW])
def test_round_trip_bytes(value: bytes) -> None:
    assert encode_lease(decode_lease(value)) == value


def test_decode_lower_case_field_names() -> None:
    attrs = decode_lease(
        b'{"publicip":"10.0.0.9","publicipv6":"fd00::9","backendtype":"vxlan",'
        b'"backenddata":{"VNI":2}}'
    )
    assert attrs.public_ip == ipaddress.IPv4Address("10.0.0.9")
    assert attrs.public_ipv6 == ipaddress.IPv6Address("fd00::9")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 2}


def test_decode_without_public_ipv6() -> None:
    assert decode_lease(b'{"PublicIP":"192.168.100.1"}').public_ipv6 is None


def test_decode_empty_public_ipv6_is_none() -> None:
    assert decode_lease(b'{"PublicIP":"192.168.100.1","PublicIPv6":""}').public_ipv6 is None


def test_decode_ignores_unknown_fields() -> None:
    attrs = decode_lease(b'{"PublicIP":"192.168.100.1","Extra":1}')
    assert attrs == LeaseAttrs(IP)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b'{"PublicIP":',
        b"\xff\xfe",
    ],
)
def test_decode_not_json(value: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="not JSON"):
        decode_lease(value)


@pytest.mark.parametrize("value", [b"[]", b'"192.168.100.1"', b"null", b"1"])
def test_decode_not_object(value: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="not a JSON object"):
        decode_lease(value)


@pytest.mark.parametrize(
    "value",
    [
        b"{}",
        b'{"PublicIPv6":null}',
        b'{"PublicIP":null}',
        b'{"PublicIP":""}',
        b'{"PublicIP":"192.168.100"}',
        b'{"PublicIP":"300.1.1.1"}',
        b'{"PublicIP":"fd00::1"}',
        b'{"PublicIP":["192.168.100.1"]}',
    ],
)
def test_decode_bad_public_ip(value: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="PublicIP"):
        decode_lease(value)


@pytest.mark.parametrize("value", [b'{"PublicIP":3232261121}', b'{"PublicIP":true}'])
def test_decode_non_string_public_ip(value: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="PublicIP"):
        decode_lease(value)


@pytest.mark.parametrize(
    "v6", [b'"192.168.100.1"', b'"fd00::zz"', b'"bogus"', b"[1]"]
)
def test_decode_bad_public_ipv6(v6: bytes) -> None:
    with pytest.raises(LeaseDecodeError, match="PublicIPv6"):
        decode_lease(b'{"PublicIP":"192.168.100.1","PublicIPv6":' + v6 + b"}")


def test_decode_non_string_public_ipv6() -> None:
    with pytest.raises(LeaseDecodeError, match="PublicIPv6"):
        decode_lease(b'{"PublicIP":"192.168.100.1","PublicIPv6":5}')


def test_decode_bad_backend_type() -> None:
    with pytest.raises(LeaseDecodeError, match="BackendType"):
        decode_lease(b'{"PublicIP":"192.168.100.1","BackendType":5}')


def test_decode_error_is_value_error() -> None:
    assert issubclass(LeaseDecodeError, ValueError)


# -- subnet keys -------------------------------------------------------------------------


def test_parse_v4_key() -> None:
    key = parse_subnet_key("10.5.30.0-24")
    assert key == SubnetKey(ipaddress.IPv4Network("10.5.30.0/24"), None)


def test_parse_dual_stack_key() -> None:
    key = parse_subnet_key("10.5.30.0-24&fd00:12:13::-56")
    assert key.ipv4 == ipaddress.IPv4Network("10.5.30.0/24")
    assert key.ipv6 == ipaddress.IPv6Network("fd00:12:13::/56")


@pytest.mark.parametrize(
    "name", ["10.5.30.0-24", "10.5.30.0-24&fd00:12:13::-56", "10.5.0.128-25", "0.0.0.0-0"]
)
def test_key_round_trip(name: str) -> None:
    key = parse_subnet_key(name)
    assert format_subnet_key(key) == name
    assert str(key) == name


def test_format_key() -> None:
    key = SubnetKey(ipaddress.IPv4Network("10.5.72.0/24"))
    assert format_subnet_key(key) == "10.5.72.0-24"
    dual = SubnetKey(ipaddress.IPv4Network("10.5.72.0/24"), ipaddress.IPv6Network("fd00:1::/64"))
    assert format_subnet_key(dual) == "10.5.72.0-24&fd00:1::-64"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "bogus",
        "10.5.30.1-24",  # host bits
        "10.5.30.0-33",
        "300.1.1.0-24",
        "10.5.30.0/24",
        "10.5.30.0-",
        "10.5.30-24",
        "10.5.30.0-24&",
        "10.5.30.0-24&fd00:12:13::1-56",  # v6 host bits
        "10.5.30.0-24&fd00:12:13::-129",
        "10.5.30.0-24&fd00:12:13::",
        " 10.5.30.0-24",
        "10.5.30.0-24 ",
        "config",
    ],
)
def test_bad_keys(name: str) -> None:
    with pytest.raises(LeaseDecodeError):
        parse_subnet_key(name)


def test_key_with_trailing_newline_is_bad() -> None:
    with pytest.raises(LeaseDecodeError):
        parse_subnet_key("10.5.30.0-24\n")


def test_bad_key_message_names_the_key() -> None:
    with pytest.raises(LeaseDecodeError) as exc:
        parse_subnet_key("10.5.30.1-24")
    assert "10.5.30.1-24" in str(exc.value)


def test_subnet_keys_order_by_address() -> None:
    keys = [parse_subnet_key(n) for n in ["10.5.30.0-24", "10.5.4.0-24", "10.5.100.0-24"]]
    assert [str(k) for k in sorted(keys)] == ["10.5.4.0-24", "10.5.30.0-24", "10.5.100.0-24"]
