"""Faults in the lab (issue 7): real etcd (one member or a three-member cluster), real tweed
processes, real kernels in namespaces, and container traffic checked before, during and
after each fault with a continuous ping whose every lost reply is counted.

Covered elsewhere and not repeated here: 20/30 agents at once, SIGTERM restarts
(tests/lab/test_hostgw_lab.py); a forced create race, the own lease deleted and re-acquired,
compaction at the LeaseManager level (tests/integration/test_etcd_leases.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.agents import Agent, bring_up, ping, put_config, routes, wait_for
from tests.lab.fault_tools import (
    PingStream,
    cut_from_etcd,
    metrics,
    mismatches,
    readyz,
)
from tests.support.etcd import EtcdServer
from tests.support.etcd_cluster import EtcdCluster
from tests.support.netns import UNDERLAY_GW, stop_processes

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
HEALTH = "9100"


def key(subnet: str, prefix: str = PREFIX) -> str:
    addr, length = subnet.split("/")
    return f"{prefix}/subnets/{addr}-{length}"


def since(agent: Agent, mark: int) -> str:
    """The agent's log written after `mark` (a length of an earlier log())."""
    return agent.log()[mark:]


def alive(*agents: Agent) -> bool:
    return all(a.proc is not None and a.proc.poll() is None for a in agents)


def vxlan_lease(public_ip: str, mac: str) -> str:
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}}, separators=(",", ":"))


# -- 1. etcd not running when the agent starts --------------------------------------------
def test_agent_started_before_etcd_waits_says_why_and_comes_up_by_itself(lab, tmp_path):
    etcd = EtcdServer(UNDERLAY_GW, netns=lab.underlay)  # made, not started
    lab.etcds.append(etcd)
    h1 = lab.add_host(1)
    # Counts (and lets through) the agent's TCP connection attempts to etcd.
    syn = ["OUTPUT", "-p", "tcp", "--syn", "-d", UNDERLAY_GW, "--dport", str(etcd.port),
           "-j", "ACCEPT"]
    h1.exec(["iptables", "-I", *syn])

    def attempts() -> int:
        out = h1.exec(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if f"dpt:{etcd.port}" in line)

    a1 = Agent(h1, etcd.client_url, tmp_path, "--healthz-port", HEALTH,
               "--resync-period", "2").start()

    def not_ready() -> str | None:
        try:
            status, body = readyz(h1, int(HEALTH))
        except Exception:  # noqa: BLE001 - the health server may not listen yet
            return None
        return body if status == 503 else None

    reason = wait_for(lambda: (r := not_ready()) and "cannot reach etcd" in r and r,
                      timeout=30, what="/readyz names the etcd outage")
    assert "/coreos.com/network/config" in reason, reason
    first = attempts()
    assert first >= 1
    # It keeps trying, and says so once, not once per attempt.
    wait_for(lambda: attempts() >= first + 3, timeout=30, what="more connection attempts")
    time.sleep(10)  # a while longer without etcd: backoff is capped, the retries go on
    later = attempts()
    wait_for(lambda: attempts() > later, timeout=30, what="attempts go on after 20 s")
    assert a1.log().count("retrying with backoff") == 1, a1.log()
    assert alive(a1)
    assert not a1.env()

    # etcd comes, without a network config yet: /readyz says that now.
    etcd.start()
    wait_for(lambda: (r := not_ready()) and "no network config" in r, timeout=60,
             what="/readyz: waiting for a config")
    put_config(etcd)
    env = a1.wait_env(timeout=60)
    wait_for(lambda: readyz(h1, int(HEALTH)) == (200, "ready"), timeout=30, what="ready")
    assert "recovered after" in a1.log()
    h1.add_docker0(env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
    c1 = h1.add_container("a", int(env["FLANNEL_MTU"]))
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: ping(c1, c2.ip, 1) and ping(c2, c1.ip, 1), timeout=30,
             what="containers reach each other")
    assert alive(a1, a2)

    # Started again while etcd is not running (a host rebooting its agent during an etcd
    # outage): it waits as above, and leaves the data path of its last run alone meanwhile,
    # so not one reply is lost before, during or after.
    subnet = a1.subnet
    stream = PingStream(c2, c1.ip, tmp_path, interval=0.1)
    try:
        assert a1.stop() == 0
        etcd.stop()
        mark = len(a1.log())
        a1.start()
        wait_for(lambda: (r := not_ready()) and "cannot reach etcd" in r, timeout=30,
                 what="/readyz names the etcd outage after the restart")
        more = attempts()
        wait_for(lambda: attempts() >= more + 2, timeout=30, what="it keeps trying")
        assert ping(c1, c2.ip, 1)
        etcd.start()
        wait_for(lambda: readyz(h1, int(HEALTH)) == (200, "ready"), timeout=60,
                 what="ready again once etcd is back")
        assert "recovered after" in since(a1, mark)
        time.sleep(1)
    finally:
        res = stream.stop()
    assert res.lost == [], res.summary()
    assert a1.subnet == subnet
    assert alive(a1, a2)


