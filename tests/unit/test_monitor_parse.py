"""The monitor's cheap handling of route notifications (backends.kernel.monitor): networks
built from integers equal the stdlib's own, route events keep their raw fields, and the echo
of a route the plan wrote is known from them without making a Route."""

from __future__ import annotations

import ipaddress
import random
import socket
from itertools import islice

import pytest
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from backends.kernel.monitor import (
    Desired,
    KernelEvent,
    RawRoute,
    drifted,
    network,
    parse,
    written_index,
)
from backends.kernel.types import Route

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def route_msg(kind: int, dst: str, dst_len: int, oif: int, gw: str | None = None) -> bytes:
    """A route notification as pyroute2 encodes it (an encoder independent of ours)."""
    m = rtmsg()
    m["family"], m["dst_len"], m["table"], m["type"] = socket.AF_INET, dst_len, 254, 1
    m["attrs"] = [("RTA_TABLE", 254), ("RTA_DST", dst), ("RTA_OIF", oif)]
    if gw is not None:
        m["attrs"].append(("RTA_GATEWAY", gw))
    m["header"]["type"] = kind
    m.encode()
    return bytes(m.data)


def test_network_equals_the_constructors_in_every_attribute() -> None:
    rng = random.Random(5)
    for plen in range(33):
        for _ in range(50):
            addr = rng.getrandbits(32) & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            fast, slow = network(addr, plen), NET((addr, plen))
            assert vars(fast).keys() == vars(slow).keys()
            assert fast == slow and hash(fast) == hash(slow) and str(fast) == str(slow)
            assert fast.prefixlen == plen and fast.netmask == slow.netmask
            assert fast.broadcast_address == slow.broadcast_address
            assert fast.subnet_of(NET("0.0.0.0/0"))
            assert list(islice(fast.hosts(), 3)) == list(islice(slow.hosts(), 3))
            assert {slow: 1}[fast] == 1


def test_network_refuses_host_bits_as_the_constructor_does() -> None:
    with pytest.raises(ValueError):
        network(int(IP("10.5.3.1")), 24)


def test_a_route_event_makes_its_route_only_when_asked() -> None:
    [ev] = parse(route_msg(24, "10.5.3.0", 24, 4, "192.168.100.3"))
    assert ev.raw == RawRoute(int(IP("10.5.3.0")), 24, int(IP("192.168.100.3")), 4, False)
    assert ev.entry == Route(NET("10.5.3.0/24"), IP("192.168.100.3"), 4)
    assert ev == KernelEvent("new", Route(NET("10.5.3.0/24"), IP("192.168.100.3"), 4))
    [dev] = parse(route_msg(25, "10.5.0.0", 16, 9))
    assert dev.entry == Route(NET("10.5.0.0/16"), None, 9) and dev.op == "del"


def test_a_route_with_host_bits_is_left_out() -> None:
    assert parse(route_msg(24, "10.5.3.7", 24, 4, "192.168.100.3")) == []


ROUTES = [Route(NET(f"10.5.{i}.0/24"), IP(f"192.168.100.{i}"), 4) for i in range(1, 6)]


def want_with_written() -> Desired:
    want = Desired({r.dst: r for r in ROUTES}, lambda r: r.oif == 4)
    want.written = written_index(ROUTES)
    return want


def test_the_echo_of_a_written_route_is_known_without_making_a_route() -> None:
    want = want_with_written()
    events = [e for r in ROUTES for e in parse(route_msg(
        24, str(r.dst.network_address), 24, 4, str(r.gateway)))]
    assert [drifted(e, want) for e in events] == [False] * len(ROUTES)
    assert all(e._entry is None for e in events)  # no Route was made
    assert want.written is None  # every echo came back: the index is gone


def test_a_route_unlike_the_written_one_is_judged_as_before() -> None:
    want = want_with_written()
    r = ROUTES[0]
    [other] = parse(route_msg(24, str(r.dst.network_address), 24, 4, "192.168.100.99"))
    assert drifted(other, want)  # changed behind our back
    assert want.written is not None and len(want.written) == len(ROUTES)  # echo still due
    [gone] = parse(route_msg(25, str(r.dst.network_address), 24, 4, str(r.gateway)))
    assert drifted(gone, want)  # a deletion is never an echo of a write
    [echo] = parse(route_msg(24, str(r.dst.network_address), 24, 4, str(r.gateway)))
    assert not drifted(echo, want)
    assert len(want.written) == len(ROUTES) - 1


def test_without_a_written_index_echoes_compare_with_the_desired_table() -> None:
    want = Desired({r.dst: r for r in ROUTES}, lambda r: r.oif == 4)
    r = ROUTES[2]
    [echo] = parse(route_msg(24, str(r.dst.network_address), 24, 4, str(r.gateway)))
    assert not drifted(echo, want) and echo._entry is not None
    [stray] = parse(route_msg(24, "10.5.77.0", 24, 4, "192.168.100.7"))
    assert drifted(stray, want)  # an owned route we do not want
