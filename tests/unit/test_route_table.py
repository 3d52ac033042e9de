"""Unit tests for backends.kernel.diff: the desired-vs-kernel route diff."""

from __future__ import annotations

import ipaddress

from backends.kernel.diff import Diff, diff_routes
from backends.kernel.types import Route


def route(dst: str, gw: str | None = "192.168.100.2", oif: int = 2, onlink: bool = False) -> Route:
    return Route(
        ipaddress.IPv4Network(dst), ipaddress.IPv4Address(gw) if gw else None, oif, onlink
    )


def table(*routes: Route) -> dict[ipaddress.IPv4Network, Route]:
    return {r.dst: r for r in routes}


def everything(_r: Route) -> bool:
    return True


def nothing(_r: Route) -> bool:
    return False


def test_empty_diff_is_false() -> None:
    diff = diff_routes({}, [], everything)
    assert diff == Diff((), ())
    assert not diff


def test_missing_route_is_replaced() -> None:
    r = route("10.5.2.0/24")
    diff = diff_routes(table(r), [], everything)
    assert diff.replace == (r,)
    assert diff.delete == ()
    assert diff


def test_equal_route_is_kept() -> None:
    r = route("10.5.2.0/24")
    diff = diff_routes(table(r), [route("10.5.2.0/24")], everything)
    assert not diff


def test_route_with_other_gateway_is_replaced() -> None:
    want = route("10.5.2.0/24", "192.168.100.2")
    have = route("10.5.2.0/24", "192.168.100.9")
    diff = diff_routes(table(want), [have], everything)
    assert diff.replace == (want,)
    assert diff.delete == ()


def test_route_with_other_oif_or_onlink_is_replaced() -> None:
    want = route("10.5.2.0/24")
    for have in (route("10.5.2.0/24", oif=3), route("10.5.2.0/24", onlink=True)):
        assert diff_routes(table(want), [have], everything).replace == (want,)


def test_duplicate_routes_for_a_desired_dst_are_replaced() -> None:
    want = route("10.5.2.0/24")
    diff = diff_routes(table(want), [want, route("10.5.2.0/24", oif=3)], everything)
    assert diff.replace == (want,)


def test_owned_not_desired_is_deleted() -> None:
    stale = route("10.5.9.0/24")
    keep = route("10.5.2.0/24")
    diff = diff_routes(table(keep), [keep, stale], everything)
    assert diff.replace == ()
    assert diff.delete == (stale,)


def test_not_owned_is_never_deleted() -> None:
    foreign = [route("0.0.0.0/0", "192.168.100.254"), route("192.168.100.0/24", None)]
    diff = diff_routes({}, foreign, nothing)
    assert not diff


def test_not_owned_duplicate_at_desired_dst_is_kept() -> None:
    want = route("10.5.2.0/24")
    other = route("10.5.2.0/24", oif=3)
    diff = diff_routes(table(want), [want, other], lambda r: r.oif == 2)
    assert other not in diff.delete


def test_owned_predicate_is_per_route() -> None:
    mine = route("10.5.9.0/24")
    theirs = route("10.5.10.0/25")
    diff = diff_routes({}, [mine, theirs], lambda r: r.dst.prefixlen == 24)
    assert diff.delete == (mine,)


def test_desired_dst_is_not_deleted_even_if_different() -> None:
    want = route("10.5.2.0/24", "192.168.100.2")
    have = route("10.5.2.0/24", "192.168.100.9")
    diff = diff_routes(table(want), [have], everything)
    assert have not in diff.delete


def test_results_are_sorted() -> None:
    desired = table(route("10.5.30.0/24"), route("10.5.4.0/24"), route("10.5.100.0/24"))
    actual = [route("10.5.200.0/24"), route("10.5.7.0/24")]
    diff = diff_routes(desired, actual, everything)
    assert [str(r.dst) for r in diff.replace] == ["10.5.4.0/24", "10.5.30.0/24", "10.5.100.0/24"]
    assert [str(r.dst) for r in diff.delete] == ["10.5.7.0/24", "10.5.200.0/24"]


def test_mixed() -> None:
    keep = route("10.5.1.0/24")
    change = route("10.5.2.0/24", "192.168.100.3")
    add = route("10.5.3.0/24")
    stale = route("10.5.4.0/24")
    foreign = route("172.16.0.0/16")
    actual = [keep, route("10.5.2.0/24", "192.168.100.99"), stale, foreign]
    network = ipaddress.IPv4Network("10.5.0.0/16")
    diff = diff_routes(table(keep, change, add), actual, lambda r: r.dst.subnet_of(network))
    assert diff.replace == (change, add)
    assert diff.delete == (stale,)
