"""`make bench-scale`: one tweed against N peer leases, per backend, and the kernel's own pace.

For each backend (SCALE_BACKENDS, default "vxlan host-gw udp") and each size N
(SCALE_SIZES, default "1000 5000 10000 20000"), in a fresh lab (tests/support/netns.py)
with a real etcd: N peer leases are seeded under one etcd lease, as a cluster would hold
them (network 10.0.0.0/8, SubnetLen 24; vxlan leases carry a VtepMAC, host-gw ones a
gateway on the underlay, udp ones only a PublicIP); then one tweed starts and we measure
- the time from its start until the kernel holds every peer's entries (host-gw: routes;
  vxlan: route + neighbour + FDB; udp: the Network route and the first batch applied to
  the datapath, from the agent's histogram), the agent's CPU seconds and RSS then;
- that start in phases, from the timestamps of the agent's own INFO lines (`phases`):
  process start to its first line (the interpreter and the imports), to `holding subnet`
  (etcd: the config, the lease listing read and decoded, our lease written), to `first peer
  listing` (the backend's devices, subnet.env, the listing turned into peer events), and
  from there until the kernel holds everything: the kernel part, which issue 12 holds to
  3x `ip -batch` (host-gw, vxlan; udp has no such line). The kernel part is given twice:
  until the bench saw every entry (polling `ip route` every 0.1 s, which at 20,000 routes
  costs CPU of its own and lags by up to a poll), and until the agent's own `kernel: set N
  routes` line (logged once the kernel acknowledged every write; used when it is the
  start's first such line and covers every peer);
- the CPU it spends in SCALE_IDLE_SECONDS (30) with nothing changing;
- churn: SCALE_CHURN_RATE (100) lease changes per second (joins, leaves, PublicIP
  changes) for SCALE_CHURN_SECONDS (60): p50/p99 of tweed_event_to_kernel_seconds over
  the churn (it starts when the watch hands a batch over, so it misses changes queued
  before that: how many the agent had not yet received when the churn ended is shown
  too), and the time until the kernel equals etcd afterwards (SCALE_CATCHUP_TIMEOUT, 180);
  the agent's RSS every 5 s of the churn, and how much it grew from the second quarter
  to the last (SCALE_CHURN_SECONDS=600 makes it the 10-minute memory run;
  SCALE_AGENT_ARGS adds flags to the tweed under test, e.g. "--resync-period 60");
- for udp, TCP throughput container to container (iperf3, as tests/bench.py) with N peers
  known, before the churn and while it runs (the agent programming the datapath), vs in a
  lab with a single peer.
Each size also runs with one peer (start only) for the RSS per peer above it. The
reference is measured in the same run: `ip -batch` (and `bridge -batch` for the FDB)
adding the same entries into a fresh namespace with the same devices; times are printed
as a ratio to it. A command, not a test: it prints a markdown table, writes SCALE_JSON
(bench-scale.json; `make bench-scale`: docs/benchmarks-scale.json) and, with matplotlib
(the `bench` extra), the plot SCALE_PLOT (docs/benchmarks-scale.svg).

The etcd work (seeding, churn) runs in a child process inside the underlay namespace,
where etcd listens: `python -m tests.bench_scale seed|churn ...`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NETWORK = "10.0.0.0/8"
SUBNET_LEN = 24
PREFIX = "/coreos.com/network"
VNI = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_OPS = 128  # etcd's default --max-txn-ops


def env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).split()


SIZES = [int(s) for s in env_list("SCALE_SIZES", "1000 5000 10000 20000")]
BACKENDS = env_list("SCALE_BACKENDS", "vxlan host-gw udp")
IDLE_SECONDS = float(os.environ.get("SCALE_IDLE_SECONDS", "30"))
CHURN_SECONDS = float(os.environ.get("SCALE_CHURN_SECONDS", "60"))
CHURN_RATE = float(os.environ.get("SCALE_CHURN_RATE", "100"))
START_TIMEOUT = float(os.environ.get("SCALE_START_TIMEOUT", "600"))
CATCHUP_TIMEOUT = float(os.environ.get("SCALE_CATCHUP_TIMEOUT", "180"))
# Extra flags for the tweed under test, e.g. "--resync-period 60" for a memory run that
# crosses many backstop re-reads.
AGENT_ARGS = env_list("SCALE_AGENT_ARGS", "")
CHURN_SAMPLE = 5.0  # seconds between RSS samples during the churn


# -- the peers ------------------------------------------------------------------------
def subnet_of(i: int) -> str:
    """Peer i's /24: 10.0.1.0 for i = 0, counting up (10.0.0.0/24 is never leased)."""
    s = i + 1
    return f"10.{s >> 8 & 255}.{s & 255}.0/24"


