"""Drift repaired from kernel notifications, with a real tweed, a real etcd and the kernel's
VXLAN: 2,000 vxlan peer leases, entries deleted and changed by hand and put right while
the backstop (--resync-period 3600) cannot have run; a notification overflow (a tiny
receive buffer, test-only) leads to a counted full re-read and a correct kernel; a deleted
flannel.1 is logged once and crashes nothing."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from tests.lab.agents import PREFIX, Agent, bring_up, put_config, routes, subnet_key, wait_for
from tests.lab.fault_tools import expected_peers, metrics, mismatches

pytestmark = pytest.mark.lab

NETWORK = "10.0.0.0/8"
HEALTH = 8475

_SEED = """
import base64, json, sys, urllib.request
url, items = sys.argv[1], json.load(sys.stdin)
b64 = lambda s: base64.b64encode(s.encode()).decode()
for i in range(0, len(items), 100):  # etcd allows 128 operations per transaction
    ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in items[i:i + 100]]
    req = urllib.request.Request(url + "/v3/kv/txn", json.dumps({"success": ops}).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
"""


def peer_leases(n: int) -> dict[str, dict]:
    """n vxlan leases of made-up hosts (no traffic is sent to them): subnet -> lease."""
    out = {}
    for i in range(n):
        subnet = f"10.{1 + i // 256}.{i % 256}.0/24"
        out[subnet] = {"PublicIP": f"172.31.{i // 250}.{1 + i % 250}", "PublicIPv6": None,
                       "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:{i >> 8:02x}:"
                                                            f"{i & 0xFF:02x}"}}
    return out


def seed(lab, etcd, leases: dict[str, dict]) -> None:
    """Put the leases in a few transactions through etcd's JSON gateway, from the underlay
    namespace (where etcd listens); etcdctl would take a process per key."""
    items = [[subnet_key(s), json.dumps(v, separators=(",", ":"))] for s, v in leases.items()]
    subprocess.run(["ip", "netns", "exec", lab.underlay, sys.executable, "-c", _SEED,
                    etcd.client_url], input=json.dumps(items), text=True, check=True,
                   timeout=120)


def start(lab, etcd, tmp_path, n: int, *extra: str, env: dict[str, str] | None = None):
    put_config(etcd, backend="vxlan", network=NETWORK)
    seed(lab, etcd, peer_leases(n))
    host = lab.add_host(1)
    agent = Agent(host, etcd.client_url, tmp_path, "--resync-period", "3600",
                  "--healthz-port", str(HEALTH), *extra, env=env).start()
    agent.wait_env(timeout=60)
    return host, agent


def in_step(host, agent, etcd) -> list[str]:
    return mismatches(host, agent.log(), etcd, PREFIX, "vxlan", NETWORK)


def wait_in_step(host, agent, etcd, timeout: float, what: str) -> None:
    wait_for(lambda: agent.proc.poll() is None and not in_step(host, agent, etcd), timeout,
             what=what, detail=lambda: "\n".join(in_step(host, agent, etcd)[:20])
             + f"\nlog tail:\n{agent.log()[-3000:]}")


def counts(host) -> tuple[int, int]:
    """(permanent neighbours, FDB entries with a destination) on flannel.1."""
    neigh = host.exec(["ip", "-4", "neigh", "show", "dev", "flannel.1", "nud",
                       "permanent"]).stdout.strip().splitlines()
    fdb = [x for x in host.exec(["bridge", "fdb", "show", "dev", "flannel.1"]
                                ).stdout.splitlines() if " dst " in x]
    return len(neigh), len(fdb)


def resyncs(m: dict[str, float], reason: str) -> float:
    return sum(v for k, v in m.items()
               if k.startswith("tweed_kernel_resyncs_total{") and f'reason="{reason}"' in k)


def test_hand_edits_of_2000_peers_are_repaired_from_notifications(lab, tmp_path):
    etcd = lab.start_etcd()
    n = 2000
    host, agent = start(lab, etcd, tmp_path, n)
    wait_in_step(host, agent, etcd, 120, "all 2,000 peers programmed")
    assert counts(host) == (n, n)
    want = expected_peers(etcd, PREFIX, "vxlan", host.address)
    assert len(want) == n

    def ops(kind: str, op: str) -> float:
        key = f'tweed_kernel_operations_total{{kind="{kind}",op="{op}",result="ok"}}'
        return metrics(host, HEALTH)[key]

    assert [ops(k, "replace") for k in ("route", "neigh", "fdb")] == [n, n, n]

    # Delete random routes, neighbours and FDB entries, and change one of each, by hand.
    rng = random.Random(12)
    peers = sorted(want)
    route_gone, neigh_gone, fdb_gone = (rng.sample(peers[10:], 60) for _ in range(3))
    host.exec(["ip", "-batch", "-"], input="".join(f"route del {s}\n" for s in route_gone))
    host.exec(["ip", "-batch", "-"], input="".join(
        f"neigh del {s.split('/')[0]} dev flannel.1\n" for s in neigh_gone))
    host.exec(["bridge", "-batch", "-"], input="".join(
        f"fdb del {want[s][0]} dst {want[s][1]} dev flannel.1\n" for s in fdb_gone))
    changed = peers[7]
    gw = changed.split("/")[0]
    host.exec(["ip", "route", "replace", changed, "via", "10.99.99.0", "dev", "flannel.1",
               "onlink"])
    host.exec(["ip", "neigh", "replace", peers[8].split("/")[0], "lladdr",
               "0a:ee:ee:ee:ee:ee", "nud", "permanent", "dev", "flannel.1"])
    host.exec(["bridge", "fdb", "replace", want[peers[9]][0], "dst", "172.30.0.9", "self",
               "permanent", "dev", "flannel.1"])
    # A stray permanent neighbour on our device is removed too.
    host.exec(["ip", "neigh", "replace", "10.250.0.1", "lladdr", "0a:ee:ee:ee:ee:01", "nud",
               "permanent", "dev", "flannel.1"])

    wait_in_step(host, agent, etcd, 10, "the kernel equal to etcd again")
    wait_for(lambda: counts(host) == (n, n), 10, what="the stray neighbour removed")
    assert f"{gw} " in host.exec(["ip", "neigh", "show", "dev", "flannel.1"]).stdout
    # Every deleted or changed entry was written again, the stray one removed.
    assert [ops(k, "replace") for k in ("route", "neigh", "fdb")] == [n + 61] * 3
    assert ops("neigh", "delete") == 1
    m = metrics(host, HEALTH)
    assert resyncs(m, "period") == 0  # the backstop (3600 s) cannot have run
    assert m['tweed_kernel_resyncs_total{reason="event",result="repaired"}'] >= 1
    assert m['tweed_kernel_events_total{result="drift"}'] >= 1
    assert m['tweed_kernel_events_total{result="ignored"}'] >= 3 * n  # echoes of the start
    assert "resync (after a kernel notification) repaired the kernel state" in agent.log()

    # Our own repairs echo back as notifications: they start no further syncs.
    before = resyncs(m, "event")
    wait_for(lambda: resyncs(metrics(host, HEALTH), "event") == before, 5,
             what="no sync after the repair settled")
    host.exec(["sleep", "1"])
    assert resyncs(metrics(host, HEALTH), "event") == before

    # The device deleted by hand (recreating it is another matter): logged once, and the
    # agent goes on.
    host.exec(["ip", "link", "del", "flannel.1"])
    wait_for(lambda: "was deleted" in agent.log(), 5, what="the deletion logged")
    host.exec(["sleep", "1"])
    assert agent.proc.poll() is None
    assert len(re.findall(r"device flannel\.1 \(index \d+\) was deleted", agent.log())) == 1
    assert agent.stop() == 0


def test_overflowing_notifications_mean_a_counted_full_reread(lab, tmp_path):
    etcd = lab.start_etcd()
    n = 500
    # A receive buffer of a few notifications: the start's own echoes overflow it.
    host, agent = start(lab, etcd, tmp_path, n, env={"TWEED_TEST_MONITOR_RCVBUF": "2048"})
    wait_in_step(host, agent, etcd, 60, "all peers programmed")
    wait_for(lambda: metrics(host, HEALTH).get("tweed_kernel_events_lost_total", 0) >= 1, 10,
             what="an overflow counted")
    assert "kernel notifications were lost (ENOBUFS" in agent.log()

    # A flood of hand deletions overflows it again; the full re-read puts all of it right.
    lost = metrics(host, HEALTH)["tweed_kernel_events_lost_total"]
    want = expected_peers(etcd, PREFIX, "vxlan", host.address)
    host.exec(["ip", "-batch", "-"], input="".join(
        f"neigh del {s.split('/')[0]} dev flannel.1\n" for s in sorted(want)[:300]))
    wait_in_step(host, agent, etcd, 10, "the kernel equal to etcd after the overflow")
    wait_for(lambda: counts(host) == (n, n), 10, what="every neighbour back")
    m = metrics(host, HEALTH)
    assert m["tweed_kernel_events_lost_total"] > lost
    assert m['tweed_kernel_resyncs_total{reason="lost",result="repaired"}'] >= 1
    assert resyncs(m, "period") == 0
    assert agent.log().count("kernel notifications were lost") == m[
        "tweed_kernel_events_lost_total"]
    assert agent.stop() == 0


@pytest.mark.parametrize("backend", ["host-gw", "udp"])
def test_routes_deleted_by_hand_come_back_without_the_backstop(lab, tmp_path, backend):
    """host-gw: a peer's route; udp: the Network route on flannel0; with a 3600 s backstop."""
    etcd = lab.start_etcd()
    put_config(etcd, backend=backend)
    h1, a1, _ = bring_up(lab, etcd, tmp_path, 1, resync="3600")
    _, a2, _ = bring_up(lab, etcd, tmp_path, 2, resync="3600")
    if backend == "host-gw":
        dst, shows = a2.subnet, "via 192.168.100.2 dev eth0"
    else:
        dst, shows = "10.5.0.0/16", "dev flannel0"
    wait_for(lambda: shows in routes(h1, dst), 30, what=f"{dst} programmed")
    key = 'tweed_kernel_resyncs_total{reason="event",result="repaired"}'
    for i in (1, 2):  # and again: the first repair's echo must not have stopped anything
        h1.exec(["ip", "route", "del", dst])  # (the repair may beat a look at the table)
        wait_for(lambda: metrics(h1, HEALTH)[key] == i, 5, what=f"repair {i} counted")  # noqa: B023
        assert shows in routes(h1, dst)
    assert resyncs(metrics(h1, HEALTH), "period") == 0
    assert a1.stop() == 0 and a2.stop() == 0


def test_lease_changes_at_2000_peers_are_planned_from_what_changed(lab, tmp_path):
    """With the monitor running, a batch of lease changes (a join, a PublicIP change, a
    VtepMAC change, a leave) is diffed by key against the cached view: the kernel ends equal
    to etcd with no further dump of it and no full plan."""
    etcd = lab.start_etcd()
    n = 2000
    host, agent = start(lab, etcd, tmp_path, n)
    wait_in_step(host, agent, etcd, 120, "all 2,000 peers programmed")
    # The first batch after the start may still be a full plan (the listing's deletions).
    wait_for(lambda: metrics(host, HEALTH)['tweed_kernel_plans_total{scope="full"}'] >= 1, 10,
             what="the start planned")
    before = metrics(host, HEALTH)
    leases = peer_leases(n + 1)
    joined = f"10.{1 + n // 256}.{n % 256}.0/24"
    moved, remac, left = "10.1.5.0/24", "10.1.6.0/24", "10.1.7.0/24"
    leases[moved]["PublicIP"] = "172.30.9.9"
    leases[remac]["BackendData"]["VtepMAC"] = "0a:ee:00:00:00:06"
    for subnet in (joined, moved, remac):
        etcd.put(subnet_key(subnet), json.dumps(leases[subnet], separators=(",", ":")))
    etcd.delete(subnet_key(left))
    wait_for(lambda: left not in expected_peers(etcd, PREFIX, "vxlan", host.address), 10,
             what="the leave visible in etcd")
    wait_in_step(host, agent, etcd, 30, "the kernel equal to etcd after the changes")
    after = metrics(host, HEALTH)

    def grew(key: str) -> float:
        return after[key] - before[key]

    assert grew('tweed_kernel_plans_total{scope="changed"}') >= 1
    assert grew('tweed_kernel_plans_total{scope="full"}') == 0
    assert sum(grew(f'tweed_kernel_reads_total{{kind="{k}",source="dump"}}')
               for k in ("route", "neigh", "fdb")) == 0
    assert counts(host) == (n, n)  # one joined, one left
    assert agent.stop() == 0


def test_routes_flushed_with_an_address_come_back_with_it(lab, tmp_path):
    """The kernel drops host-gw routes through an address it removes and says so only with
    the address's own notification: with a 3600 s backstop, the route is back as soon as
    the address is."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="host-gw")
    h1, a1, _ = bring_up(lab, etcd, tmp_path, 1, resync="3600")
    _, a2, _ = bring_up(lab, etcd, tmp_path, 2, resync="3600")
    dst, shows = a2.subnet, "via 192.168.100.2 dev eth0"
    wait_for(lambda: shows in routes(h1, dst), 30, what=f"{dst} programmed")
    address = f"{h1.address}/24"
    h1.exec(["ip", "addr", "del", address, "dev", "eth0"])
    try:
        wait_for(lambda: routes(h1, dst) == "", 5, what="the route flushed with the address")
    finally:
        h1.exec(["ip", "addr", "add", address, "dev", "eth0"])
    wait_for(lambda: shows in routes(h1, dst), 5, what="the route back with the address",
             detail=lambda: a1.log()[-2000:])
    m = metrics(h1, HEALTH)
    assert resyncs(m, "period") == 0
    assert m['tweed_kernel_events_total{result="drift"}'] >= 2  # the deletion, the addition
    assert a1.proc.poll() is None
    assert a1.stop() == 0 and a2.stop() == 0
