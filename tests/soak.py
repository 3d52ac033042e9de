"""`make soak [SOAK_MINUTES=10]`: a long run of the lab under churn, with a report at the end.

A command, not a test (pytest collects only test_*.py). For SOAK_MINUTES (default 10):
- a three-host lab with a real etcd and the udp backend (SOAK_BACKEND=udp by default: its
  packet path runs in tweed itself, the riskiest part; the default datapath, C when built;
  vxlan and host-gw work too), a docker0 and a container per host;
- ping between every pair of containers (a ring, every 0.1 s) and iperf3 from container 1
  to container 2 (SOAK_IPERF_RATE, default 100M, so the agents and etcd still get CPU on
  a small machine), all the time;
- stand-in peers: every second a lease is put or deleted in etcd (between 4 and 12 of
  them alive), as hosts joining and leaving;
- etcd restarted every minute. Just before each restart the churn pauses and each agent's
  state is compared with the leases in etcd (it has 15 s to converge);
- kernel faults (SOAK_LINK_FAULTS=1, the default; 0 leaves them out): 20 s into each
  minute one host's eth0 goes down for 2 s and up again, 40 s into it one host's overlay
  device (flannel0, flannel.1; none with host-gw, which gets a second link flap) is
  deleted. Replies lost from the fault until 2 s after the link came up (or after the
  deletion) are the issue's allowance and are reported apart, with how long traffic took
  to come back; a reply lost outside those windows fails the run.
At the end: lost pings, iperf3 totals, route mismatches against etcd (kernel routes for
host-gw/vxlan; for udp the Network route and the datapath's peer table, probed in the
datapath itself: fault_tools.udp_datapath_peers), and each agent's memory (VmRSS) at
start, peak and end. Exit status 1 if a ping was lost outside the fault windows, a
mismatch remained, or an agent exited. Everything is removed at the end, also on failure
or Ctrl-C; the logs are kept (their folder is printed) when it fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.lab.agents import PREFIX, Agent, bring_up, ping, put_config, subnet_key, wait_for
from tests.lab.fault_tools import PingResult, PingStream, mismatches, rss_kib
from tests.support.netns import Container, Host, Lab, ip_batch
from tests.support.wait import poll

NETWORK = "10.5.0.0/16"
HEALTH = "9100"
STANDINS = 32  # stand-in k: 10.5.(200+k).0/24 at 192.168.100.(100+k)
PING_INTERVAL = 0.1
#: The issue's bound: traffic is back within 2 s of the link coming up (or the deletion).
HEAL_BOUND = 2.0
DEVICE = {"udp": "flannel0", "vxlan": "flannel.1"}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def standin_lease(backend: str, k: int) -> str:
    ip = f"192.168.100.{100 + k}"
    if backend == "udp":
        return json.dumps({"PublicIP": ip, "PublicIPv6": None}, separators=(",", ":"))
    lease: dict[str, Any] = {"PublicIP": ip, "PublicIPv6": None, "BackendType": backend}
    if backend == "vxlan":
        lease["BackendData"] = {"VNI": 1, "VtepMAC": f"0e:00:00:00:02:{k:02x}"}
    return json.dumps(lease, separators=(",", ":"))


class Iperf:
    """iperf3 client runs from one container to another's server, restarted if one ends
    early; totals over all runs."""

    def __init__(self, client: Container, server: Container, workdir: Path, rate: str) -> None:
        self.client, self.server, self.workdir, self.rate = client, server, workdir, rate
        self.srv = server.popen(["iperf3", "-s"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.failed = 0
        self.bytes = 0
        self.seconds = 0.0
        self.retransmits = 0
        self.errors: list[str] = []

    def start(self, seconds: int) -> None:
        self.runs += 1
        out = self.workdir / f"iperf-{self.runs}.json"
        with open(out, "wb") as f:
            self.proc = self.client.popen(
                ["iperf3", "-c", self.server.ip, "-t", str(max(seconds, 1)), "-b", self.rate,
                 "-J"], stdout=f, stderr=subprocess.STDOUT)
        self.out = out

    def poll(self, remaining: float) -> None:
        """Account for a finished run; start another if time remains."""
        if self.proc is None or self.proc.poll() is None:
            return
        self.proc = None
        try:
            result = json.loads(self.out.read_text())
        except ValueError:
            result = {"error": self.out.read_text()[-300:]}
        if "error" in result:
            self.failed += 1
            self.errors.append(str(result["error"]))
        end = result.get("end", {})
        self.bytes += int(end.get("sum_received", {}).get("bytes", 0))
        self.seconds += float(end.get("sum_received", {}).get("seconds", 0.0))
        self.retransmits += int(end.get("sum_sent", {}).get("retransmits", 0))
        if remaining > 5:
            time.sleep(0.5)  # the server takes the next client once the last one is gone
            self.start(int(remaining) - 2)

    def summary(self) -> str:
        rate = self.bytes * 8 / self.seconds / 1e6 if self.seconds else 0.0
        text = (f"{self.runs} runs ({self.failed} ended with an error), "
                f"{self.bytes / 1e9:.2f} GB, mean {rate:.0f} Mbit/s, "
                f"{self.retransmits} retransmits")
        if self.errors:
            text += f"; errors: {self.errors[:3]}"
        return text


def agent_mismatches(backend: str, etcd: Any, hosts: list[Host], agents: list[Agent]
                     ) -> list[str]:
    out: list[str] = []
    # udp: every subnet a stand-in ever had is probed, so a stale datapath entry shows.
    probe = [f"10.5.{200 + k}.0/24" for k in range(STANDINS)] + [a.subnet for a in agents]
    for host, agent in zip(hosts, agents, strict=True):
        out += mismatches(host, agent.log(), etcd, PREFIX, backend, NETWORK, probe=probe)
        if backend == "udp":
            route = host.exec(["ip", "route", "show", NETWORK]).stdout
            if "dev flannel0" not in route:
                out.append(f"{host.ns}: no route {NETWORK} dev flannel0 ({route.strip()!r})")
    return out


def converge(backend: str, etcd: Any, hosts: list[Host], agents: list[Agent],
             limit: float) -> tuple[list[str], float]:
    """Wait up to `limit` s for no mismatch; (what is left, seconds it took)."""
    start = time.monotonic()
    while True:
        left = agent_mismatches(backend, etcd, hosts, agents)
        took = time.monotonic() - start
        if not left or took > limit:
            return left, took
        time.sleep(0.2)


class Fault:
    """One kernel fault: what and where, when it began, and the end of its allowance
    (wall clock, as ping -D stamps its replies)."""

    def __init__(self, what: str, host: Host, began: float, allowed_until: float) -> None:
        self.what, self.host, self.began, self.allowed_until = what, host, began, allowed_until
        self.lost = 0
        self.back_after = 0.0  # from the link up (or the deletion) to the first reply after
        self.detail = ""

    def covers(self, t: float) -> bool:
        return self.began - PING_INTERVAL <= t <= self.allowed_until


def standin_neighbours(host: Host) -> None:
    """The stand-ins' addresses answer no ARP: static neighbours let what the udp datapath
    sends them leave eth0, where its probe sees it (udp_datapath_peers). The frames go to
    MACs nobody has, on the lab's own bridge. A link going down flushes them."""
    ip_batch(host.ns, [f"neigh replace 192.168.100.{100 + k} lladdr 02:00:00:00:03:{k:02x}"
                       " dev eth0 nud permanent" for k in range(STANDINS)])