def public_ip(backend: str, i: int, gen: int = 0) -> str:
    """host-gw peers are gateways on the underlay /24 (the kernel wants them on-link), so
    they share its addresses (never .1, our host, nor .254); other backends' peers each
    have their own address."""
    if backend == "host-gw":
        return f"192.168.100.{10 + (i + gen * 7) % 240}"
    n = i + gen * 65536
    return f"172.{16 + (n >> 16 & 15)}.{n >> 8 & 255}.{n & 255}"


def vtep_mac(i: int) -> str:
    return "0a:" + ":".join(f"{i >> s & 255:02x}" for s in (24, 16, 8, 0)) + ":01"


def lease_value(backend: str, i: int, gen: int = 0) -> str:
    doc: dict[str, Any] = {"PublicIP": public_ip(backend, i, gen), "PublicIPv6": None}
    if backend == "vxlan":
        doc["BackendType"] = "vxlan"
        doc["BackendData"] = {"VNI": VNI, "VtepMAC": vtep_mac(i)}
    elif backend == "host-gw":
        doc["BackendType"] = "host-gw"
    return json.dumps(doc, separators=(",", ":"))


def key_of(subnet: str) -> str:
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


def desired(backend: str, peers: dict[int, int]) -> dict[str, set[tuple[str, ...]]]:
    """The kernel entries for peers {index: PublicIP generation}, as kernel_state reads."""
    out: dict[str, set[tuple[str, ...]]] = {"route": set(), "neigh": set(), "fdb": set()}
    for i, gen in peers.items():
        sub = subnet_of(i)
        if backend == "host-gw":
            out["route"].add((sub, public_ip(backend, i, gen)))
        elif backend == "vxlan":
            vtep = sub.split("/")[0]
            out["route"].add((sub, vtep))
            out["neigh"].add((vtep, vtep_mac(i)))
            out["fdb"].add((vtep_mac(i), public_ip(backend, i, gen)))
    return out


# -- the etcd side (run inside the underlay namespace) --------------------------------
async def _client(url: str) -> Any:
    from etcd3aio import Etcd3Client

    client = Etcd3Client([url.split("://", 1)[1]])
    await client.connect()
    return client


async def seed(url: str, backend: str, n: int) -> None:
    """N leases under one etcd lease (TTL a day), PAGE_OPS puts per transaction."""
    client = await _client(url)
    lease = (await client.lease.grant(ttl=86400)).ID
    kv = client.kv
    for start in range(0, n, PAGE_OPS):
        ops = [kv.txn_op_put(key_of(subnet_of(i)).encode(), lease_value(backend, i).encode(),
                             lease=lease) for i in range(start, min(n, start + PAGE_OPS))]
        await kv.txn([], ops, timeout=30)
    await client.close()


def pick(rng: random.Random, present: dict[int, int], below: int) -> int:
    """A random present peer (they are most of range(below))."""
    while True:
        i = rng.randrange(below)
        if i in present:
            return i


