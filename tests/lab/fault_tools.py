"""Tools for fault tests and the soak run: continuous ping, etcd cut-offs, and a comparison
of what an agent programmed against the leases in etcd.

- `PingStream`: `ping -D -i <interval>` running in a namespace for a whole scenario, its
  output in a file (a pipe nobody reads would fill up and stall ping on a long run); `stop()`
  gives every reply's sequence number and time, so a test counts lost pings and finds
  when traffic came back.
- `cut_from_etcd`: a REJECT rule (TCP reset) in a host's own namespace towards etcd, removed
  on exit also when the test fails (and gone with the namespace anyway).
- `mismatches`: the agent's kernel state (host-gw, vxlan) or udp datapath peer table
  against the leases in etcd, as readable lines; empty when they agree. The udp table is
  not exposed by tweed (its /metrics counts peers, not which address each subnet goes to),
  so it is read by probing the datapath itself: `udp_datapath_peers`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import Namespace

_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from \S+ icmp_seq=(\d+) .*time=")
_SENT = re.compile(r"(\d+) packets transmitted")


@dataclass
class PingResult:
    """What one PingStream saw: packets sent, and the time of each answered sequence."""

    transmitted: int
    replies: dict[int, float] = field(default_factory=dict)  # icmp_seq -> wall time
    output: str = ""

    @property
    def lost(self) -> list[int]:
        """Sequences never answered. The very last one may still have been in flight when
        ping was interrupted, so it alone does not count."""
        missing = [s for s in range(1, self.transmitted + 1) if s not in self.replies]
        if missing and missing[-1] == self.transmitted and self.transmitted - 1 in self.replies:
            missing.pop()
        return missing

    def first_reply_after(self, t: float) -> float | None:
        """Wall time of the first reply later than `t` (time.time()), or None."""
        later = [r for r in self.replies.values() if r > t]
        return min(later) if later else None

    def summary(self) -> str:
        return f"{self.transmitted} sent, {len(self.replies)} answered, lost {self.lost}"


class PingStream:
    """`ping -D -n -i interval dest` in namespace `ns` until stop()."""

    def __init__(self, ns: Namespace, dest: str, workdir: Path, interval: float = 0.2,
                 name: str | None = None) -> None:
        self.dest = dest
        self.path = workdir / f"ping-{name or ns.ns}-{dest}.txt"
        with open(self.path, "wb") as out:
            # -W 5: a late reply (a loaded 2-CPU machine) is still counted, not lost.
            self.proc = ns.popen(["ping", "-D", "-n", "-i", str(interval), "-W", "5", dest],
                                 stdout=out, stderr=subprocess.STDOUT)
        self.started = time.time()

    def stop(self) -> PingResult:
        """Interrupt ping (SIGINT, by PID: it prints its statistics) and parse its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        text = self.path.read_text(errors="replace")
        replies: dict[int, float] = {}
        for line in text.splitlines():
            m = _REPLY.match(line)
            if m and "DUP!" not in line:
                replies.setdefault(int(m.group(2)), float(m.group(1)))
        sent = _SENT.search(text)
        if sent is None:
            raise AssertionError(f"ping to {self.dest} printed no statistics:\n{text[-2000:]}")
        return PingResult(int(sent.group(1)), replies, text)


@contextlib.contextmanager
def cut_from_etcd(host: Namespace, etcd_host: str, etcd_port: int) -> Iterator[None]:
    """Reject (TCP reset) the host's connections to etcd while inside the block."""
    rule = ["OUTPUT", "-d", etcd_host, "-p", "tcp", "--dport", str(etcd_port),
            "-j", "REJECT", "--reject-with", "tcp-reset"]
    host.exec(["iptables", "-I", *rule])
    try:
        yield
    finally:
        host.exec(["iptables", "-D", *rule], check=False)


