"""IPv6 through the udp datapaths on the real kernel (issue 14): two hosts' datapaths
(tests/lab/udp6_host.py, each in its host namespace with a real flannel0 TUN, vnet header
and TSO on) carry ping -6 and iperf3 -6 between container namespaces over the v4
underlay and over a v6 underlay, both datapaths, and v4 containers over the v6 underlay.
The containers get their v6 addresses here (the lab support makes v4 ones): docker0 holds
the host's v6 /64, flannel0 routes the overlay's /32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.lab.agents import ping

pytestmark = pytest.mark.lab

OVERLAY6 = "fd00:5::/32"  # fd00:5:<i>::/64 for host i


def v6_subnet(i: int) -> str:
    return f"fd00:5:{i}::/64"


def under6(i: int) -> str:
    return f"fd99::{i}"


def start(host, i: int, other: int, dp: str, underlay: str):
    """Host i's datapath, routing the other host's subnets over `underlay` (4 or 6)."""
    peer = f"192.168.100.{other}" if underlay == "4" else under6(other)
    cmd = [sys.executable, "-m", "tests.lab.udp6_host", "--datapath", dp,
           "--bind4", host.address, "--own", f"10.5.{i}.0/24", "--own", v6_subnet(i),
           "--route", f"{v6_subnet(other)}={peer}", "--route", f"10.5.{other}.0/24={peer}"]
    if underlay == "6":
        cmd += ["--bind6", under6(i)]
    proc = host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until ready (or the process ended)
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None
                                      else "")
    host.exec(["ip", "-6", "route", "add", OVERLAY6, "dev", "flannel0"])
    host.exec(["ip", "route", "add", "10.5.0.0/16", "dev", "flannel0"])
    return proc


def stop(proc) -> dict[str, int]:
    """SIGTERM by PID; the counters it printed on the way out."""
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, err
    return json.loads(lines[-1])


def host_with_container(lab, i: int, underlay: str):
    host = lab.add_host(i)
    host.exec(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
    if underlay == "6":
        host.exec(["ip", "-6", "addr", "add", f"{under6(i)}/64", "dev", "eth0", "nodad"])
    host.add_docker0(f"10.5.{i}.1/24", 1452)
    host.exec(["ip", "-6", "addr", "add", f"fd00:5:{i}::1/64", "dev", "docker0", "nodad"])
    c = host.add_container("a", 1452)
    c.exec(["ip", "-6", "addr", "add", f"fd00:5:{i}::a/64", "dev", "eth0", "nodad"])
    c.exec(["ip", "-6", "route", "add", "default", "via", f"fd00:5:{i}::1"])
    return host, c


def wait_ping(c, address: str, timeout: float = 20.0) -> bool:
    """ND on docker0 and the bridge's learning take a moment: ping until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(c, address, 1):
            return True
    return False


def iperf(client, server, address: str) -> dict:
    srv = server.popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = client.exec(["iperf3", "-c", address, "-t", "2", "-J"], timeout=60).stdout
        srv.wait(timeout=30)
    finally:
        if srv.poll() is None:
            srv.terminate()
            srv.wait(timeout=10)
    return json.loads(out)["end"]


@pytest.mark.parametrize("underlay", ["4", "6"], ids=["v4-underlay", "v6-underlay"])
@pytest.mark.parametrize("dp", ["python", "c"])
def test_v6_containers_ping_and_iperf3(lab, dp, underlay):
    h1, c1 = host_with_container(lab, 1, underlay)
    h2, c2 = host_with_container(lab, 2, underlay)
    p1 = start(h1, 1, 2, dp, underlay)
    p2 = start(h2, 2, 1, dp, underlay)
    assert wait_ping(c1, "fd00:5:2::a"), "ping -6 across the overlay"
    res = c1.exec(["ping", "-6", "-c", "5", "-i", "0.2", "-W", "2", "fd00:5:2::a"])
    assert " 0% packet loss" in res.stdout
    # The hop limit: host 1's kernel takes one, then a hop limit of 1 runs out in host 1's
    # datapath (sending) or host 2's (receiving); each answers time exceeded from its
    # flannel0 v6 address (its subnet's first), which ping accepts (checksum and all).
    for hops, router in ((2, "fd00:5:1::"), (3, "fd00:5:2::")):
        res = c1.exec(["ping", "-6", "-c", "1", "-t", str(hops), "-W", "2", "fd00:5:2::a"],
                      check=False)
        assert f"From {router} icmp_seq=1 Time exceeded" in res.stdout, res.stdout
    end = iperf(c1, c2, "fd00:5:2::a")
    assert end["sum_received"]["bytes"] > 1_000_000
    if underlay == "6":  # and v4 containers over the v6 underlay
        assert wait_ping(c1, c2.ip)
    n1, n2 = stop(p1), stop(p2)
    assert n1["tx_packets"] > 1000 and n2["rx_packets"] > 1000
    assert n2["rx_drop_spoofed_source"] == 0 and n2["rx_drop_dst_outside"] == 0
    if dp == "c":
        assert n1["tso_reads"] > 0, n1  # TSO6 super-packets were cut
    # The kernel's ND/MLD chatter on flannel0 was counted, not sent.
    assert n1["tx_drop_malformed"] == 0