async def churn(url: str, backend: str, n: int, rate: float, seconds: float) -> None:
    """`rate` changes per second for `seconds`: joins, leaves and PublicIP changes in
    turn, each its own put or delete; prints the peers left as {index: generation}."""
    client = await _client(url)
    kv = client.kv
    lease = (await client.lease.grant(ttl=86400)).ID
    rng = random.Random(12)
    present = dict.fromkeys(range(n), 0)
    gone: list[int] = []
    next_new = n
    # The agents' own leases (the tweed under test, a udp bench's second host) sit just
    # above the seeded subnets, where joins go: a join must never overwrite one.
    from etcd3aio.kv import prefix_range_end

    start = f"{PREFIX}/subnets/".encode()
    held = {kv_.key.decode() for kv_ in (await kv.get(
        start, prefix_range_end(start), keys_only=True, timeout=30)).kvs}
    t0 = time.monotonic()
    k = 0
    while (now := time.monotonic() - t0) < seconds:
        due = k / rate
        if due > now:
            await asyncio.sleep(due - now)
        kind = k % 3
        if kind == 0:  # a join: a subnet that left earlier, or a new one
            if not gone:
                while key_of(subnet_of(next_new)) in held:
                    next_new += 1
            i = gone.pop() if gone else next_new
            next_new += i == next_new
            present[i] = 0
            await kv.put(key_of(subnet_of(i)).encode(), lease_value(backend, i).encode(),
                         lease=lease, timeout=10)
        elif kind == 1:  # a leave
            i = pick(rng, present, next_new)
            del present[i]
            gone.append(i)
            await kv.delete(key_of(subnet_of(i)).encode(), timeout=10)
        else:  # the host got another PublicIP
            i = pick(rng, present, next_new)
            present[i] += 1
            await kv.put(key_of(subnet_of(i)).encode(),
                         lease_value(backend, i, present[i]).encode(), lease=lease, timeout=10)
        k += 1
    await client.close()
    print(json.dumps({"changes": k, "peers": present}))


# -- the agent side -------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its reaped children (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def metrics(host: Any) -> dict[str, float]:
    """The agent's /metrics as {sample with labels: value}."""
    res = host.exec(["curl", "-s", "-m", "5", "http://127.0.0.1:8475/metrics"], check=False)
    out = {}
    for line in res.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


HIST = "tweed_event_to_kernel_seconds"


