"""Unit tests for backends.external_iface: flanneld's rules for the external interface."""

from __future__ import annotations

import ipaddress

import pytest

from backends.external_iface import ExternalInterface, InterfaceError, choose_interface
from backends.kernel.types import Link


def link(name: str, index: int, *addrs: str, mtu: int = 1500) -> Link:
    return Link(name, index, mtu, True, tuple(ipaddress.IPv4Interface(a) for a in addrs))


IP = ipaddress.IPv4Address

LO = link("lo", 1, "127.0.0.1/8", mtu=65536)
ETH0 = link("eth0", 2, "169.254.3.3/16", "192.168.100.1/24", "192.168.100.50/24")
ETH1 = link("eth1", 3, "10.0.0.5/24", mtu=9000)
WLAN = link("wlan0", 4, "172.16.0.7/16", mtu=1400)
BARE = link("dummy0", 5)
LINKS = [LO, ETH0, ETH1, WLAN, BARE]


# -- --iface -----------------------------------------------------------------------------


def fields(ext: ExternalInterface) -> tuple:
    return (ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip)


def test_by_name() -> None:
    ext = choose_interface(LINKS, iface=["eth1"])
    assert fields(ext) == ("eth1", 3, 9000, IP("10.0.0.5"), IP("10.0.0.5"))


def test_by_name_skips_link_local_address() -> None:
    ext = choose_interface(LINKS, iface=["eth0"])
    assert ext.iface_addr == IP("192.168.100.1")
    assert ext.public_ip == IP("192.168.100.1")
    assert (ext.name, ext.index, ext.mtu) == ("eth0", 2, 1500)


def test_by_ip_uses_that_address() -> None:
    ext = choose_interface(LINKS, iface=["192.168.100.50"])
    assert ext.name == "eth0"
    assert ext.iface_addr == IP("192.168.100.50")
    assert ext.public_ip == IP("192.168.100.50")


def test_first_iface_that_matches_wins() -> None:
    ext = choose_interface(LINKS, iface=["eth7", "wlan0", "eth1"])
    assert ext.name == "wlan0"


def test_iface_wins_over_regex_and_default() -> None:
    ext = choose_interface(LINKS, iface=["eth1"], iface_regex=["^wlan"], default_oif=2)
    assert ext.name == "eth1"


def test_iface_nothing_matches() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS, iface=["eth7", "10.9.9.9"], default_oif=2)
    msg = str(exc.value)
    assert "--iface" in msg
    assert "eth7" in msg and "10.9.9.9" in msg


def test_iface_without_ipv4_address() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS, iface=["dummy0"])
    assert "dummy0" in str(exc.value)
    assert "IPv4" in str(exc.value)


# -- --iface-regex ---------------------------------------------------------------------


def test_regex_on_name() -> None:
    ext = choose_interface(LINKS, iface_regex=["^wl"])
    assert (ext.name, ext.iface_addr) == ("wlan0", IP("172.16.0.7"))


def test_regex_on_ip() -> None:
    ext = choose_interface(LINKS, iface_regex=[r"^10\.0\.0\."])
    assert (ext.name, ext.iface_addr) == ("eth1", IP("10.0.0.5"))


def test_regex_on_ip_picks_the_matching_address() -> None:
    ext = choose_interface(LINKS, iface_regex=[r"\.50$"])
    assert (ext.name, ext.iface_addr) == ("eth0", IP("192.168.100.50"))


def test_regex_ip_match_before_name_match() -> None:
    # eth1 (listed first) matches by name, eth0 by address: addresses are tried first.
    ext = choose_interface([ETH1, ETH0], iface_regex=[r"^192\.|^eth1$"])
    assert ext.name == "eth0"


def test_regex_name_match_needs_an_address() -> None:
    ext = choose_interface(LINKS, iface_regex=["^dummy|^eth1$"])
    assert ext.name == "eth1"


def test_regex_patterns_tried_in_order() -> None:
    ext = choose_interface(LINKS, iface_regex=["^nomatch", "^wlan", "^eth"])
    assert ext.name == "wlan0"


def test_regex_nothing_matches() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS, iface_regex=["^ppp"], default_oif=2)
    assert "--iface-regex" in str(exc.value)
    assert "^ppp" in str(exc.value)


def test_regex_only_bare_interface_matches() -> None:
    with pytest.raises(InterfaceError, match="--iface-regex"):
        choose_interface(LINKS, iface_regex=["^dummy"])


# -- can-reach / default route -----------------------------------------------------------


def test_can_reach_oif() -> None:
    ext = choose_interface(LINKS, can_reach_oif=3, default_oif=2)
    assert ext.name == "eth1"


def test_default_oif() -> None:
    ext = choose_interface(LINKS, default_oif=2)
    assert (ext.name, ext.iface_addr) == ("eth0", IP("192.168.100.1"))


def test_no_default_route() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS)
    msg = str(exc.value)
    assert "default route" in msg
    assert "--iface" in msg


def test_default_route_interface_without_address() -> None:
    with pytest.raises(InterfaceError) as exc:
        choose_interface(LINKS, default_oif=5)
    assert "dummy0" in str(exc.value)


def test_default_route_interface_vanished() -> None:
    with pytest.raises(InterfaceError, match="index 42"):
        choose_interface(LINKS, default_oif=42)


# -- --public-ip ---------------------------------------------------------------------------


def test_public_ip_overrides_advertised_address() -> None:
    ext = choose_interface(LINKS, iface=["eth1"], public_ip="203.0.113.9")
    assert ext.iface_addr == IP("10.0.0.5")
    assert ext.public_ip == IP("203.0.113.9")


def test_public_ip_with_default_route() -> None:
    ext = choose_interface(LINKS, default_oif=2, public_ip="203.0.113.9")
    assert ext.iface_addr == IP("192.168.100.1")
    assert ext.public_ip == IP("203.0.113.9")


def test_public_ip_with_regex() -> None:
    ext = choose_interface(LINKS, iface_regex=["^wlan"], public_ip="203.0.113.9")
    assert (ext.iface_addr, ext.public_ip) == (IP("172.16.0.7"), IP("203.0.113.9"))


# -- fallbacks flanneld makes (main.go: each --iface, then each --iface-regex, then
# --iface-can-reach; an entry that fails is logged and the next one is tried) ------------


def test_iface_without_address_falls_through_to_next_iface() -> None:
    ext = choose_interface(LINKS, iface=["dummy0", "eth1"])
    assert ext.name == "eth1"


def test_iface_no_match_falls_through_to_regex() -> None:
    ext = choose_interface(LINKS, iface=["eth7"], iface_regex=["^wlan"])
    assert ext.name == "wlan0"


def test_every_failed_iface_and_regex_is_named_in_order() -> None:
    with pytest.raises(InterfaceError) as info:
        choose_interface(LINKS, iface=["eth7", "dummy0"], iface_regex=["^zz", "^dummy"])
    assert str(info.value) == (
        "no usable interface: --iface eth7: no such interface or address; "
        "--iface dummy0: interface dummy0 has no IPv4 address; "
        "--iface-regex ^zz: nothing matches; --iface-regex ^dummy: nothing matches"
    )
