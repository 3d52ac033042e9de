"""--ip-masq end to end: real tweed processes, the kernel's iptables (nft), real traffic.

Two hosts run tweed with --ip-masq; a namespace on the underlay bridge (an address that is
no host's) stands in for the outside world and runs a UDP server that answers each
datagram with the address it came from. A container reaching it is seen as its host;
containers reaching each other see each other's own addresses. Rules changed by hand are
repaired within the resync period, rules of an old network are removed at start, and
nothing changes in the root namespace or in the namespaces that run no agent.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import sys
import time

import pytest

from tests.lab.agents import Agent, ping, put_config, routes, subnet_key, wait_for
from tests.support.netns import ip_batch, root_ns_snapshot

pytestmark = pytest.mark.lab

NETWORK = ipaddress.IPv4Network("10.5.0.0/16")
OUTSIDE = "192.168.100.200"  # on the underlay bridge, not a host (hosts are .1, .2, ...)
PORT = 9911
RESYNC = 1

# Answers every datagram with "<peer ip>:<peer port>".
ECHO_SERVER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(64)\n"
    "    s.sendto(f'{peer[0]}:{peer[1]}'.encode(), peer)\n"
)
# Asks the server who it is, retrying while the server starts; prints the answer.
WHO_AM_I = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(0.5)\n"
    "for _ in range(30):\n"
    "    s.sendto(b'who', (sys.argv[1], int(sys.argv[2])))\n"
    "    try:\n"
    "        print(s.recv(64).decode())\n"
    "        sys.exit(0)\n"
    "    except TimeoutError:\n"
    "        pass\n"
    "sys.exit('no answer')\n"
)


def seen_as(client, server_ip: str) -> str:
    """The source address the UDP server at server_ip saw for a datagram from client."""
    res = client.exec([sys.executable, "-c", WHO_AM_I, server_ip, str(PORT)], timeout=30)
    return res.stdout.strip().rsplit(":", 1)[0]


def serve_echo(ns, addr: str) -> None:
    ns.popen([sys.executable, "-c", ECHO_SERVER, addr, str(PORT)])


# What the kernel must hold, written from flanneld v0.20's rules (flannel-io/flannel
# v0.20.2, network/iptables.go: MasqRules, ForwardRules; docs/ipmasq.md) as iptables-save
# prints them, and never from tweed's own planner, so that a planner bug cannot make both
# sides agree.
MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'
MASQ_JUMP = f"{MASQ} -j FLANNEL-POSTRTG"
FWD_JUMP = f"{FWD} -j FLANNEL-FWD"


def flanneld_nat(network: str, subnet: str) -> list[str]:
    """FLANNEL-POSTRTG for this network and host subnet (iptables >= 1.6.2: --random-fully)."""
    n = network
    return [
        f"-m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-s {n} -d {n} {MASQ} -j RETURN",
        f"-s {n} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
        f"! -s {n} -d {subnet} {MASQ} -j RETURN",
        f"! -s {n} -d {n} {MASQ} -j MASQUERADE --random-fully",
    ]


def flanneld_fwd(network: str) -> list[str]:
    return [f"-s {network} {FWD} -j ACCEPT", f"-d {network} {FWD} -j ACCEPT"]


def chain(ns, table_name: str, chain_name: str) -> list[str]:
    """The rules of one chain as the kernel lists them (iptables-save, read as plain text)."""
    prefix = f"-A {chain_name} "
    return [line[len(prefix):]
            for line in ns.exec(["iptables-save", "-t", table_name]).stdout.splitlines()
            if line.startswith(prefix)]


def add_outside(lab):
    """A namespace with eth0 = OUTSIDE/24 on the underlay bridge and no other route: it
    can answer a container only if the container's address was masqueraded."""
    out = lab.add_netns("out")
    ip_batch(lab.underlay, [
        f"link add vout type veth peer name eth0 netns {out.ns}",
        "link set vout master br0",
        "link set vout up",
    ])
    ip_batch(out.ns, [f"addr add {OUTSIDE}/24 dev eth0", "link set eth0 up"])
    return out