def readyz(host: Namespace, port: int) -> tuple[int, str]:
    """(status, body) of the agent's /readyz, asked from inside the host's namespace;
    status 0 when nothing answers."""
    code = (
        "import urllib.request, urllib.error\n"
        f"try:\n r = urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=5)\n"
        " print(r.status, r.read().decode().strip())\n"
        "except urllib.error.HTTPError as e:\n"
        " print(e.code, e.read().decode().strip())\n"
        "except OSError as e:\n"
        " print(0, e)\n"
    )
    out = host.exec([sys.executable, "-c", code]).stdout.strip()
    status, _, body = out.partition(" ")
    return int(status), body


def metrics(host: Namespace, port: int) -> dict[str, float]:
    """The agent's /metrics as {'name{labels}': value}."""
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',"
            " timeout=5).read().decode())")
    values = {}
    for line in host.exec([sys.executable, "-c", code]).stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for PID {pid}")


# -- what the agent programmed versus etcd ------------------------------------------------
def leases(etcd: Any, prefix: str) -> dict[ipaddress.IPv4Network, dict[str, Any]]:
    """The leases under `<prefix>/subnets/`, by subnet (keys that do not parse are left out)."""
    out = {}
    for key, value in etcd.get_prefix(f"{prefix}/subnets/").items():
        name = key.rsplit("/", 1)[-1]
        try:
            addr, length = name.split("-")
            subnet = ipaddress.IPv4Network(f"{addr}/{length}")
            out[subnet] = json.loads(value)
        except ValueError:
            continue
    return out


def _json(host: Namespace, *cmd: str) -> list[dict[str, Any]]:
    res = host.exec(list(cmd), check=False)
    if res.returncode != 0:
        if "Cannot find device" in res.stderr:
            return []  # not made yet (or gone): no entries on it, which is what counts
        raise AssertionError(f"{cmd}: {res.stderr.strip()}")
    out = res.stdout.strip()
    return json.loads(out) if out else []


def kernel_peers(host: Namespace, backend: str, network: str) -> dict[str, tuple[str, ...]]:
    """What the host's kernel says each peer subnet maps to.

    host-gw: subnet -> (gateway,); vxlan: subnet -> (VtepMAC, PublicIP) through the route,
    the neighbour entry and the FDB entry (a missing link shows as "?").
    """
    net = ipaddress.IPv4Network(network)
    out: dict[str, tuple[str, ...]] = {}
    if backend == "host-gw":
        for r in _json(host, "ip", "-j", "-4", "route", "show", "dev", "eth0"):
            dst = r.get("dst", "")
            if "/" in dst and ipaddress.IPv4Network(dst).subnet_of(net) and r.get("gateway"):
                out[dst] = (r["gateway"],)
        return out
    if backend != "vxlan":
        raise ValueError(f"no kernel view for backend {backend}")
    neigh = {n["dst"]: n.get("lladdr", "?")
             for n in _json(host, "ip", "-j", "-4", "neigh", "show", "dev", "flannel.1")}
    fdb = {f["mac"]: f.get("dst", "?")
           for f in _json(host, "bridge", "-j", "fdb", "show", "dev", "flannel.1")
           if f.get("dst")}
    for r in _json(host, "ip", "-j", "-4", "route", "show", "dev", "flannel.1"):
        dst = r.get("dst", "")
        if "/" not in dst or not ipaddress.IPv4Network(dst).subnet_of(net):
            continue
        mac = neigh.get(r.get("gateway", ""), "?")
        out[dst] = (mac, fdb.get(mac, "?"))
    return out


