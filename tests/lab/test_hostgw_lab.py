"""host-gw end to end: real tweed processes on lab hosts, a real etcd, real pings."""

from __future__ import annotations

import json
import signal
import time

import pytest

from backends.routed import REMOVAL_GRACE
from tests.lab.agents import Agent, bring_up, ping, put_config, routes, subnet_key, wait_for
from tests.lab.fault_tools import readyz

pytestmark = pytest.mark.lab


def test_hosts_carry_container_traffic_over_host_gw(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    assert a1.subnet != a2.subnet
    assert a1.env()["FLANNEL_MTU"] == "1500"  # host-gw adds no header
    assert a1.env()["FLANNEL_NETWORK"] == "10.5.0.0/16"

    # Each host routes the other's subnet via the other's eth0 address.
    wait_for(lambda: "via 192.168.100.2 dev eth0" in routes(h1, a2.subnet), what="route h1->h2")
    wait_for(lambda: "via 192.168.100.1 dev eth0" in routes(h2, a1.subnet), what="route h2->h1")
    assert ping(c1, c2.ip) and ping(c2, c1.ip)

    # The leases in etcd are flanneld's JSON.
    assert json.loads(etcd.get(subnet_key(a1.subnet))) == {
        "PublicIP": "192.168.100.1", "PublicIPv6": None, "BackendType": "host-gw"
    }

    # A third host joins and is reachable from both.
    _h3, a3, c3 = bring_up(lab, etcd, tmp_path, 3)
    wait_for(lambda: "via 192.168.100.3" in routes(h1, a3.subnet), what="route h1->h3")
    wait_for(lambda: "via 192.168.100.3" in routes(h2, a3.subnet), what="route h2->h3")
    assert ping(c1, c3.ip) and ping(c3, c2.ip)

    # A route deleted by hand comes back within the resync period (2 s here).
    h1.exec(["ip", "route", "del", a2.subnet])
    assert routes(h1, a2.subnet) == ""
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), timeout=2 + 3,
             what="route restored by resync")
    assert ping(c1, c2.ip)

    # Host 3 stops (its lease stays), then its lease is deleted: the routes to it go.
    assert a3.stop() == 0
    assert etcd.get(subnet_key(a3.subnet)) is not None
    etcd.delete(subnet_key(a3.subnet))
    wait_for(lambda: routes(h1, a3.subnet) == "" and routes(h2, a3.subnet) == "",
             timeout=REMOVAL_GRACE + 2, what="routes to host 3 removed (after the grace)")
    assert ping(c1, c2.ip)


def test_sigterm_leaves_lease_and_routes_and_restart_keeps_the_subnet(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1)
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), what="route h1->h2")
    subnet = a1.subnet

    assert a1.stop(signal.SIGTERM, timeout=2) == 0  # clean stop within 2 s
    assert "via 192.168.100.2" in routes(h1, a2.subnet)  # kernel state left in place
    assert etcd.get(subnet_key(subnet)) is not None  # lease left in place
    assert ping(c1, c2.ip)  # traffic still flows while the agent is down

    a1.start()
    wait_for(lambda: a1.log().count("holding subnet") == 2, what="restarted agent holds a lease")
    assert a1.subnet == subnet
    assert len(etcd.get_prefix(f"{subnet_key(subnet).rsplit('/', 1)[0]}/")) == 2

    # SIGINT stops it cleanly too.
    assert a1.stop(signal.SIGINT, timeout=2) == 0


def test_unknown_backend_is_waited_out_like_any_invalid_config(lab, tmp_path):
    """A Backend.Type tweed lacks is an invalid config: one line naming it, /readyz says
    why, no subnet.env; the agent comes up once the config is fixed."""
    etcd = lab.start_etcd()
    put_config(etcd, backend="wireguard")
    host = lab.add_host(1)
    agent = Agent(host, etcd.client_url, tmp_path, "--healthz-port", "9100").start()
    want = "Backend.Type 'wireguard' is not available"

    def waiting() -> tuple[int, str] | None:
        answer = readyz(host, 9100)
        return answer if want in answer[1] else None

    status, body = wait_for(waiting, timeout=30, what="/readyz naming the backend type")
    assert status == 503 and "host-gw" in body, body
    assert agent.proc.poll() is None and not agent.subnet_file.exists()
    lines = [line for line in agent.log().splitlines() if want in line]
    assert len(lines) == 1 and " ERROR " in lines[0], lines
    put_config(etcd)
    agent.wait_env()
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0