def start_host(lab, etcd, workdir, i: int, *extra: str, env=None, before=None):
    """Host i running tweed with --ip-masq (resync RESYNC s), docker0 and one container.
    `before(host)` runs before the agent starts."""
    host = lab.add_host(i)
    if before is not None:
        before(host)
    agent = Agent(host, etcd.client_url, workdir, "--ip-masq", "--iptables-resync",
                  str(RESYNC), *extra, env=env).start()
    env = agent.wait_env()
    host.add_docker0(env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
    return host, agent, host.add_container("a", int(env["FLANNEL_MTU"]))


def seed_old_network(host) -> None:
    """What a flanneld with another network and subnet left behind in this host."""
    lines = ["*nat", ":FLANNEL-POSTRTG - [0:0]", f"-A POSTROUTING {MASQ_JUMP}",
             *(f"-A FLANNEL-POSTRTG {r}" for r in flanneld_nat("10.9.0.0/16", "10.9.4.0/24")),
             "COMMIT"]
    host.exec(["iptables-restore", "-w", "--noflush"], input="\n".join(lines) + "\n")


def test_ip_masq_rules_masquerade_outside_traffic_only_and_are_repaired(lab, tmp_path):
    before = root_ns_snapshot()["iptables"]
    etcd = lab.start_etcd()
    put_config(etcd, network=str(NETWORK))
    out = add_outside(lab)
    h1, a1, c1 = start_host(lab, etcd, tmp_path, 1)
    h2, a2, c2 = start_host(lab, etcd, tmp_path, 2, before=seed_old_network)
    assert a1.env()["FLANNEL_IPMASQ"] == "true"
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), what="route h1->h2")
    wait_for(lambda: "via 192.168.100.1" in routes(h2, a1.subnet), what="route h2->h1")

    # Exactly flanneld's rules, in flanneld's order, on each host.
    for host, agent in ((h1, a1), (h2, a2)):
        want_nat = flanneld_nat(str(NETWORK), agent.subnet)
        wait_for(lambda h=host, w=want_nat: chain(h, "nat", "FLANNEL-POSTRTG") == w,
                 timeout=10, what=f"FLANNEL-POSTRTG on {host.ns}")
        assert chain(host, "nat", "POSTROUTING").count(MASQ_JUMP) == 1
        assert chain(host, "filter", "FLANNEL-FWD") == flanneld_fwd(str(NETWORK))
        assert chain(host, "filter", "FORWARD") == [FWD_JUMP]
    # The old network's rules that were there before tweed started are gone (and said so).
    assert not any("10.9." in r for r in chain(h2, "nat", "FLANNEL-POSTRTG"))
    assert chain(h2, "nat", "POSTROUTING") == [MASQ_JUMP]
    assert a2.log().count("does not belong there") == 4, a2.log()

    # Docker's FORWARD policy: only FLANNEL-FWD lets container traffic through now.
    for host in (h1, h2):
        host.exec(["iptables", "-w", "-P", "FORWARD", "DROP"])

    # The outside world sees the host, and can answer although it has no route back.
    serve_echo(out, OUTSIDE)
    assert seen_as(c1, OUTSIDE) == h1.address
    assert seen_as(c2, OUTSIDE) == h2.address
    assert ping(c1, OUTSIDE)
    # Container to container keeps the container's own address.
    serve_echo(c2, c2.ip)
    assert seen_as(c1, c2.ip) == c1.ip
    assert ping(c1, c2.ip) and ping(c2, c1.ip)

    # Rules changed by hand are put back within the resync period.
    want = flanneld_nat(str(NETWORK), a1.subnet)

    def repaired(what: str, count: int) -> None:
        wait_for(lambda: chain(h1, "nat", "FLANNEL-POSTRTG") == want
                 and chain(h1, "nat", "POSTROUTING").count(MASQ_JUMP) == 1
                 and a1.log().count("iptables: repaired") >= count,
                 timeout=RESYNC + 9, what=f"{what} repaired")

    h1.exec(["iptables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"])  # -s N -d N RETURN
    repaired("a deleted rule", 1)
    # Without that rule, traffic between containers would have been masqueraded.
    assert seen_as(c1, c2.ip) == c1.ip
    h1.exec(["iptables", "-w", "-t", "nat", "-A", "FLANNEL-POSTRTG", *shlex.split(want[0])])
    repaired("a duplicate", 2)
    h1.exec(["iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "1"])
    repaired("a deleted jump", 3)
    assert seen_as(c1, OUTSIDE) == h1.address
    log = a1.log()
    assert "repaired nat FLANNEL-POSTRTG: added a missing rule at position 2" in log
    assert "repaired nat FLANNEL-POSTRTG: removed a duplicate rule" in log
    assert "repaired nat POSTROUTING: added the missing jump" in log
    # One line per repair, none for the checks that found nothing to do.
    assert log.count("iptables: repaired") == 3, log
    assert a1.log().count("in place for network") == 1

    # Nothing anywhere else: no chains in the namespaces without an agent, and the root
    # namespace's rules as they were.
    for ns in (out, c1, lab.underlay_ns):
        assert "FLANNEL" not in ns.exec(["iptables-save"]).stdout
    assert a1.proc.poll() is None and a2.proc.poll() is None
    assert root_ns_snapshot()["iptables"] == before


def test_without_iptables_the_agent_says_so_once_and_goes_on(lab, tmp_path):
    """No iptables commands on PATH: one error line, and the overlay works all the same."""
    before = root_ns_snapshot()["iptables"]
    etcd = lab.start_etcd()
    put_config(etcd, network=str(NETWORK))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("ip"), bindir / "ip")  # `ip netns exec` and nothing else
    h1, a1, c1 = start_host(lab, etcd, tmp_path, 1, env={"PATH": str(bindir)})
    _h2, a2, c2 = start_host(lab, etcd, tmp_path, 2)
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), what="route h1->h2")
    assert ping(c1, c2.ip)
    wait_for(lambda: "command not found" in a1.log(), timeout=10, what="the error line")
    # Several resync periods later: still one line, still running.
    wait_for(lambda: a2.log().count("FLANNEL-POSTRTG") >= 1, what="h2 rules")
    time.sleep(3 * RESYNC)
    assert a1.log().count("command not found") == 1, a1.log()
    assert "tweed goes on" in a1.log()
    assert a1.proc.poll() is None
    assert "FLANNEL" not in h1.exec(["iptables-save"]).stdout
    assert ping(c1, c2.ip)
    assert root_ns_snapshot()["iptables"] == before


def test_a_new_subnet_moves_the_subnet_rule(lab, tmp_path):
    """Another host takes our subnet: tweed leases a new one and its nat rule follows."""
    etcd = lab.start_etcd()
    put_config(etcd, network=str(NETWORK))
    h1, a1, _c1 = start_host(lab, etcd, tmp_path, 1)
    old = a1.subnet
    want_old = flanneld_nat(str(NETWORK), old)
    wait_for(lambda: chain(h1, "nat", "FLANNEL-POSTRTG") == want_old, timeout=10,
             what="rules for the first subnet")
    etcd.put(subnet_key(old), '{"PublicIP":"192.168.100.9","PublicIPv6":null,'
                              '"BackendType":"host-gw"}')
    wait_for(lambda: a1.subnet != old, timeout=20, what="a new subnet")
    new = ipaddress.IPv4Network(a1.subnet)
    want_new = flanneld_nat(str(NETWORK), str(new))
    wait_for(lambda: chain(h1, "nat", "FLANNEL-POSTRTG") == want_new, timeout=10,
             what="rules for the new subnet")
    assert f"subnet {new} (re-checked" in a1.log()
    assert "iptables: repaired" not in a1.log()  # a planned change, not a repair
    assert a1.proc.poll() is None