# Run in a host's namespace: one datagram into each subnet (through the kernel's route to
# flannel0, so through tweed's udp datapath), and a packet socket on eth0 that sees what
# leaves the host: a UDP datagram to port 8285 whose payload is our probe names the peer
# the datapath chose for that subnet. A subnet the datapath has no route for sends nothing.
_PROBE = r"""
import json, socket, struct, sys, time
subnets, port, window = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
cap.bind(("eth0", 0))
cap.settimeout(0.05)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dest = {}
for net in subnets:
    base, length = net.split("/")
    n = struct.unpack("!I", socket.inet_aton(base))[0]
    addr = socket.inet_ntoa(struct.pack("!I", n + (1 << (32 - int(length))) - 3))
    dest[socket.inet_aton(addr)] = net
    try:
        tx.sendto(b"tweed-probe", (addr, 9))
    except OSError:
        pass  # no route at all: the datapath is not reached either
seen = {}
end = time.monotonic() + window
while time.monotonic() < end and len(seen) < len(subnets):
    try:
        frame, where = cap.recvfrom(65535)
    except TimeoutError:
        continue
    if where[2] != socket.PACKET_OUTGOING:
        continue
    if len(frame) < 14 + 20 + 8 + 20 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        continue
    ihl = (frame[14] & 15) * 4
    udp = 14 + ihl
    if struct.unpack("!H", frame[udp + 2:udp + 4])[0] != port:
        continue
    inner = frame[udp + 8:]
    net = dest.get(bytes(inner[16:20]))
    if net is not None and b"tweed-probe" in inner:
        seen[net] = socket.inet_ntoa(frame[30:34])
print(json.dumps(seen))
"""


def udp_datapath_peers(host: Namespace, subnets: Iterable[str], port: int = 8285,
                       window: float = 0.6) -> dict[str, tuple[str, ...]]:
    """The udp datapath's peer table for `subnets`, read from the datapath itself: for each
    subnet, the underlay address its probe datagram was sent to (subnets the datapath has
    no route for are left out). Probes leave from the host's own namespace. What is sent to
    an address that answers no ARP never leaves eth0 to be seen: give such stand-in peers
    a static neighbour entry (the soak does)."""
    nets = sorted(set(subnets))
    if not nets:
        return {}
    out = host.exec([sys.executable, "-c", _PROBE, json.dumps(nets), str(port), str(window)],
                    timeout=30).stdout
    return {net: (peer,) for net, peer in json.loads(out).items()}


def expected_peers(etcd: Any, prefix: str, backend: str, own_ip: str
                   ) -> dict[str, tuple[str, ...]]:
    """What the agent with PublicIP `own_ip` should have programmed for the leases in etcd."""
    out: dict[str, tuple[str, ...]] = {}
    for subnet, lease in leases(etcd, prefix).items():
        if lease.get("PublicIP") == own_ip:
            continue
        btype = lease.get("BackendType", "udp") or "udp"
        if backend == "udp":
            out[str(subnet)] = (lease["PublicIP"],)
        elif btype != backend:
            continue  # host-gw and vxlan ignore peers of another type, as flanneld does
        elif backend == "host-gw":
            out[str(subnet)] = (lease["PublicIP"],)
        else:
            out[str(subnet)] = (lease["BackendData"]["VtepMAC"], lease["PublicIP"])
    return out


def mismatches(host: Namespace, agent_log: str, etcd: Any, prefix: str, backend: str,
               network: str, probe: Iterable[str] = ()) -> list[str]:
    """Lines naming each difference between the agent's state and the leases in etcd.

    udp: the subnets in etcd and those in `probe` (subnets that were leased once: a stale
    entry shows only if it is probed) are probed in the datapath. `agent_log` is no longer
    read; it stays for the callers."""
    own = host.address  # type: ignore[attr-defined]
    want = expected_peers(etcd, prefix, backend, own)
    if backend == "udp":
        mine = {str(s) for s, lease in leases(etcd, prefix).items()
                if lease.get("PublicIP") == own}
        have = udp_datapath_peers(host, (set(want) | set(probe)) - mine)
    else:
        have = kernel_peers(host, backend, network)
    out = []
    for subnet in sorted(set(want) | set(have)):
        if want.get(subnet) != have.get(subnet):
            out.append(f"{host.ns} {subnet}: etcd {want.get(subnet)}, agent {have.get(subnet)}")
    return out
