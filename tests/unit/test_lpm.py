"""Unit tests for backends.udp.lpm.RouteTable: longest-prefix match, IPv4 address to value."""

from __future__ import annotations

import ipaddress
import random

import pytest

from backends.udp.lpm import RouteTable


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def addr(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def test_empty_table_misses():
    t: RouteTable[str] = RouteTable()
    assert len(t) == 0
    assert t.lookup(addr("10.0.0.1")) is None
    assert t.items() == []
    assert t.levels == []


def test_set_lookup_delete():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.1.0/24"), "a")
    assert t.lookup(addr("10.5.1.0")) == "a"
    assert t.lookup(addr("10.5.1.77")) == "a"
    assert t.lookup(addr("10.5.1.255")) == "a"
    assert t.lookup(addr("10.5.2.1")) is None
    assert t.lookup(addr("10.5.0.255")) is None
    assert len(t) == 1
    assert t.delete(net("10.5.1.0/24")) == "a"
    assert t.lookup(addr("10.5.1.77")) is None
    assert len(t) == 0


def test_set_replaces_value():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.1.0/24"), "a")
    t.set(net("10.5.1.0/24"), "b")
    assert t.lookup(addr("10.5.1.1")) == "b"
    assert len(t) == 1


def test_delete_missing_returns_none_and_keeps_others():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.1.0/24"), "a")
    assert t.delete(net("10.5.2.0/24")) is None  # same length, other subnet
    assert t.delete(net("10.5.0.0/16")) is None  # length not present
    assert t.lookup(addr("10.5.1.1")) == "a"
    assert len(t) == 1


def test_longest_prefix_wins():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.0.0/16"), "sixteen")
    t.set(net("10.5.7.0/24"), "twentyfour")
    t.set(net("10.5.7.9/32"), "host")
    assert t.lookup(addr("10.5.7.9")) == "host"
    assert t.lookup(addr("10.5.7.10")) == "twentyfour"
    assert t.lookup(addr("10.5.8.1")) == "sixteen"
    assert t.lookup(addr("10.6.0.1")) is None
    assert [mask for mask, _ in t.levels] == [0xFFFFFFFF, 0xFFFFFF00, 0xFFFF0000]


def test_insertion_order_does_not_matter():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.7.9/32"), "host")
    t.set(net("10.5.7.0/24"), "twentyfour")
    t.set(net("10.5.0.0/16"), "sixteen")
    assert t.lookup(addr("10.5.7.9")) == "host"
    assert t.lookup(addr("10.5.7.1")) == "twentyfour"
    assert t.lookup(addr("10.5.1.1")) == "sixteen"


def test_deleting_more_specific_falls_back():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.0.0/16"), "sixteen")
    t.set(net("10.5.7.0/24"), "twentyfour")
    t.delete(net("10.5.7.0/24"))
    assert t.lookup(addr("10.5.7.1")) == "sixteen"


def test_delete_last_entry_of_a_length_removes_level():
    t: RouteTable[str] = RouteTable()
    t.set(net("10.5.0.0/16"), "sixteen")
    t.set(net("10.5.7.0/24"), "a")
    t.set(net("10.5.8.0/24"), "b")
    assert len(t.levels) == 2
    t.delete(net("10.5.7.0/24"))
    assert len(t.levels) == 2  # 10.5.8.0/24 is still there
    t.delete(net("10.5.8.0/24"))
    assert [mask for mask, _ in t.levels] == [0xFFFF0000]
    assert t.lookup(addr("10.5.8.1")) == "sixteen"
    t.delete(net("10.5.0.0/16"))
    assert t.levels == []


def test_default_route():
    t: RouteTable[str] = RouteTable()
    t.set(net("0.0.0.0/0"), "default")
    assert t.lookup(addr("0.0.0.0")) == "default"
    assert t.lookup(addr("255.255.255.255")) == "default"
    t.set(net("10.0.0.0/8"), "ten")
    assert t.lookup(addr("10.1.2.3")) == "ten"
    assert t.lookup(addr("11.1.2.3")) == "default"
    assert t.delete(net("0.0.0.0/0")) == "default"
    assert t.lookup(addr("11.1.2.3")) is None


def test_items_and_len():
    t: RouteTable[int] = RouteTable()
    t.set(net("10.5.2.0/24"), 2)
    t.set(net("10.5.1.0/24"), 1)
    t.set(net("10.0.0.0/8"), 8)
    t.set(net("10.5.1.7/32"), 32)
    assert len(t) == 4
    assert t.items() == [
        (net("10.5.1.7/32"), 32),
        (net("10.5.1.0/24"), 1),
        (net("10.5.2.0/24"), 2),
        (net("10.0.0.0/8"), 8),
    ]


def test_falsy_values_are_found():
    t: RouteTable[int] = RouteTable()
    t.set(net("10.5.1.0/24"), 7)
    t.set(net("10.5.1.0/25"), 5)
    assert t.lookup(addr("10.5.1.1")) == 5
    assert t.lookup(addr("10.5.1.200")) == 7


def test_matches_brute_force():
    rng = random.Random(7)
    t: RouteTable[int] = RouteTable()
    ref: dict[ipaddress.IPv4Network, int] = {}
    for i in range(300):
        plen = rng.choice([8, 16, 20, 24, 24, 24, 28, 32])
        subnet = ipaddress.IPv4Network((rng.getrandbits(32) & 0x0A0FFFFF | 0x0A000000, plen),
                                       strict=False)
        if subnet in ref and rng.random() < 0.5:
            assert t.delete(subnet) == ref.pop(subnet)
        else:
            t.set(subnet, i)
            ref[subnet] = i
    assert len(t) == len(ref)
    assert sorted(t.items(), key=lambda kv: (kv[0].prefixlen, kv[0])) == sorted(
        ref.items(), key=lambda kv: (kv[0].prefixlen, kv[0]))
    for _ in range(3_000):
        a = rng.getrandbits(32) & 0x0A0FFFFF | 0x0A000000
        ip = ipaddress.IPv4Address(a)
        matches = [n for n in ref if ip in n]
        want = ref[max(matches, key=lambda n: n.prefixlen)] if matches else None
        assert t.lookup(a) == want


# -- IPv6 (width 128) ---------------------------------------------------------------------
def net6(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


def addr6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


def test_v6_edges_zero_64_128():
    t: RouteTable[str] = RouteTable(128)
    t.set(net6("::/0"), "default")
    t.set(net6("fd00:5:2::/64"), "sixty-four")
    t.set(net6("fd00:5:2::7/128"), "host")
    assert t.lookup(addr6("fd00:5:2::7")) == "host"
    assert t.lookup(addr6("fd00:5:2::6")) == "sixty-four"
    assert t.lookup(addr6("fd00:5:2:0:ffff:ffff:ffff:ffff")) == "sixty-four"
    assert t.lookup(addr6("fd00:5:2:1::")) == "default"
    assert t.lookup(addr6("::")) == "default"
    assert t.lookup((1 << 128) - 1) == "default"
    assert [m for m, _ in t.levels] == [(1 << 128) - 1, ((1 << 64) - 1) << 64, 0]
    assert t.delete(net6("fd00:5:2::7/128")) == "host"
    assert t.lookup(addr6("fd00:5:2::7")) == "sixty-four"
    assert t.delete(net6("::/0")) == "default"
    assert t.lookup(addr6("fd00:5:2:1::")) is None
    assert t.items() == [(net6("fd00:5:2::/64"), "sixty-four")]


def test_a_table_holds_one_family():
    t4: RouteTable[str] = RouteTable()
    t6: RouteTable[str] = RouteTable(128)
    with pytest.raises(ValueError, match="not an IPv4"):
        t4.set(net6("fd00::/64"), "x")
    with pytest.raises(ValueError, match="not an IPv6"):
        t6.delete(net("10.0.0.0/8"))
    with pytest.raises(ValueError):
        RouteTable(64)


def test_v6_random_against_a_linear_scan():
    rng = random.Random(14)
    t: RouteTable[int] = RouteTable(128)
    ref: dict[ipaddress.IPv6Network, int] = {}
    base = addr6("fd00::")
    for i in range(600):
        plen = rng.choice([0, 1, 48, 56, 63, 64, 65, 100, 127, 128])
        a = base | rng.getrandbits(24) << 80 | rng.getrandbits(64)
        n = ipaddress.IPv6Network((a, plen), strict=False)
        if rng.random() < 0.25 and ref:
            gone = rng.choice(sorted(ref))
            assert t.delete(gone) == ref.pop(gone)
        t.set(n, i)
        ref[n] = i
    for _ in range(2000):
        probe = base | rng.getrandbits(24) << 80 | rng.getrandbits(64)
        if rng.random() < 0.5:  # next to a subnet's edge
            n = rng.choice(sorted(ref))
            probe = int(n.network_address) + rng.choice([0, n.num_addresses - 1])
        hits = [n for n in ref if int(n.network_address) == probe & int(n.netmask)]
        want = ref[max(hits, key=lambda n: n.prefixlen)] if hits else None
        assert t.lookup(probe) == want
    assert len(t) == len(ref)
