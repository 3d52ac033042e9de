"""`make bench`: container-to-container throughput and latency for each backend, in one run.

For udp (the python datapath, and the C one in each offload mode), vxlan, host-gw and a
plain veth pair, on the same machine in the same run: iperf3 TCP (median of RUNS runs of
SECONDS s), its retransmits (and their share of the segments sent), and ping RTT (median
of 200 at 5 ms). Ratios are against vxlan measured in this run, so a noisy shared machine
shifts all rows together. A command, not a test: nothing here can fail on a number.
`python -m tests.bench_plot` draws the results as docs/benchmarks.svg.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.lab.agents import Agent, put_config, wait_for
from tests.support.netns import Lab

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))


def measure(client, server_ip: str, server, mss: int = 1420) -> dict:
    rates, retrans, segments = [], [], []
    for _ in range(RUNS):
        srv = server.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        out = client.exec(["iperf3", "-c", server_ip, "-t", str(SECONDS), "-J"],
                          timeout=SECONDS + 60).stdout
        srv.wait(timeout=30)
        end = json.loads(out)["end"]
        rates.append(end["sum_received"]["bits_per_second"] / 1e9)
        retrans.append(end["sum_sent"].get("retransmits", 0))
        # iperf3 does not count segments: bytes sent over the MSS is close enough for a
        # retransmit percentage.
        segments.append(end["sum_sent"]["bytes"] / mss)
    res = client.exec(["ping", "-c", "200", "-i", "0.005", "-W", "2", server_ip],
                      check=False, timeout=60).stdout
    rtts = [float(line.split("time=")[1].split()[0]) for line in res.splitlines()
            if "time=" in line]
    pct = [100 * r / s for r, s in zip(retrans, segments, strict=True) if s]
    return {
        "gbps": statistics.median(rates), "gbps_runs": rates,
        "retransmits": statistics.median(retrans), "retransmits_runs": retrans,
        "retransmit_pct": statistics.median(pct) if pct else float("nan"),
        "rtt_ms": statistics.median(rtts) if rtts else float("nan"),
        "ping_received": len(rtts),
    }


def overlay(backend: str, **options: object) -> dict:
    lab = Lab()
    try:
        with tempfile.TemporaryDirectory(prefix="tweed-bench-") as tmp:
            etcd = lab.start_etcd()
            put_config(etcd, backend=backend, **options)
            containers = []
            for i in (1, 2):
                host = lab.add_host(i)
                agent = Agent(host, etcd.client_url, Path(tmp)).start()
                e = agent.wait_env()
                mtu = int(e["FLANNEL_MTU"])
                host.add_docker0(e["FLANNEL_SUBNET"], mtu)
                containers.append(host.add_container("a", mtu))
            c1, c2 = containers
            wait_for(lambda: c1.exec(["ping", "-c", "1", "-W", "1", c2.ip],
                                     check=False).returncode == 0,
                     timeout=30, what=f"{backend} overlay up")
            # IP and TCP headers with timestamps: 52 bytes of each packet.
            return measure(c1, c2.ip, c2, mss=mtu - 52)
    finally:
        lab.close()


def plain_veth() -> dict:
    lab = Lab()
    try:
        a, b = lab.add_netns("va"), lab.add_netns("vb")
        subprocess.run(["ip", "link", "add", "v0", "netns", a.ns, "type", "veth", "peer",
                        "name", "v1", "netns", b.ns], check=True)
        for ns, dev, ip in ((a, "v0", "10.77.0.1/24"), (b, "v1", "10.77.0.2/24")):
            ns.exec(["ip", "addr", "add", ip, "dev", dev])
            ns.exec(["ip", "link", "set", dev, "up"])
            ns.exec(["ip", "link", "set", "lo", "up"])
        return measure(a, "10.77.0.2", b, mss=1448)
    finally:
        lab.close()


#: The udp rows: one per offload mode of the C datapath, each step adding one.
NO_OFFLOADS = {"TSO": False, "Coalesce": False, "UDPGSO": False, "UDPGRO": False}
UDP_ROWS = {
    "python": ("udp, python datapath (GSO, GRO, coalescing)", {"Datapath": "python"}),
    "c-batches": ("udp, C: batches only", {"Datapath": "c", **NO_OFFLOADS}),
    "c-gso-gro": ("udp, C: + UDP GSO/GRO",
                  {"Datapath": "c", "TSO": False, "Coalesce": False}),
    "c-coalesce": ("udp, C: + coalesced TUN writes", {"Datapath": "c", "TSO": False}),
    "c": ("udp, C: + TUN TSO (all offloads)", {"Datapath": "c"}),
}


def main(which: list[str]) -> int:
    rows: list[tuple[str, dict]] = []
    rows.append(("vxlan (kernel)", overlay("vxlan")))
    for key in which:
        label, options = UDP_ROWS[key]
        rows.append((label, overlay("udp", **options)))
    rows.append(("host-gw (kernel)", overlay("host-gw")))
    rows.append(("plain veth", plain_veth()))
    ref = rows[0][1]
    print(f"\niperf3 TCP, median of {RUNS} x {SECONDS} s; ping median of 200 at 5 ms")
    print("| backend | Gbit/s | x vxlan | retransmits (median) | retransmits % of segments"
          " | RTT ms | x vxlan RTT | the runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows:
        runs = " ".join(f"{g:.2f}" for g in r["gbps_runs"])
        print(f"| {name} | {r['gbps']:.2f} | {r['gbps'] / ref['gbps']:.3f} |"
              f" {r['retransmits']:.0f} | {r['retransmit_pct']:.4f} | {r['rtt_ms']:.3f} |"
              f" {r['rtt_ms'] / ref['rtt_ms']:.2f} | {runs} |")
    out = Path(os.environ.get("BENCH_JSON", "bench-results.json"))
    out.write_text(json.dumps(dict(rows), indent=2) + "\n")
    print(f"\n(raw figures in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(UDP_ROWS)))
