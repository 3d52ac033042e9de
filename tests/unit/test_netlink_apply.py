"""Unit tests for IPRouteNetlink.apply against a recording stand-in for pyroute2's IPRoute:
the calls made for each kind of change, their order, and which failures come back."""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

from backends.kernel.netlink import IPRouteNetlink
from backends.kernel.types import ChangeSet, Fdb, KernelError, Neigh, Route

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


class NetlinkError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code


class RecordingIPRoute:
    """route/neigh/fdb as IPRoute takes them; raises what `refuse` says for a call."""

    def __init__(self, refuse: dict[tuple[str, str], Exception] | None = None) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.refuse = refuse or {}

    def _call(self, kind: str, verb: str, kw: dict[str, Any]) -> None:
        self.calls.append((kind, verb, kw))
        exc = self.refuse.get((kind, verb))
        if exc is not None:
            raise exc

    def route(self, verb: str, **kw: Any) -> None:
        self._call("route", verb, kw)

    def neigh(self, verb: str, **kw: Any) -> None:
        self._call("neigh", verb, kw)

    def fdb(self, verb: str, **kw: Any) -> None:
        self._call("fdb", verb, kw)


GW = Route(NET("10.5.2.0/24"), IP("192.168.100.2"), 2)
ONLINK = Route(NET("10.5.3.0/24"), IP("10.5.3.0"), 7, onlink=True)
DEV = Route(NET("10.5.0.0/16"), None, 9)
NEIGH = Neigh(IP("10.5.3.0"), "0a:00:00:00:00:03", 7)
FDB = Fdb("0a:00:00:00:00:03", IP("192.168.100.3"), 7)


async def run(ipr: RecordingIPRoute, cs: ChangeSet) -> list[KernelError]:
    nl = IPRouteNetlink()
    nl._ipr = ipr
    try:
        return await nl.apply(cs)
    finally:
        nl._ipr = None  # nothing real to close
        await nl.close()


async def test_calls_in_order_with_their_arguments() -> None:
    ipr = RecordingIPRoute()
    cs = ChangeSet(route_replace=[ONLINK, DEV], route_delete=[GW], neigh_replace=[NEIGH],
                   neigh_delete=[NEIGH], fdb_replace=[FDB], fdb_delete=[FDB])
    assert await run(ipr, cs) == []
    neigh_kw = {"dst": "10.5.3.0", "lladdr": "0a:00:00:00:00:03", "ifindex": 7,
                "state": 0x80, "family": 2}
    fdb_kw = {"lladdr": "0a:00:00:00:00:03", "dst": "192.168.100.3", "ifindex": 7,
              "state": 0x80, "flags": 2}
    assert ipr.calls == [
        ("route", "del", {"dst": "10.5.2.0", "dst_len": 24, "oif": 2, "table": 254,
                          "proto": 3, "gateway": "192.168.100.2"}),
        ("neigh", "del", neigh_kw),
        ("fdb", "del", fdb_kw),
        ("fdb", "replace", fdb_kw),
        ("neigh", "replace", neigh_kw),
        ("route", "replace", {"dst": "10.5.3.0", "dst_len": 24, "oif": 7, "table": 254,
                              "proto": 3, "gateway": "10.5.3.0", "flags": 4}),
        ("route", "replace", {"dst": "10.5.0.0", "dst_len": 16, "oif": 9, "table": 254,
                              "proto": 3, "scope": 253}),
    ]


async def test_failures_come_back_and_the_rest_still_runs() -> None:
    ipr = RecordingIPRoute({
        ("route", "del"): NetlinkError(errno.ESRCH, "No such process"),
        ("neigh", "del"): NetlinkError(errno.ENOENT, "No such file"),
        ("fdb", "del"): NetlinkError(errno.EPERM, "Operation not permitted"),
        ("route", "replace"): NetlinkError(errno.ENETUNREACH, "Network unreachable"),
    })
    cs = ChangeSet(route_replace=[ONLINK], route_delete=[GW], neigh_replace=[NEIGH],
                   neigh_delete=[NEIGH], fdb_delete=[FDB])
    errors = await run(ipr, cs)
    # A delete of what is already gone is what was wanted: not an error.
    assert errors == [
        KernelError("fdb", "delete", FDB, "EPERM (1): (1, 'Operation not permitted')"),
        KernelError("route", "replace", ONLINK,
                    "ENETUNREACH (101): (101, 'Network unreachable')"),
    ]
    assert [(k, v) for k, v, _ in ipr.calls] == [
        ("route", "del"), ("neigh", "del"), ("fdb", "del"), ("neigh", "replace"),
        ("route", "replace")]


async def test_empty_change_set_makes_no_call() -> None:
    ipr = RecordingIPRoute()
    assert await run(ipr, ChangeSet()) == []
    assert ipr.calls == []