def flap_link(host: Host) -> Fault:
    """eth0 down for 2 s, then up (the issue's `ip link set eth0 down; sleep 2; up`)."""
    began = time.time()
    host.exec(["ip", "link", "set", "eth0", "down"])
    time.sleep(2)
    host.exec(["ip", "link", "set", "eth0", "up"])
    up = time.time()
    standin_neighbours(host)  # the test's own entries, not tweed's to restore
    return Fault("eth0 down 2 s", host, began, up + HEAL_BOUND)


def ifindex(host: Host, device: str) -> int | None:
    res = host.exec(["ip", "-j", "link", "show", device], check=False)
    return json.loads(res.stdout)[0]["ifindex"] if res.returncode == 0 else None


def delete_device(host: Host, device: str) -> Fault:
    """`ip link del` the overlay device; the fault says whether (and when) tweed made a new
    one, so a deletion that did not happen or was never healed shows."""
    old = ifindex(host, device)
    began = time.time()
    host.exec(["ip", "link", "del", device])
    fault = Fault(f"{device} deleted", host, began, began + HEAL_BOUND)
    new = poll(lambda: (i := ifindex(host, device)) is not None and i != old and i, 10)
    fault.detail = (f"made again as index {new} after {time.time() - began:.2f} s" if new
                    else "not made again within 10 s")
    return fault