# -- 2. etcd stopped for 30 s while containers ping each other -----------------------------
UDP_PREFIX = "/tweed-udp/network"
UDP_NETWORK = "10.6.0.0/16"


def test_etcd_stopped_for_30s_loses_no_ping_and_agents_reconnect(lab, tmp_path):
    """vxlan and udp at once: two networks in one etcd under two prefixes (one config holds
    one backend), so both data paths live through the same 30 s outage without doubling
    the test's time. udp uses the default datapath (C when built)."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    etcd.put(f"{UDP_PREFIX}/config",
             json.dumps({"Network": UDP_NETWORK, "Backend": {"Type": "udp"}}))
    udp = ("--etcd-prefix", UDP_PREFIX)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", HEALTH)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    h3, a3, c3 = bring_up(lab, etcd, tmp_path, 3, "--healthz-port", HEALTH, *udp)
    _h4, a4, c4 = bring_up(lab, etcd, tmp_path, 4, *udp)
    agents = [a1, a2, a3, a4]
    wait_for(lambda: ping(c1, c2.ip, 1), timeout=30, what="vxlan containers ping")
    wait_for(lambda: ping(c3, c4.ip, 1), timeout=30, what="udp containers ping")

    streams = [PingStream(c1, c2.ip, tmp_path), PingStream(c3, c4.ip, tmp_path)]
    try:
        time.sleep(2)
        marks = [len(a.log()) for a in agents]
        etcd.stop()
        stopped = time.monotonic()
        for a, mark in zip(agents, marks, strict=True):
            wait_for(lambda a=a, mark=mark: "retrying with backoff" in since(a, mark),
                     timeout=30, what=f"{a.host.ns} notices the outage")
        # Through the outage the data path carries on and /readyz tells the truth: the
        # lease is held and the kernel programmed, so the node is ready.
        while time.monotonic() - stopped < 30:
            assert readyz(h1, int(HEALTH)) == (200, "ready")
            assert readyz(h3, int(HEALTH)) == (200, "ready")
            assert alive(*agents)
            time.sleep(3)
        etcd.start()
        for a, mark in zip(agents, marks, strict=True):
            wait_for(lambda a=a, mark=mark: "recovered after" in since(a, mark), timeout=60,
                     what=f"{a.host.ns} reconnects by itself")
        # New hosts join after the outage: the agents that lived through it route to them.
        _h5, _a5, c5 = bring_up(lab, etcd, tmp_path, 5)
        _h6, _a6, c6 = bring_up(lab, etcd, tmp_path, 6, *udp)
        wait_for(lambda: ping(c1, c5.ip, 1) and ping(c2, c5.ip, 1), timeout=30,
                 what="vxlan host joined after the outage is reachable")
        wait_for(lambda: ping(c3, c6.ip, 1) and ping(c4, c6.ip, 1), timeout=30,
                 what="udp host joined after the outage is reachable")
        time.sleep(1)
    finally:
        results = [s.stop() for s in streams]
    for name, res in zip(("vxlan", "udp"), results, strict=True):
        assert res.transmitted >= 30 / 0.2, (name, res.summary())
        assert res.lost == [], (name, res.summary())
    assert alive(*agents)


# -- 2b. one host cut off from etcd while the others go on -------------------------------
def test_one_host_cut_off_loses_no_ping_and_catches_up_when_back(lab, tmp_path):
    """A firewall rule in host 1 cuts it from etcd while a host joins and a lease goes:
    its containers' traffic never stops, /readyz stays 200, nothing is applied while it
    is cut off, and everything is once it is back, from the resumed watch (no re-list)."""
    etcd = lab.start_etcd()
    put_config(etcd)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", HEALTH)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    gone = "10.5.200.0/24"
    etcd.put(key(gone), '{"PublicIP":"192.168.100.9","PublicIPv6":null,'
                        '"BackendType":"host-gw"}')
    wait_for(lambda: "via 192.168.100.9" in routes(h1, gone), timeout=30,
             what="route to the stand-in")
    wait_for(lambda: ping(c1, c2.ip, 1) and ping(c2, c1.ip, 1), timeout=30,
             what="containers ping")
    relists = metrics(h1, int(HEALTH))["tweed_watch_relists_total"]

    streams = [PingStream(c1, c2.ip, tmp_path), PingStream(c2, c1.ip, tmp_path)]
    try:
        mark = len(a1.log())
        with cut_from_etcd(h1, UNDERLAY_GW, etcd.port):
            wait_for(lambda: "retrying with backoff" in since(a1, mark), timeout=30,
                     what="agent notices the cut")
            _h3, a3, c3 = bring_up(lab, etcd, tmp_path, 3)
            etcd.delete(key(gone))
            wait_for(lambda: ping(c2, c3.ip, 1), timeout=30, what="host 3 up for host 2")
            # Cut off, host 1 applied nothing of this, and says it is still ready.
            assert routes(h1, a3.subnet) == "" and "via 192.168.100.9" in routes(h1, gone)
            assert readyz(h1, int(HEALTH)) == (200, "ready")
        wait_for(lambda: "recovered after" in since(a1, mark), timeout=60,
                 what="agent reconnects")
        wait_for(lambda: routes(h1, gone) == "" and "via 192.168.100.3" in routes(h1, a3.subnet),
                 timeout=30, what="changes made during the cut applied")
        wait_for(lambda: ping(c1, c3.ip, 1) and ping(c3, c1.ip, 1), timeout=30,
                 what="host that joined during the cut is reachable")
        time.sleep(1)
    finally:
        results = [s.stop() for s in streams]
    for res in results:
        assert res.lost == [], res.summary()
        assert len(res.replies) >= 20, res.summary()
    assert metrics(h1, int(HEALTH))["tweed_watch_relists_total"] == relists
    assert alive(a1, a2, a3)


# -- 3. a three-member etcd cluster loses its leader, then a follower ---------------------
def test_three_member_cluster_leader_then_follower_stopped(lab, tmp_path):
    cluster = EtcdCluster(lab)
    ctl = cluster.ctl
    put_config(ctl)
    # A 60 s lease renewed 54 s before expiry: a renewal every ~6 s to watch for.
    flags = ("--subnet-lease-ttl", "60", "--subnet-lease-renew-margin", "1")

    def up(i: int):
        host = lab.add_host(i)
        agent = Agent(host, cluster.endpoints, tmp_path, "--resync-period", "2",
                      *flags).start()
        env = agent.wait_env(timeout=60)
        host.add_docker0(env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
        return host, agent, host.add_container("a", int(env["FLANNEL_MTU"]))

    h1, a1, c1 = up(1)
    h2, a2, c2 = up(2)
    subnets = {a1.subnet, a2.subnet}
    wait_for(lambda: ping(c1, c2.ip, 1), timeout=30, what="containers ping")

    def renewals(a: Agent) -> int:
        return a.log().count("renewed the lease")

    def renewing(*agents: Agent) -> None:
        counts = [renewals(a) for a in agents]
        wait_for(lambda: all(renewals(a) > n for a, n in zip(agents, counts, strict=True)),
                 timeout=40, what="lease renewals go on")

    def peer_events_flow(hosts, subnet: str, gw: str) -> None:
        ctl.put(key(subnet), json.dumps({"PublicIP": gw, "PublicIPv6": None,
                                         "BackendType": "host-gw"}))
        wait_for(lambda: all(f"via {gw}" in routes(h, subnet) for h in hosts), timeout=30,
                 what=f"peer {subnet} programmed")
        ctl.delete(key(subnet))
        wait_for(lambda: all(routes(h, subnet) == "" for h in hosts), timeout=30,
                 what=f"peer {subnet} removed")

    stream = PingStream(c1, c2.ip, tmp_path)
    try:
        leader = cluster.leader()
        leader.stop()
        # A host joins during the failover; it is reachable from the containers that were
        # there before.
        h3, a3, c3 = up(3)
        wait_for(lambda: ping(c1, c3.ip, 1) and ping(c2, c3.ip, 1) and ping(c3, c1.ip, 1),
                 timeout=30, what="host joined during the failover is reachable")
        renewing(a1, a2, a3)
        peer_events_flow([h1, h2, h3], "10.5.250.0/24", "192.168.100.50")

        # The old leader comes back (quorum of three again); then a follower stops.
        leader.start(60)
        wait_for(cluster.healthy, timeout=60, what="cluster healthy with three members")
        new_leader = cluster.leader()
        follower = next(m for m in cluster.members if m is not new_leader)
        follower.stop()
        renewing(a1, a2, a3)
        peer_events_flow([h1, h2, h3], "10.5.251.0/24", "192.168.100.51")
        assert ping(c3, c2.ip)
        time.sleep(1)
    finally:
        res = stream.stop()
    assert res.lost == [], res.summary()
    assert alive(a1, a2, a3)
    # Each agent still holds the subnet it started with.
    assert {a1.subnet, a2.subnet} == subnets
    stored = {json.loads(v)["PublicIP"] for v in ctl.get_prefix(f"{PREFIX}/subnets/").values()}
    assert stored == {"192.168.100.1", "192.168.100.2", "192.168.100.3"}


# -- 4. watch history compacted while an agent is cut off ----------------------------------
def test_compaction_while_cut_off_relists_and_converges(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", HEALTH)
    _h2, _a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    _h3, a3, _c3 = bring_up(lab, etcd, tmp_path, 3)
    wait_for(lambda: ping(c1, c2.ip, 1), timeout=30, what="containers ping")
    wait_for(lambda: "onlink" in routes(h1, a3.subnet), timeout=30, what="route to host 3")
    assert metrics(h1, int(HEALTH))["tweed_watch_relists_total"] == 1

    stream = PingStream(c1, c2.ip, tmp_path)
    try:
        mark = len(a1.log())
        with cut_from_etcd(h1, UNDERLAY_GW, etcd.port):
            wait_for(lambda: "retrying with backoff" in since(a1, mark), timeout=30,
                     what="agent notices the cut")
            # Host 3 leaves (its agent stops, an operator deletes its lease), host 4 joins,
            # and stand-in peers come and go: history that a resumed watch would replay.
            # Host 4 joins before host 3's lease is deleted: the allocator picks at random
            # among free subnets and would sometimes hand host 4 the freed one, which host 1
            # still routes (to host 3), and the check below would mean nothing.
            gone = a3.subnet
            assert a3.stop() == 0
            _h4, a4, c4 = bring_up(lab, etcd, tmp_path, 4)
            assert a4.subnet != gone
            etcd.delete(key(gone))
            for n in range(5):
                etcd.put(key(f"10.5.{240 + n}.0/24"),
                         vxlan_lease(f"192.168.100.{60 + n}", f"0e:00:00:00:01:{n:02x}"))
            for n in range(3):
                etcd.delete(key(f"10.5.{240 + n}.0/24"))
            etcd.compact(etcd.revision())
            etcd.etcdctl("defrag")
            # Cut off, host 1 applied nothing of this, and its traffic to host 2 goes on.
            assert "onlink" in routes(h1, gone) and routes(h1, a4.subnet) == ""
            assert ping(c1, c2.ip, 1)
        wait_for(lambda: "compacted" in since(a1, mark), timeout=60,
                 what="agent sees the compaction")
        wait_for(lambda: not mismatches(h1, a1.log(), etcd, PREFIX, "vxlan", "10.5.0.0/16"),
                 timeout=30, what="host 1 converges on etcd's leases")
        assert routes(h1, gone) == ""
        assert "10.5.243.0/24" in kernel_routes(h1)
        wait_for(lambda: ping(c1, c4.ip, 1) and ping(c4, c1.ip, 1), timeout=30,
                 what="host that joined during the cut is reachable")
        time.sleep(1)
    finally:
        res = stream.stop()
    assert res.lost == [], res.summary()
    assert metrics(h1, int(HEALTH))["tweed_watch_relists_total"] == 2
    assert alive(a1)


def kernel_routes(host) -> str:
    return host.exec(["ip", "route", "show", "dev", "flannel.1"]).stdout


# -- 5. SIGKILL and restart -----------------------------------------------------------------
# Marker changes that prove a monitor is subscribed: neither names the overlay network nor
# a flannel device, so the deletion check below ignores them, and tweed ignores them too.
MARK_ROUTE = "198.18.77.0/24"
MARK_DEV = "tweedmark0"


def _monitor(host, tmp_path, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start `cmd` (ip/bridge monitor) in the host and return only once it has printed a
    change made after it started: a monitor that was not listening yet would report no
    deletion at all, and an empty list of deletions would pass by accident."""
    path = tmp_path / f"{host.ns}-{name}.txt"
    with open(path, "wb") as out:
        proc = host.popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    if name == "fdb":
        if host.exec(["ip", "link", "show", MARK_DEV], check=False).returncode != 0:
            host.exec(["ip", "link", "add", MARK_DEV, "type", "vxlan", "id", "4242",
                       "dstport", "4799"])
        entry = ["00:00:00:00:00:00", "dev", MARK_DEV, "dst", "192.0.2.77"]
        change = [["bridge", "fdb", "append", *entry], ["bridge", "fdb", "del", *entry]]
        seen = f"dev {MARK_DEV} dst 192.0.2.77"
    else:
        change = [["ip", "route", "add", "blackhole", MARK_ROUTE],
                  ["ip", "route", "del", "blackhole", MARK_ROUTE]]
        seen = f"blackhole {MARK_ROUTE}"

    def printed() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} exited: {path.read_text(errors='replace')}")
        for c in change:  # made again each time until the monitor prints it
            host.exec(c)
        return seen in path.read_text(errors="replace")

    wait_for(printed, timeout=15, step=0.2, what=f"{name} monitor on {host.ns} subscribed")
    return proc, path


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp"])
def test_sigkill_and_restart_keeps_subnet_mac_and_peer_routes(lab, tmp_path, backend):
    etcd = lab.start_etcd()
    put_config(etcd, backend=backend)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: ping(c1, c2.ip, 1) and ping(c2, c1.ip, 1), timeout=30,
             what="containers ping")
    subnet, lease = a1.subnet, etcd.get(key(a1.subnet))
    dev = {"vxlan": "flannel.1", "udp": "flannel0", "host-gw": "eth0"}[backend]
    link = json.loads(h1.exec(["ip", "-j", "link", "show", dev]).stdout)[0]

    # Watch for deletions: on the peer always; on the killed host too, except with udp,
    # whose TUN (and its route) goes away with the process by design.
    watched = [h2] if backend == "udp" else [h1, h2]
    monitors = []
    for h in watched:
        monitors.append(_monitor(h, tmp_path, "ip", ["ip", "-o", "monitor", "route", "neigh"]))
        monitors.append(_monitor(h, tmp_path, "fdb", ["bridge", "monitor", "fdb"]))
    stream = PingStream(c1, c2.ip, tmp_path, interval=0.05)
    try:
        time.sleep(1)
        a1.stop(signal.SIGKILL)
        time.sleep(1)
        restarted = time.time()
        a1.start()
        wait_for(lambda: a1.log().count("holding subnet") == 2, timeout=30,
                 what="restarted agent holds a lease")
        time.sleep(2 * 2 + 1)  # two resync periods: nothing may be deleted by them either
    finally:
        res = stream.stop()
        # Listening to the end: a monitor that died early would have seen no deletion.
        listening = [p.poll() is None for p, _ in monitors]
        stop_processes([p for p, _ in monitors])
    assert all(listening), [path.read_text(errors="replace") for _, path in monitors]

    assert a1.subnet == subnet
    assert etcd.get(key(subnet)) == lease  # same lease value: same VtepMAC for vxlan
    if backend == "vxlan":
        assert json.loads(h1.exec(["ip", "-j", "link", "show", dev]).stdout)[0][
            "address"] == link["address"] == json.loads(lease)["BackendData"]["VtepMAC"]
    deleted = []
    for _, path in monitors:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Deleted") and "docker0" not in line and (
                    "10.5." in line or "flannel" in line):
                deleted.append(line)
    assert deleted == [], deleted
    assert not mismatches(h2, a2.log(), etcd, PREFIX, backend, "10.5.0.0/16")
    if backend == "udp":
        # The TUN died with the process: traffic stops, and must be back within 2 s of
        # the restart (the bound).
        back = res.first_reply_after(restarted)
        assert back is not None and back - restarted <= 2.0, (back, restarted, res.summary())
        assert len(res.lost) > 0  # the outage was real, so the check above means something
    else:
        # Kernel state outlives the process: not one ping lost.
        assert res.lost == [], res.summary()
    assert res.transmitted >= 100
    assert ping(c1, c2.ip) and ping(c2, c1.ip)
    assert alive(a1, a2)