def buckets(m: dict[str, float]) -> list[tuple[float, float]]:
    """The histogram's (upper bound, cumulative count), in order."""
    out = []
    for name, value in m.items():
        if name.startswith(f"{HIST}_bucket{{"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            out.append((float(le), value))
    return sorted(out)


def quantile(q: float, before: list[tuple[float, float]],
             after: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over the observations between two scrapes."""
    start = dict(before)
    diff = [(le, c - start.get(le, 0.0)) for le, c in after]
    total = diff[-1][1] if diff else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in diff:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return float("nan")


def watch_events(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("tweed_watch_events_total{"))


def kernel_counts(host: Any, backend: str) -> tuple[int, ...]:
    if backend == "vxlan":
        dev = f"flannel.{VNI}"
        script = (f"ip -4 route show dev {dev} | grep -c via; "
                  f"ip neigh show dev {dev} nud permanent | wc -l; "
                  f"bridge fdb show dev {dev} | grep -c ' dst '")
    elif backend == "host-gw":
        script = "ip -4 route show dev eth0 | grep -c via"
    else:
        script = f"ip -4 route show {NETWORK} dev flannel0 | wc -l"
    res = host.exec(["sh", "-c", script], check=False)
    return tuple(int(x) for x in res.stdout.split())


def kernel_state(host: Any, backend: str) -> dict[str, set[tuple[str, ...]]]:
    out: dict[str, set[tuple[str, ...]]] = {"route": set(), "neigh": set(), "fdb": set()}
    if backend == "udp":
        return out
    dev = f"flannel.{VNI}" if backend == "vxlan" else "eth0"

    def js(*cmd: str) -> list[dict[str, Any]]:
        return json.loads(host.exec(list(cmd)).stdout or "[]")

    for r in js("ip", "-j", "-4", "route", "show", "dev", dev):
        if "gateway" in r:
            out["route"].add((r["dst"], r["gateway"]))
    if backend == "vxlan":
        for n in js("ip", "-j", "neigh", "show", "dev", dev, "nud", "permanent"):
            out["neigh"].add((n["dst"], n["lladdr"]))
        for f in js("bridge", "-j", "fdb", "show", "dev", dev):
            if "dst" in f:
                out["fdb"].add((f["mac"], f["dst"]))
    return out


@dataclass
class Result:
    backend: str
    peers: int
    seed_s: float = 0.0
    start_s: float = float("nan")  # start until every entry is in the kernel
    #: The start in phases (seconds, see `phases`): until the agent's first log line, then
    #: until it holds its lease, then until it hands the first listing to the backend,
    #: then until the kernel holds everything (the kernel part).
    imports_s: float = float("nan")
    etcd_s: float = float("nan")
    setup_s: float = float("nan")
    kernel_s: float = float("nan")
    #: The kernel part until the agent's `kernel: set N routes` line (see `phases`).
    kernel_acked_s: float = float("nan")
    cpu_s: float = float("nan")  # the agent's CPU seconds until then
    rss_kib: int = 0
    hwm_kib: int = 0
    ref_s: float = float("nan")  # ip -batch (+ bridge -batch) for the same entries
    idle_cpu_s: float = float("nan")
    rss_after_idle_kib: int = 0
    churn_changes: int = 0
    churn_p50_ms: float = float("nan")
    churn_p99_ms: float = float("nan")
    churn_converged_s: float = float("nan")  # churn end until kernel == etcd
    churn_backlog: int = -1  # changes the agent's watch had not yet received at churn end
    kernel_equals_etcd: bool | None = None
    rss_after_churn_kib: int = 0
    #: [seconds into the churn, RSS KiB], every CHURN_SAMPLE seconds.
    churn_rss: list[list[float]] = field(default_factory=list)
    gbps: float = float("nan")
    gbps_churn: float = float("nan")  # udp: the same, measured while the churn runs
    log_lines: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.start_s / self.ref_s if self.ref_s else float("nan")

    @property
    def kernel_ratio(self) -> float:
        """The kernel part against `ip -batch`: issue 12's goal is at most 3."""
        return self.kernel_s / self.ref_s if self.ref_s else float("nan")

    @property
    def kernel_acked_ratio(self) -> float:
        return self.kernel_acked_s / self.ref_s if self.ref_s else float("nan")


def config(backend: str) -> dict[str, Any]:
    return {"Network": NETWORK, "SubnetLen": SUBNET_LEN, "Backend": {"Type": backend}}


#: The agent's log lines that end a phase of its start (after the first line, any).
HOLDING = re.compile(r"holding subnet ")
FIRST_LISTING = re.compile(r"first peer listing: ")
KERNEL_SET = re.compile(r"kernel: set (\d+) route")


def log_time(line: str) -> float | None:
    """The wall-clock time (seconds since the epoch) of a log line of the agent's format,
    `2026-12-01 10:56:13,019 INFO ...` (local time, milliseconds cut off), or None."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
    if m is None:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def phases(log: str, started: float, programmed: float, peers: int = 0) -> dict[str, float]:
    """The start in phases from the agent's log, `started` and `programmed` the wall-clock
    times of its start and of the kernel holding everything: imports_s (to the first line),
    etcd_s (to `holding subnet`), setup_s (to `first peer listing`), kernel_s (the rest);
    a phase whose line is missing is left out (udp has no `first peer listing`). And
    kernel_acked_s, to the first `kernel: set N routes` line if N >= `peers` (one sync
    programmed them all; a later line may sum up several syncs and be logged later)."""
    marks: list[float] = []
    for pattern in (None, HOLDING, FIRST_LISTING):
        for line in log.splitlines():
            t = log_time(line)
            if t is not None and (pattern is None or pattern.search(line)):
                marks.append(t)
                break
        else:
            break
    out: dict[str, float] = {}
    prev = started
    for name, t in zip(("imports_s", "etcd_s", "setup_s"), marks, strict=False):
        out[name] = max(0.0, t - prev)
        prev = t
    if len(marks) == 3:
        out["kernel_s"] = max(0.0, programmed - prev)
        for line in log.splitlines():
            m = KERNEL_SET.search(line)
            t = log_time(line)
            if m is not None and t is not None:
                if int(m.group(1)) >= peers and t >= prev:
                    out["kernel_acked_s"] = t - prev
                break
    return out


def wait(pred: Any, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def run_one(backend: str, n: int, full: bool) -> Result:
    """One lab: seed, start tweed, measure (only the start unless `full`)."""
    from tests.lab.agents import Agent
    from tests.support.netns import Lab

    res = Result(backend, n)
    lab = Lab()
    try:
        with tempfile.TemporaryDirectory(prefix="tweed-scale-") as tmp:
            etcd = lab.start_etcd()
            etcd.put(f"{PREFIX}/config", json.dumps(config(backend)))
            t0 = time.monotonic()
            if n:
                lab.underlay_ns.exec([sys.executable, "-m", "tests.bench_scale", "seed",
                                      etcd.client_url, backend, str(n)], timeout=600)
            res.seed_s = time.monotonic() - t0
            host = lab.add_host(1)
            agent = Agent(host, etcd.client_url, Path(tmp), *AGENT_ARGS)
            t0 = time.monotonic()
            wall0 = time.time()
            agent.start()
            assert agent.proc is not None
            pid = agent.proc.pid
            want = (n, n, n) if backend == "vxlan" else (n,) if backend == "host-gw" else (1,)

            def programmed() -> bool:
                if agent.proc is not None and agent.proc.poll() is not None:
                    raise RuntimeError(f"tweed exited:\n{agent.log()[-3000:]}")
                if kernel_counts(host, backend) != want:
                    return False
                # udp: the first batch (the listing) is applied to the datapath when the
                # histogram has its first observation; a kernel backend's entries are
                # all there already, which the counts said.
                return backend != "udp" or metrics(host).get(f"{HIST}_count", 0) >= 1

            if not wait(programmed, START_TIMEOUT, step=0.1):
                res.notes.append(f"not programmed in {START_TIMEOUT:g} s: "
                                 f"{kernel_counts(host, backend)}")
                return res
            res.start_s = time.monotonic() - t0
            for name, value in phases(agent.log(), wall0, wall0 + res.start_s, n).items():
                setattr(res, name, value)
            res.cpu_s = proc_cpu(pid)
            mem = proc_mem(pid)
            res.rss_kib, res.hwm_kib = mem["VmRSS"], mem["VmHWM"]
            if not full:
                return res
            time.sleep(2)  # the last batch's bookkeeping, the first resync's dump
            c0 = proc_cpu(pid)
            time.sleep(IDLE_SECONDS)
            res.idle_cpu_s = proc_cpu(pid) - c0
            res.rss_after_idle_kib = proc_mem(pid)["VmRSS"]
            pair = udp_pair(lab, etcd, host, agent, Path(tmp)) if backend == "udp" else None
            if pair is not None:
                res.gbps = pair()
            churn_phase(res, lab, etcd, host, pid, pair)
            res.log_lines = len(agent.log().splitlines())
    finally:
        lab.close()
    return res


def churn_phase(res: Result, lab: Any, etcd: Any, host: Any, pid: int,
                pair: Any = None) -> None:
    if CHURN_SECONDS <= 0:
        return
    m0 = metrics(host)
    before = buckets(m0)
    churn = lab.underlay_ns.popen(
        [sys.executable, "-m", "tests.bench_scale", "churn", etcd.client_url, res.backend,
         str(res.peers), str(CHURN_RATE), str(CHURN_SECONDS)],
        stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    during: list[float] = []
    thread = None
    if pair is not None:
        # udp: TCP between the containers while the agent programs the churn's changes.
        thread = threading.Thread(target=lambda: during.append(pair()), daemon=True)
        thread.start()
    while True:
        res.churn_rss.append([round(time.monotonic() - t0, 1), proc_mem(pid)["VmRSS"]])
        try:
            # communicate, not wait: the child's result (every peer) outgrows a pipe's
            # buffer at 10,000 peers, and it must be read while the child writes it.
            out, _ = churn.communicate(timeout=CHURN_SAMPLE)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - t0 > CHURN_SECONDS + 600:
                churn.kill()
                raise
    if thread is not None:
        thread.join(timeout=300)
        res.gbps_churn = during[0] if during else float("nan")
    end = time.monotonic()
    # The histogram starts when the watch hands a batch over; changes still queued before
    # that (the agent behind etcd) show here instead.
    got = watch_events(metrics(host)) - watch_events(m0)
    doc = json.loads(out.strip().splitlines()[-1])
    res.churn_changes = doc["changes"]
    res.churn_backlog = int(res.churn_changes - got)
    peers = {int(k): v for k, v in doc["peers"].items()}
    want = desired(res.backend, peers)
    if res.backend == "udp":
        def same() -> bool:
            m = metrics(host)
            return (watch_events(m) - watch_events(m0) >= res.churn_changes
                    and sum(v for k, v in m.items() if k.startswith("tweed_peers{"))
                    == len(peers) + (pair is not None))  # host 2, if up, is a peer too
    else:
        def same() -> bool:
            return kernel_state(host, res.backend) == want
    res.kernel_equals_etcd = wait(same, CATCHUP_TIMEOUT, step=0.5)
    res.churn_converged_s = time.monotonic() - end
    if not res.kernel_equals_etcd and res.backend != "udp":
        have = kernel_state(host, res.backend)
        for kind in want:
            missing, extra = want[kind] - have[kind], have[kind] - want[kind]
            if missing or extra:
                res.notes.append(f"{kind}: {len(missing)} missing (e.g. {sorted(missing)[:2]}),"
                                 f" {len(extra)} extra (e.g. {sorted(extra)[:2]})")
    after = buckets(metrics(host))
    res.churn_p50_ms = 1000 * quantile(0.5, before, after)
    res.churn_p99_ms = 1000 * quantile(0.99, before, after)
    res.rss_after_churn_kib = proc_mem(pid)["VmRSS"]


def udp_pair(lab: Any, etcd: Any, host1: Any, agent1: Any, workdir: Path) -> Any:
    """A container on host 1 (tweed under test) and one on host 2 (a second tweed); the
    function returned measures iperf3 TCP from the first to the second (NaN if they never
    reached each other)."""
    from tests.bench import measure
    from tests.lab.agents import Agent

    env1 = agent1.wait_env()
    mtu = int(env1["FLANNEL_MTU"])
    host1.add_docker0(env1["FLANNEL_SUBNET"], mtu)
    c1 = host1.add_container("a", mtu)
    host2 = lab.add_host(2)
    agent2 = Agent(host2, etcd.client_url, workdir).start()
    env2 = agent2.wait_env(timeout=120)
    host2.add_docker0(env2["FLANNEL_SUBNET"], mtu)
    c2 = host2.add_container("a", mtu)

    def up() -> bool:
        return c1.exec(["ping", "-c", "1", "-W", "1", c2.ip], check=False).returncode == 0

    reachable = wait(up, START_TIMEOUT, step=0.5)

    def gbps() -> float:
        if not reachable:
            return float("nan")
        return float(measure(c1, c2.ip, c2, mss=mtu - 52)["gbps"])

    return gbps


def udp_one_peer() -> float:
    from tests import bench

    return float(bench.overlay("udp")["gbps"])


# -- the reference: ip -batch into a fresh namespace ----------------------------------
def reference(backend: str, n: int) -> float:
    """Seconds `ip -batch` (and `bridge -batch`) take to add the N peers' entries."""
    from tests.support.netns import Lab

    lab = Lab()
    try:
        ns = lab.add_netns("ref")
        lines = ["link add eth0 type veth peer name eth0p", "link set eth0p up",
                 "addr add 192.168.100.1/24 dev eth0",
                 "link set eth0 up"]
        if backend == "vxlan":
            dev = f"flannel.{VNI}"
            lines += [f"link add {dev} type vxlan id {VNI} local 192.168.100.1 dev eth0 "
                      "dstport 8472 nolearning", f"addr add 10.255.255.0/32 dev {dev}",
                      f"link set {dev} up"]
        ns.exec(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
        routes, neighs, fdbs = [], [], []
        for i in range(n):
            sub = subnet_of(i)
            if backend == "vxlan":
                vtep = sub.split("/")[0]
                routes.append(f"route replace {sub} via {vtep} dev {dev} onlink")
                neighs.append(f"neigh replace {vtep} lladdr {vtep_mac(i)} dev {dev} "
                              "nud permanent")
                fdbs.append(f"fdb replace {vtep_mac(i)} dev {dev} dst "
                            f"{public_ip(backend, i)} self permanent")
            elif backend == "host-gw":
                routes.append(f"route replace {sub} via {public_ip(backend, i)} dev eth0")
            else:
                # udp's kernel part is one route; its per-peer table lives in the datapath.
                # The reference is the host-gw one: a route per peer.
                routes.append(f"route replace {sub} via {public_ip('host-gw', i)} dev eth0")
        t0 = time.monotonic()
        ns.exec(["ip", "-batch", "-"], input="\n".join(routes + neighs) + "\n", timeout=600)
        if fdbs:
            ns.exec(["bridge", "-batch", "-"], input="\n".join(fdbs) + "\n", timeout=600)
        return time.monotonic() - t0
    finally:
        lab.close()


# -- the report -----------------------------------------------------------------------
def fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)  # NaN: not measured


def rss_growth_mb(samples: list[list[float]]) -> float:
    """MB the RSS grew during the churn: the mean of its last quarter's samples minus that
    of its second quarter (the first is still settling); NaN with too few samples."""
    rss = [kib for _, kib in samples]
    q = len(rss) // 4
    if q < 1:
        return float("nan")
    return (sum(rss[-q:]) / q - sum(rss[q:2 * q]) / q) / 1024


def table(results: list[Result], base: dict[str, Result], idle_seconds: float) -> str:
    head = ("| backend | peers | start s | ip -batch s | x ref | x ref above 1 peer"
            " | imports s | etcd s | setup s | kernel s | kernel x ref | kernel s (acked)"
            " | kernel (acked) x ref | CPU s"
            " | RSS MB | KB/peer"
            " above 1 peer | idle CPU s / 30 s | churn p50 ms | churn p99 ms | kernel = etcd"
            " | behind at churn end | caught up s | RSS after churn MB | RSS growth in churn MB"
            " | Gbit/s | Gbit/s in churn |")
    lines = [head, "|---" + "|---:" * 18 + "|---" + "|---:" * 6 + "|"]
    for r in results:
        b = base.get(r.backend)
        per = ((r.rss_kib - b.rss_kib) * 1.024 / max(r.peers - 1, 1)
               if b is not None and r.rss_kib else float("nan"))
        idle = r.idle_cpu_s * 30 / idle_seconds if idle_seconds else float("nan")
        # Without the fixed cost of a start (interpreter, imports, etcd, devices).
        above = (r.start_s - b.start_s) / r.ref_s if b is not None and r.ref_s else float("nan")
        lines.append(
            f"| {r.backend} | {r.peers} | {fmt(r.start_s)} | {fmt(r.ref_s)} | {fmt(r.ratio, '.1f')}"
            f" | {fmt(above, '.1f')} | {fmt(r.imports_s)} | {fmt(r.etcd_s)} | {fmt(r.setup_s)}"
            f" | {fmt(r.kernel_s)} | {fmt(r.kernel_ratio, '.1f')}"
            f" | {fmt(r.kernel_acked_s)} | {fmt(r.kernel_acked_ratio, '.1f')}"
            f" | {fmt(r.cpu_s)} | {r.rss_kib / 1024:.1f}"
            f" | {fmt(per, '.2f')} | {fmt(idle)}"
            f" | {fmt(r.churn_p50_ms, '.1f')} | {fmt(r.churn_p99_ms, '.1f')}"
            f" | {'-' if r.kernel_equals_etcd is None else r.kernel_equals_etcd}"
            f" | {r.churn_backlog if r.churn_backlog >= 0 else '-'}"
            f" | {fmt(r.churn_converged_s, '.1f')}"
            f" | {r.rss_after_churn_kib / 1024:.1f} | {fmt(rss_growth_mb(r.churn_rss))}"
            f" | {fmt(r.gbps)} | {fmt(r.gbps_churn)} |")
    return "\n".join(lines)


def table_from(doc: dict[str, Any]) -> str:
    """The markdown table of a saved JSON (python -m tests.bench_scale table FILE)."""
    fields = set(Result.__dataclass_fields__)
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in doc["results"]]
    base = {b: Result(**{k: v for k, v in r.items() if k in fields})
            for b, r in doc["one_peer"].items()}
    return table(results, base, doc["idle_seconds"])


def main() -> int:
    # The labs are removed in `finally` blocks: let SIGTERM and SIGINT (ignored by default
    # in a background job) end the run through them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: list[Result] = []
    base: dict[str, Result] = {}
    one_peer_gbps = float("nan")
    for backend in BACKENDS:
        base[backend] = run_one(backend, 1, full=False)
        b = base[backend]
        print(f"{backend}: one peer: start {b.start_s:.2f} s (imports {fmt(b.imports_s)}, etcd "
              f"{fmt(b.etcd_s)}, setup {fmt(b.setup_s)}, kernel {fmt(b.kernel_s)}), RSS "
              f"{b.rss_kib / 1024:.1f} MB", flush=True)
        if backend == "udp" and CHURN_SECONDS > 0:
            one_peer_gbps = udp_one_peer()
            print(f"udp: one peer, {one_peer_gbps:.2f} Gbit/s", flush=True)
        for n in SIZES:
            r = run_one(backend, n, full=True)
            r.ref_s = reference(backend, n)
            if backend == "udp":
                r.notes.append(f"one peer: {one_peer_gbps:.2f} Gbit/s")
            results.append(r)
            ratios = {"kernel_ratio": r.kernel_ratio, "kernel_acked_ratio": r.kernel_acked_ratio}
            print(f"{backend} {n}: {json.dumps(asdict(r) | ratios)}", flush=True)
    print(f"\nidle over {IDLE_SECONDS:g} s (shown per 30 s); churn {CHURN_RATE:g}/s for "
          f"{CHURN_SECONDS:g} s; udp Gbit/s with N peers (one peer: {fmt(one_peer_gbps)})")
    print(table(results, base, IDLE_SECONDS))
    out = Path(os.environ.get("SCALE_JSON", "bench-scale.json"))
    out.write_text(json.dumps({
        "sizes": SIZES, "idle_seconds": IDLE_SECONDS, "churn_seconds": CHURN_SECONDS,
        "churn_rate": CHURN_RATE, "udp_one_peer_gbps": one_peer_gbps,
        "one_peer": {b: asdict(r) for b, r in base.items()},
        "results": [asdict(r) | {"ratio": r.ratio, "kernel_ratio": r.kernel_ratio,
                                 "kernel_acked_ratio": r.kernel_acked_ratio}
                    for r in results]}, indent=2) + "\n")
    print(f"\n(raw figures in {out})")
    plot = os.environ.get("SCALE_PLOT", "docs/benchmarks-scale.svg")
    try:
        from tests.bench_plot import plot_scale
    except ImportError as exc:
        print(f"no plot ({exc}): pip install '.[bench]'")
        return 0
    plot_scale(json.loads(out.read_text()), Path(plot))
    print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "seed":
        asyncio.run(seed(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif len(sys.argv) > 1 and sys.argv[1] == "churn":
        asyncio.run(churn(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
                          float(sys.argv[6])))
    elif len(sys.argv) > 2 and sys.argv[1] == "table":
        print(table_from(json.loads(Path(sys.argv[2]).read_text())))
    else:
        sys.exit(main())
