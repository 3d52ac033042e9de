"""`make bench`: container-to-container throughput and latency for each backend, in one run.

For udp (each datapath given), vxlan, host-gw and a plain veth pair, on the same machine
in the same run: iperf3 TCP (median of RUNS runs of SECONDS s) and its retransmits, and
ping RTT (median of 200 at 5 ms). Ratios are against vxlan measured in this run, so a
noisy shared machine shifts all rows together. A command, not a test: nothing here can
fail on a number.
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


def measure(client, server_ip: str, server) -> dict:
    rates, retrans = [], []
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
    res = client.exec(["ping", "-c", "200", "-i", "0.005", "-W", "2", server_ip],
                      check=False, timeout=60).stdout
    rtts = [float(line.split("time=")[1].split()[0]) for line in res.splitlines()
            if "time=" in line]
    return {
        "gbps": statistics.median(rates), "gbps_runs": rates,
        "retransmits": statistics.median(retrans), "retransmits_runs": retrans,
        "rtt_ms": statistics.median(rtts) if rtts else float("nan"),
        "ping_received": len(rtts),
    }


def overlay(backend: str, env: dict[str, str] | None = None) -> dict:
    lab = Lab()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory(prefix="tweed-bench-") as tmp:
            etcd = lab.start_etcd()
            put_config(etcd, backend=backend)
            containers = []
            for i in (1, 2):
                host = lab.add_host(i)
                agent = Agent(host, etcd.client_url, Path(tmp)).start()
                e = agent.wait_env()
                host.add_docker0(e["FLANNEL_SUBNET"], int(e["FLANNEL_MTU"]))
                containers.append(host.add_container("a", int(e["FLANNEL_MTU"])))
            c1, c2 = containers
            wait_for(lambda: c1.exec(["ping", "-c", "1", "-W", "1", c2.ip],
                                     check=False).returncode == 0,
                     timeout=30, what=f"{backend} overlay up")
            return measure(c1, c2.ip, c2)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
        return measure(a, "10.77.0.2", b)
    finally:
        lab.close()


def main(datapaths: list[str]) -> int:
    rows: list[tuple[str, dict]] = []
    rows.append(("vxlan", overlay("vxlan")))
    for dp in datapaths:
        rows.append((f"udp ({dp})", overlay("udp", {"TWEED_DATAPATH": dp})))
    rows.append(("host-gw", overlay("host-gw")))
    rows.append(("veth", plain_veth()))
    ref = rows[0][1]["gbps"]
    print(f"\niperf3 TCP, median of {RUNS} x {SECONDS} s; ping median of 200 at 5 ms")
    print(f"{'backend':<14}{'Gbit/s':>8}{'x vxlan':>9}{'retrans':>9}{'RTT ms':>8}  runs")
    for name, r in rows:
        runs = " ".join(f"{g:.2f}" for g in r["gbps_runs"])
        print(f"{name:<14}{r['gbps']:>8.2f}{r['gbps'] / ref:>9.3f}{r['retransmits']:>9.0f}"
              f"{r['rtt_ms']:>8.3f}  {runs}")
    out = Path(os.environ.get("BENCH_JSON", "bench-results.json"))
    out.write_text(json.dumps(dict(rows), indent=2) + "\n")
    print(f"\n(raw figures in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["python"]))