# -- 7. the network config changed at run time ---------------------------------------------
def test_config_change_at_run_time_is_reported_not_applied(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd, backend="vxlan")
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", HEALTH)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: ping(c1, c2.ip, 1), timeout=30, what="containers ping")
    device = json.loads(h1.exec(["ip", "-d", "-j", "link", "show", "flannel.1"]).stdout)[0]
    original = etcd.get(f"{PREFIX}/config")

    def lines(a: Agent, what: str) -> list[str]:
        return [line for line in a.log().splitlines() if what in line]

    changed = "changed (backend"
    stream = PingStream(c1, c2.ip, tmp_path)
    try:
        # A new Backend option: both agents say a restart is needed, once each.
        put_config(etcd, backend="vxlan", Port=4789)
        for a in (a1, a2):
            wait_for(lambda a=a: lines(a, changed), timeout=30, what="change reported")
        line = lines(a1, changed)[0]
        assert "restart tweed to apply it" in line and '"port": 4789' in line, line
        put_config(etcd, backend="vxlan", Port=4789)  # the same again: nothing new to say
        # An invalid config: named, not applied.
        etcd.put(f"{PREFIX}/config", '{"Network":"10.5.0.0/16","SubnetLen":31,'
                                      '"Backend":{"Type":"vxlan"}}')
        wait_for(lambda: lines(a1, "invalid, not applied: SubnetLen"), timeout=30,
                 what="invalid config reported")
        # A backend option a restart could not use is invalid too, not "restart to apply".
        put_config(etcd, backend="vxlan", VNI="seven")
        wait_for(lambda: lines(a1, "invalid, not applied: Backend.VNI"), timeout=30,
                 what="invalid backend option reported")
        put_config(etcd, backend="wireguard")
        wait_for(lambda: lines(a1, "invalid, not applied: Backend.Type 'wireguard'"),
                 timeout=30, what="unavailable backend reported")
        etcd.delete(f"{PREFIX}/config")
        wait_for(lambda: lines(a1, "was deleted; tweed keeps running"), timeout=30,
                 what="deleted config reported")
        etcd.put(f"{PREFIX}/config", original)
        wait_for(lambda: lines(a1, "is the running one again"), timeout=30,
                 what="config back to the running one")
        assert len(lines(a1, changed)) == 1, lines(a1, changed)

        # A change made while the agent cannot reach etcd is reported once it reconnects.
        mark = len(a1.log())
        with cut_from_etcd(h1, UNDERLAY_GW, etcd.port):
            wait_for(lambda: "retrying with backoff" in since(a1, mark), timeout=30,
                     what="agent notices the cut")
            put_config(etcd, backend="vxlan", GBP=True)
        wait_for(lambda: '"gbp": true' in "".join(lines(a1, changed)), timeout=60,
                 what="change made during the cut reported")

        # Throughout: the running config stays applied, traffic flows, still ready.
        now = json.loads(h1.exec(["ip", "-d", "-j", "link", "show", "flannel.1"]).stdout)[0]
        assert now["ifindex"] == device["ifindex"]
        assert now["linkinfo"]["info_data"]["port"] == 8472
        assert "gbp" not in now["linkinfo"]["info_data"]
        assert readyz(h1, int(HEALTH)) == (200, "ready")
        assert ping(c2, c1.ip)
        time.sleep(1)
    finally:
        res = stream.stop()
    assert res.lost == [], res.summary()
    assert alive(a1, a2)
    # One line per state, never one per event or per reconnect.
    for what in ("SubnetLen", "Backend.VNI", "wireguard"):
        assert len(lines(a1, what)) == 1, lines(a1, what)
    assert not re.search(r"ERROR .*stopped by an error", a1.log())


def test_own_lease_deleted_by_an_operator_is_reacquired_within_2s(lab, tmp_path):
    """`etcdctl del` of a running agent's own lease: the same subnet is leased again within
    2 s (the bound the issue sets), subnet.env is unchanged, and no ping is lost."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="host-gw")
    _h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    _h2, _a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: ping(c1, c2.ip, count=1), timeout=10, what="overlay up")
    own = key(a1.subnet)
    value = etcd.get(own)
    env = a1.env()
    stream = PingStream(c2, c1.ip, tmp_path, interval=0.05)
    time.sleep(0.5)
    etcd.delete(own)
    deleted = time.monotonic()
    wait_for(lambda: etcd.get(own), timeout=10, step=0.02, what="own lease back")
    took = time.monotonic() - deleted
    time.sleep(0.5)
    result = stream.stop()
    assert took < 2.0, f"re-acquired after {took:.2f} s"
    assert etcd.get(own) == value and a1.env() == env
    assert result.lost == [] and len(result.replies) > 10
    assert "lost our lease" in a1.log() and alive(a1)
