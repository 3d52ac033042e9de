"""Kernel writes and reads at scale: IPRouteNetlink against `ip -batch` in the same run.

`python -m tests.bench_netlink [N ...]` (root; default 5000 20000): for each N, in fresh lab
namespaces (tests/support/netns.py) with one vxlan device each, writes N peers' entries
(route + neighbour + FDB entry, as the vxlan backend asks) three ways, REPEAT times each:
- tweed: one `IPRouteNetlink.apply` of the whole ChangeSet (batched requests);
- pyroute2, one call and one ack per entry (what tweed did before), only for N <= 5000;
- the reference: `bridge -batch` (FDB) then `ip -batch` (neighbours, routes) of the same
  entries, timed around the two processes;
and reads them back (routes via the device, neighbours, FDB entries) with tweed's filtered
dumps and with pyroute2's. Prints a markdown table of medians. A command, not a test.

The namespace's side runs in a child (`python -m tests.bench_netlink child ...` under `ip
netns exec`), which prints its timings as JSON.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from backends.kernel.types import ChangeSet, Fdb, Neigh, Route
from tests.support.netns import Lab, Namespace

REPEAT = 3
OLD_MAX = 5000  # the old way takes ~0.35 ms an entry: not at 20,000
DEV = "vx0"
ROOT = Path(__file__).resolve().parents[1]


def peers(n: int, index: int) -> ChangeSet:
    cs = ChangeSet()
    for i in range(n):
        base = (10 << 24) | ((i + 1) << 8)
        mac = f"0a:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
        cs.route_replace.append(
            Route(ipaddress.IPv4Network((base, 24)), ipaddress.IPv4Address(base), index,
                  onlink=True))
        cs.neigh_replace.append(Neigh(ipaddress.IPv4Address(base), mac, index))
        vtep = ipaddress.IPv4Address((172 << 24) | (16 << 16) | (i + 1))
        cs.fdb_replace.append(Fdb(mac, vtep, index))
    return cs


def index_of(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


# -- inside the namespace ---------------------------------------------------------------
async def _tweed(n: int) -> dict[str, float]:
    from backends.kernel.netlink import IPRouteNetlink

    index = index_of(DEV)
    cs = peers(n, index)
    nl = IPRouteNetlink()
    t0 = time.perf_counter()
    errors = await nl.apply(cs)
    t1 = time.perf_counter()
    got = (await nl.routes(index), await nl.neighbours(index), await nl.fdb_entries(index))
    t2 = time.perf_counter()
    await nl.close()
    assert not errors, errors[:3]
    assert [len(x) for x in got] == [n, n, n], [len(x) for x in got]
    return {"write": t1 - t0, "read": t2 - t1}


def _old(n: int) -> dict[str, float]:
    """The pyroute2 calls tweed made before batching, with the same arguments."""
    from pyroute2 import IPRoute

    index = index_of(DEV)
    cs = peers(n, index)
    ipr = IPRoute()
    t0 = time.perf_counter()
    for f in cs.fdb_replace:
        ipr.fdb("replace", lladdr=f.mac, dst=str(f.dst), ifindex=index, state=0x80, flags=2)
    for ne in cs.neigh_replace:
        ipr.neigh("replace", dst=str(ne.ip), lladdr=ne.mac, ifindex=index, state=0x80,
                  family=socket.AF_INET)
    for r in cs.route_replace:
        ipr.route("replace", dst=str(r.dst.network_address), dst_len=24, oif=index,
                  table=254, proto=3, gateway=str(r.gateway), flags=4)
    t1 = time.perf_counter()
    routes = list(ipr.get_routes(family=socket.AF_INET, table=254, oif=index))
    neigh = list(ipr.get_neighbours(family=socket.AF_INET, ifindex=index))
    fdb = [m for m in ipr.fdb("dump", ifindex=index) if m["ifindex"] == index]
    t2 = time.perf_counter()
    ipr.close()
    assert len(routes) >= n and len(neigh) == n and len(fdb) >= n
    return {"write": t1 - t0, "read": t2 - t1}


def child(way: str, n: int) -> None:
    out = asyncio.run(_tweed(n)) if way == "tweed" else _old(n)
    print(json.dumps(out))


# -- the parent --------------------------------------------------------------------------
def fresh(lab: Lab, tag: str) -> Namespace:
    ns = lab.add_netns(tag)
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "link", "add", DEV, "type", "vxlan", "id", "1", "dstport", "8472",
                 "local", "192.168.100.1", "nolearning"],
                ["ip", "link", "set", DEV, "up"]):
        ns.exec(cmd)
    return ns


def in_child(ns: Namespace, way: str, n: int) -> dict[str, float]:
    res = subprocess.run(["ip", "netns", "exec", ns.ns, sys.executable, "-m",
                          "tests.bench_netlink", "child", way, str(n)],
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def ip_batch(ns: Namespace, n: int, tmp: Path) -> float:
    cs = peers(n, 0)
    fdb = tmp / "fdb.batch"
    ipb = tmp / "ip.batch"
    fdb.write_text("".join(f"fdb replace {f.mac} dev {DEV} dst {f.dst} self permanent\n"
                           for f in cs.fdb_replace))
    ipb.write_text(
        "".join(f"neigh replace {ne.ip} lladdr {ne.mac} dev {DEV} nud permanent\n"
                for ne in cs.neigh_replace)
        + "".join(f"route replace {r.dst} via {r.gateway} dev {DEV} onlink proto boot\n"
                  for r in cs.route_replace))
    t0 = time.perf_counter()
    subprocess.run(["bridge", "-n", ns.ns, "-batch", str(fdb)], check=True, timeout=600)
    subprocess.run(["ip", "-n", ns.ns, "-batch", str(ipb)], check=True, timeout=600)
    return time.perf_counter() - t0


def main(sizes: list[int]) -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for n in sizes:
            got: dict[str, list[float]] = {}
            for rep in range(REPEAT):
                with Lab() as lab:
                    for way in ("tweed", "old") if n <= OLD_MAX else ("tweed",):
                        res = in_child(fresh(lab, f"{way[0]}{rep}"), way, n)
                        got.setdefault(f"{way} write", []).append(res["write"])
                        got.setdefault(f"{way} read", []).append(res["read"])
                    got.setdefault("ip -batch write", []).append(
                        ip_batch(fresh(lab, f"i{rep}"), n, tmp))
            med = {k: statistics.median(v) for k, v in got.items()}
            rows.append((n, med, got))
            print(f"N={n}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    print()
    print("| peers (entries) | tweed write s | `ip -batch` write s | ratio | "
          "pyroute2 per entry write s | tweed read s | pyroute2 read s | runs (tweed / ip) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, med, got in rows:
        old_w = f"{med['old write']:.2f}" if "old write" in med else "-"
        old_r = f"{med['old read']:.2f}" if "old read" in med else "-"
        runs = " ".join(f"{x:.2f}" for x in got["tweed write"]) + " / " + " ".join(
            f"{x:.2f}" for x in got["ip -batch write"])
        print(f"| {n:,} ({3 * n:,}) | {med['tweed write']:.2f} | "
              f"{med['ip -batch write']:.2f} | "
              f"{med['tweed write'] / med['ip -batch write']:.2f} | {old_w} | "
              f"{med['tweed read']:.3f} | {old_r} | {runs} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main([int(a) for a in sys.argv[1:]] or [5000, 20000])