def sent_at(res: PingResult, seq: int, started: float) -> float:
    """When ping sent `seq`: between the replies around it (ping -D stamps replies only)."""
    before = max((s for s in res.replies if s < seq), default=None)
    after = min((s for s in res.replies if s > seq), default=None)
    if before is not None and after is not None:
        t0, t1 = res.replies[before], res.replies[after]
        return t0 + (seq - before) * (t1 - t0) / (after - before)
    if before is not None:
        return res.replies[before] + (seq - before) * PING_INTERVAL
    return started + (seq - 1) * PING_INTERVAL


def account(results: list[PingResult], starts: list[float], faults: list[Fault]
            ) -> list[tuple[int, int, float]]:
    """Charge each lost reply to the fault whose allowance covers it; return the others as
    (stream, seq, sent). Sets each fault's lost count and how long traffic took to come
    back (its last covered loss to the next reply, measured from the link up/deletion)."""
    unexcused = []
    for n, (res, start) in enumerate(zip(results, starts, strict=True)):
        for seq in res.lost:
            t = sent_at(res, seq, start)
            fault = next((f for f in faults if f.covers(t)), None)
            if fault is None:
                unexcused.append((n, seq, t))
                continue
            fault.lost += 1
            nxt = min((r for s, r in res.replies.items() if s > seq), default=None)
            if nxt is not None:
                fault.back_after = max(fault.back_after,
                                       nxt - (fault.allowed_until - HEAL_BOUND))
    return unexcused


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", "10"))
    backend = os.environ.get("SOAK_BACKEND", "udp")
    rate = os.environ.get("SOAK_IPERF_RATE", "100M")
    link_faults = os.environ.get("SOAK_LINK_FAULTS", "1") != "0"
    rng = random.Random(int(os.environ.get("SOAK_SEED", "7")))
    # SIGTERM ends the run like Ctrl-C: through the finally below, which removes the lab.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="tweed-soak-"))
    lab = Lab()
    ok = False
    try:
        say(f"soak: {minutes:g} min, backend {backend}, kernel faults "
            f"{'on' if link_faults else 'off'}, logs in {workdir}")
        etcd = lab.start_etcd()
        put_config(etcd, backend=backend, network=NETWORK)
        hosts, agents, containers = [], [], []
        for i in (1, 2, 3):
            h, a, c = bring_up(lab, etcd, workdir, i, "--healthz-port", HEALTH, resync="5")
            hosts.append(h)
            agents.append(a)
            containers.append(c)
        for h in hosts:
            standin_neighbours(h)
        for c, other in zip(containers, containers[1:] + containers[:1], strict=True):
            wait_for(lambda c=c, other=other: ping(c, other.ip, 1), timeout=30,
                     what=f"{c.ns} -> {other.ns}")
        found = re.search(r"udp: flannel0 .*, socket \S+, (\w+) ", agents[0].log())
        mode = f"(datapath {found.group(1)})" if found else ""
        say(f"3 hosts up: {', '.join(a.subnet for a in agents)} {mode}")

        pings = [PingStream(c, other.ip, workdir, interval=PING_INTERVAL)
                 for c, other in zip(containers, containers[1:] + containers[:1], strict=True)]
        ping_starts = [p.started for p in pings]
        started = time.monotonic()
        end = started + minutes * 60
        iperf = Iperf(containers[0], containers[1], workdir, rate)
        time.sleep(0.5)
        iperf.start(int(minutes * 60) - 2)
        time.sleep(5)  # traffic running: the memory of a working agent, not of an idle one
        rss_start = [rss_kib(a.proc.pid) for a in agents]
        rss_peak = list(rss_start)

        alive: set[int] = set()
        changes = failed_changes = restarts = 0
        checks: list[tuple[int, float]] = []  # (mismatches left, seconds to converge)
        next_restart = started + 60
        faults: list[Fault] = []
        slot = 1  # faults at 20 s slots: 20 s flap, 40 s deletion, 60 s the etcd restart's
        next_rss = started + 10
        tick = time.monotonic()
        while time.monotonic() < end:
            # One stand-in joins or leaves.
            if len(alive) < 4 or (len(alive) < 12 and rng.random() < 0.5):
                k = rng.choice([k for k in range(STANDINS) if k not in alive])
                op = ("put", k)
            else:
                op = ("del", rng.choice(sorted(alive)))
            try:
                key = subnet_key(f"10.5.{200 + op[1]}.0/24")
                if op[0] == "put":
                    etcd.put(key, standin_lease(backend, op[1]))
                    alive.add(op[1])
                else:
                    etcd.delete(key)
                    alive.discard(op[1])
                changes += 1
            except RuntimeError:
                failed_changes += 1  # etcd was restarting
            now = time.monotonic()
            if now >= next_rss:
                for n, a in enumerate(agents):
                    if a.proc.poll() is None:
                        rss_peak[n] = max(rss_peak[n], rss_kib(a.proc.pid))
                next_rss += 10
            if now >= next_restart and end - now > 20:
                left, took = converge(backend, etcd, hosts, agents, 15)
                checks.append((len(left), took))
                for line in left:
                    say(f"mismatch: {line}")
                etcd.restart()
                restarts += 1
                say(f"etcd restarted ({restarts}); {changes} lease changes so far, "
                    f"state matched etcd after {took:.1f} s")
                next_restart += 60
            if link_faults and now >= started + 20 * slot and end - now > 20:
                host = rng.choice(hosts)
                if len(faults) % 2 == 1 and backend in DEVICE:
                    faults.append(delete_device(host, DEVICE[backend]))
                else:
                    faults.append(flap_link(host))
                say(f"{faults[-1].what} on {host.ns}")
                slot += 2 if slot % 3 == 2 else 1  # every third slot is the restart's
            iperf.poll(end - time.monotonic())
            if any(a.proc.poll() is not None for a in agents):
                say("an agent exited")
                break
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))

        final, took = converge(backend, etcd, hosts, agents, 30)
        rss_end = [rss_kib(a.proc.pid) if a.proc.poll() is None else 0 for a in agents]
        results = [p.stop() for p in pings]
        if iperf.proc is not None:
            iperf.proc.wait(timeout=60)
            iperf.poll(0)
        exited = [a.host.ns for a in agents if a.proc.poll() is not None]
        errors = sum(a.log().count("Traceback") + a.log().count(" ERROR ") for a in agents)

        print(flush=True)
        say(f"soak done: {(time.monotonic() - started) / 60:.1f} min, backend {backend} {mode}")
        print(f"etcd restarts: {restarts}; stand-in lease changes: {changes} "
              f"({failed_changes} refused while etcd restarted)")
        unexcused = account(results, ping_starts, faults)
        lost_total = len(unexcused)
        for n, (c, p, res) in enumerate(zip(containers, pings, results, strict=True)):
            outside = [seq for m, seq, _ in unexcused if m == n]
            print(f"ping {c.ip} -> {p.dest}: {res.transmitted} sent, {len(res.lost)} lost, "
                  f"{len(outside)} of them outside the kernel faults' allowance"
                  f"{' ' + str(outside[:10]) if outside else ''}")
        if faults:
            worst = max(f.back_after for f in faults)
            print(f"kernel faults: {len(faults)} ({sum(f.lost for f in faults)} replies lost "
                  f"within their allowance); traffic back at most {worst:.2f} s after the "
                  f"link came up or the device went (bound {HEAL_BOUND:.0f} s)")
            for f in faults:
                print(f"  {f.what} on {f.host.ns}: {f.lost} lost, back after "
                      f"{f.back_after:.2f} s{'; ' + f.detail if f.detail else ''}")
        print(f"iperf3 {containers[0].ip} -> {containers[1].ip} at {rate}: {iperf.summary()}")
        worst = max((t for _, t in checks), default=0.0)
        print(f"route mismatches against etcd: {sum(n for n, _ in checks)} at the "
              f"{len(checks)} checks before the etcd restarts (slowest convergence "
              f"{worst:.1f} s); at the end {len(final)} (after {took:.1f} s)")
        for line in final:
            print(f"  {line}")
        for a, s, p, e in zip(agents, rss_start, rss_peak, rss_end, strict=True):
            print(f"memory {a.host.ns} (VmRSS): start {s / 1024:.1f} MiB, peak "
                  f"{max(p, e) / 1024:.1f} MiB, end {e / 1024:.1f} MiB")
        print(f"agents exited: {exited or 'none'}; ERROR lines/tracebacks in logs: {errors}")
        shown = [f"  {a.host.ns}: {line.strip()[:200]}" for a in agents
                 for line in a.log().splitlines() if " ERROR " in line or "Traceback" in line]
        for line in shown[:8]:
            print(line)
        ok = lost_total == 0 and not final and not exited and sum(n for n, _ in checks) == 0
        return 0 if ok else 1
    finally:
        lab.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
