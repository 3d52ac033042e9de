"""One KernelSync.sync after a one-peer change, with N vxlan peers, with and without the
KernelView cache: what each batch of lease changes costs the agent in the kernel.

`python -m tests.bench_sync [N ...]` (root; default 5000): in a fresh lab namespace
(tests/support/netns.py) with one vxlan device, a KernelSync over the real netlink with a
plan shaped like the vxlan backend's (routes via the device and via the underlay device,
neighbours, FDB entries, diffed) programs N peers; then REPEAT times a peer's VTEP changes
and one sync is timed, first reading the kernel each time (the view disabled: tweed
before the cache), then with the view enabled (as while the kernel monitor runs). Prints
medians in ms, of the whole sync and of its reads alone. A command, not a test; the
namespace's side runs in a child under `ip netns exec`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from backends.kernel.types import ChangeSet, Fdb, Neigh, Route

REPEAT = 20
DEV, EXT = "vx0", "ul0"
ROOT = Path(__file__).resolve().parents[1]


def index_of(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


async def _child(n: int) -> dict[str, list[float]]:
    from backends.kernel.diff import diff_entries, diff_routes
    from backends.kernel.netlink import IPRouteNetlink
    from backends.kernel.sync import KernelSync

    dev, ext = index_of(DEV), index_of(EXT)
    vtep = {i: (172 << 24) | (16 << 16) | (i + 1) for i in range(n)}
    nl = IPRouteNetlink()
    reads: list[float] = []

    async def plan() -> ChangeSet:
        routes, neigh, fdb = {}, {}, {}
        for i, v in vtep.items():
            base = (10 << 24) | ((i + 1) << 8)
            mac = f"0a:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
            gw = ipaddress.IPv4Address(base)
            routes[ipaddress.IPv4Network((base, 24))] = Route(
                ipaddress.IPv4Network((base, 24)), gw, dev, onlink=True)
            neigh[gw] = Neigh(gw, mac, dev)
            fdb[mac] = Fdb(mac, ipaddress.IPv4Address(v), dev)
        t0 = time.perf_counter()
        actual = await sync.view.routes(dev)
        actual += await sync.view.routes(ext)
        have_neigh = await sync.view.neighbours(dev)
        have_fdb = await sync.view.fdb_entries(dev)
        reads.append(time.perf_counter() - t0)
        rd = diff_routes(routes, actual, lambda r: r.oif == dev)
        nd = diff_entries(neigh, have_neigh, lambda x: x.ip, lambda x: True)
        fd = diff_entries(fdb, have_fdb, lambda x: x.mac, lambda x: True)
        return ChangeSet(list(rd.replace), list(rd.delete), list(nd.replace),
                         list(nd.delete), list(fd.replace), list(fd.delete))

    sync = KernelSync(nl, plan, 3600.0)
    await sync.sync()
    out: dict[str, list[float]] = {}
    for way in ("dump", "cached"):
        sync.view.enabled = way == "cached"
        sync.view.invalidate()
        await sync.sync()  # the cache's first (real) read
        for r in range(REPEAT):
            vtep[r] += 1 << 12  # one peer's VTEP changed: one FDB entry to replace
            t0 = time.perf_counter()
            changed = await sync.sync()
            out.setdefault(way, []).append(time.perf_counter() - t0)
            out.setdefault(f"{way} read", []).append(reads[-1])
            assert changed and sync.ready()
    assert sync.view.hits > 0
    await nl.close()
    return out


def main(sizes: list[int]) -> None:
    from tests.support.netns import Lab

    print("| peers | sync, kernel dumped ms (of which reads) "
          "| sync, cached view ms (of which reads) |")
    print("|---:|---:|---:|")
    for n in sizes:
        with Lab() as lab:
            ns = lab.add_netns("s0")
            for cmd in (["ip", "link", "set", "lo", "up"],
                        ["ip", "link", "add", EXT, "type", "veth", "peer", "name", "ul1"],
                        ["ip", "link", "set", EXT, "up"],
                        ["ip", "link", "add", DEV, "type", "vxlan", "id", "1", "dstport",
                         "8472", "local", "192.168.100.1", "nolearning"],
                        ["ip", "link", "set", DEV, "up"]):
                ns.exec(cmd)
            res = subprocess.run(["ip", "netns", "exec", ns.ns, sys.executable, "-m",
                                  "tests.bench_sync", "child", str(n)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 timeout=600)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        med = {k: 1000 * statistics.median(v) for k, v in got.items()}
        print(f"| {n:,} | {med['dump']:.1f} ({med['dump read']:.1f}) "
              f"| {med['cached']:.1f} ({med['cached read']:.2f}) |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(asyncio.run(_child(int(sys.argv[2])))))
    else:
        main([int(a) for a in sys.argv[1:]] or [5000])