def test_bad_flag_exits_2_with_one_line(lab, tmp_path):
    host = lab.add_host(1)
    agent = Agent(host, "http://192.168.100.254:2379", tmp_path,
                  "--subnet-lease-renew-margin", "0").start()
    assert agent.proc.wait(timeout=30) == 2
    lines = agent.log().strip().splitlines()
    assert len(lines) == 1 and "--subnet-lease-renew-margin" in lines[0]


def test_thirty_agents_started_at_once_get_distinct_subnets(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd)
    hosts = [lab.add_host(i) for i in range(1, 31)]
    # All hosts exist first, so the agents start within milliseconds of each other.
    agents = [Agent(h, etcd.client_url, tmp_path).start() for h in hosts]
    # 30 Python processes starting on a 2-CPU machine: a generous bound.
    envs = [a.wait_env(timeout=120) for a in agents]
    subnets = {e["FLANNEL_SUBNET"] for e in envs}
    assert len(subnets) == 30
    stored = etcd.get_prefix("/coreos.com/network/subnets/")
    assert len(stored) == 30
    assert {json.loads(v)["PublicIP"] for v in stored.values()} == {h.address for h in hosts}
    time.sleep(2)  # past the start: none exits afterwards either
    assert all(a.proc.poll() is None for a in agents)  # none exited


def test_agent_cut_off_from_etcd_catches_up_on_reconnect(lab, tmp_path):
    """Peers join and leave while a host's agent cannot reach etcd (a firewall rule in its
    namespace); once the rule goes, the agent applies every change, and its own traffic to
    the host that stayed never stops."""
    etcd = lab.start_etcd()
    put_config(etcd)
    h1, a1, c1 = bring_up(lab, etcd, tmp_path, 1, "--healthz-port", "9100")
    _h2, a2, c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), what="route h1->h2")
    # Stand-ins for two more hosts' leases (written as flanneld writes them).
    gone = "10.5.200.0/24"
    etcd.put(subnet_key(gone), '{"PublicIP":"192.168.100.9","PublicIPv6":null,'
                               '"BackendType":"host-gw"}')
    wait_for(lambda: "via 192.168.100.9" in routes(h1, gone), what="route to stand-in")
    assert readyz(h1, 9100) == (200, "ready")

    rule = ["OUTPUT", "-d", "192.168.100.254", "-p", "tcp", "--dport", str(etcd.port),
            "-j", "REJECT", "--reject-with", "tcp-reset"]
    h1.exec(["iptables", "-I", *rule])
    try:
        wait_for(lambda: "etcd" in a1.log().split("holding subnet", 1)[-1]
                 and "retrying" in a1.log(), timeout=30, what="agent notices the cut")
        joined = "10.5.201.0/24"
        etcd.delete(subnet_key(gone))
        etcd.put(subnet_key(joined), '{"PublicIP":"192.168.100.8","PublicIPv6":null,'
                                     '"BackendType":"host-gw"}')
        assert ping(c1, c2.ip)  # the data path does not depend on etcd
        assert "via 192.168.100.9" in routes(h1, gone)  # nothing applied while cut off
    finally:
        h1.exec(["iptables", "-D", *rule])
    wait_for(lambda: routes(h1, gone) == "" and "via 192.168.100.8" in routes(h1, joined),
             timeout=30, what="changes made during the cut applied")
    assert ping(c1, c2.ip)
    assert a1.proc.poll() is None
    assert "recovered" in a1.log(), a1.log()


