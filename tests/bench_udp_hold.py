"""`python -m tests.bench_udp_hold`: the udp C datapath's receive side while its send side
finds the UDP socket buffer full (a command, not a test: nothing here fails on a number).

Two udp hosts (C datapath, all offloads) in a fresh lab. Host 1's eth0 gets a token
bucket (`tc tbf`, HOLD_RATE, default 2gbit) with a queue longer than the socket's 8 MiB
send buffer, so that bulk TCP from container 1 to container 2 (iperf3 with HOLD_STREAMS
parallel streams, default 4, congestion control HOLD_CC, default cubic, which fills
queues: one stream's receive window is less than that buffer, for
HOLD_SECONDS, default 10) fills that buffer and host 1's sends find it full. Meanwhile
container 2 sends a timestamped UDP probe to container 1 every 5 ms: those cross host 1's
receive side only,
so their one-way delay (both ends on this machine's clock) shows how long the receive side
waits while the send side is full. Prints, per run (HOLD_RUNS, default 3): iperf3 Gbit/s
and retransmits, the probes' one-way delay median / p99 / max and how many were lost, and
host 1's tx_socket_full and tx_drop_send_error counters; then the medians over the runs.

Run it from a tree's top folder to measure that tree (the agents are `python -m agent`
from the current folder), e.g. an older commit unpacked with `git archive` and built with
`python setup.py build_ext --inplace`, against this one.
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
from tests.lab.fault_tools import metrics
from tests.support.netns import Lab

RUNS = int(os.environ.get("HOLD_RUNS", "3"))
SECONDS = int(os.environ.get("HOLD_SECONDS", "10"))
RATE = os.environ.get("HOLD_RATE", "2gbit")
STREAMS = os.environ.get("HOLD_STREAMS", "4")
#: cubic fills a queue up to the receive window, where bbr (this machine's default) keeps
#: it short and the socket buffer would never fill.
CC = os.environ.get("HOLD_CC", "cubic")
PORT = 9101
PROBE_PORT = 7777
INTERVAL = 0.005

RECEIVER = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", PORT)); s.settimeout(3)
print("ready", flush=True)
delays, seen = [], set()
try:
    while True:
        d = s.recv(64)
        now = time.time_ns()
        seq, sent = (int(x) for x in d.decode().split())
        seen.add(seq); delays.append((now - sent) / 1e6)
except TimeoutError:
    pass
print(json.dumps({"delays": delays, "seen": len(seen)}), flush=True)
""".replace("PORT", str(PROBE_PORT))

SENDER = r"""
import socket, sys, time
dst, n, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
for i in range(n):
    s.sendto(f"{i} {time.time_ns()}".encode(), (dst, PORT))
    time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
""".replace("PORT", str(PROBE_PORT))


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def one_run() -> dict:
    lab = Lab()
    try:
        with tempfile.TemporaryDirectory(prefix="tweed-hold-") as tmp:
            etcd = lab.start_etcd()
            put_config(etcd, backend="udp", Datapath="c")
            hosts, containers = [], []
            for i in (1, 2):
                host = lab.add_host(i)
                agent = Agent(host, etcd.client_url, Path(tmp), "--healthz-port",
                              str(PORT)).start()
                e = agent.wait_env()
                mtu = int(e["FLANNEL_MTU"])
                host.add_docker0(e["FLANNEL_SUBNET"], mtu)
                hosts.append(host)
                containers.append(host.add_container("a", mtu))
            (h1, _h2), (c1, c2) = hosts, containers
            wait_for(lambda: c1.exec(["ping", "-c", "1", "-W", "1", c2.ip],
                                     check=False).returncode == 0, timeout=30, what="overlay")
            h1.exec(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", RATE,
                     "burst", "256kb", "limit", "32mb"])
            srv = c2.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            rx = c1.popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
            assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            client = c1.popen(["iperf3", "-c", c2.ip, "-t", str(SECONDS), "-P", STREAMS,
                               "-C", CC, "-J"],
                              stdout=subprocess.PIPE, text=True)
            time.sleep(1)  # the bulk transfer under way before the probes
            n = int((SECONDS - 2) / INTERVAL)
            c2.exec([sys.executable, "-c", SENDER, c1.ip, str(n), str(INTERVAL)],
                    timeout=SECONDS + 30)
            out, _ = client.communicate(timeout=SECONDS + 60)
            srv.wait(timeout=30)
            probes = json.loads(rx.communicate(timeout=30)[0].strip().splitlines()[-1])
            end = json.loads(out)["end"]
            m = metrics(h1, PORT)
            delays = probes["delays"]
            return {
                "gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": end["sum_sent"].get("retransmits", 0),
                "delay_ms_p50": statistics.median(delays) if delays else float("nan"),
                "delay_ms_p99": pct(delays, 0.99),
                "delay_ms_max": max(delays) if delays else float("nan"),
                "probes_lost": n - probes["seen"], "probes": n,
                "tx_socket_full": m.get("tweed_udp_tx_socket_full_total", float("nan")),
                "tx_drop_send_error": m.get(
                    'tweed_udp_drops_total{direction="tx",reason="send_error"}', 0.0),
            }
    finally:
        lab.close()


def main() -> int:
    runs = [one_run() for _ in range(RUNS)]
    for r in runs:
        print(json.dumps(r))
    keys = runs[0].keys()
    print("median:", json.dumps({k: statistics.median(r[k] for r in runs) for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
