"""--ip-masq for IPv6 (dual stack): the keeper with ip6tables (nft) on a real kernel, and traffic.

The daemon does not lease IPv6 subnets yet, so the keeper runs here on its own, as a small
Python process in a lab host's namespace (what the daemon will run in dual stack): with the
IPv6 family only, the IPv4 family only, or both. ip6tables-save in the host must hold exactly
flanneld's rules (a fixture written from flannel's source, never from tweed's planner); a rule
or a whole chain deleted by hand comes back within the resync period; the IPv6 keeper leaves
iptables (IPv4) alone and the IPv4 keeper ip6tables; the root namespace's iptables and
ip6tables are as they were. Traffic: a "container" whose IPv6 address is in the host's IPv6
subnet reaches an "outside" namespace on the underlay (which has no route back to the
overlay) and is seen there with the host's IPv6 address, and a container of another subnet of
the Network sees its own address.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.agents import wait_for
from tests.support.netns import ip_batch, run

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
RESYNC = 1
N4, S4 = "10.5.0.0/16", "10.5.3.0/24"
N6, S6 = "fd00:5::/48", "fd00:5:0:3::/64"
S6_OTHER = "fd00:5:0:7::/64"  # a peer's subnet in the same Network, routed through the host
HOST6, OUTSIDE6 = "fd99::1", "fd99::2"  # the underlay's IPv6 (a /64 on br0)
PORT = 9912
# Bounds on waits, generous for a loaded machine: a keeper process starting (Python, then
# ip6tables), and a repair (within the resync period, plus the commands).
START = 30
REPAIR = RESYNC + 19

# flanneld v0.20.2's ip6tables rules as ip6tables-save prints them, written from flannel's
# source (flannel-io/flannel v0.20.2, network/iptables.go: MasqIP6Rules() for the nat table,
# ForwardRules(IPv6Network) for filter; main.go runs them with go-iptables' ProtocolIPv6 when
# the config has EnableIPv6), never from tweed's planner, so a planner bug cannot make both
# sides agree. ip6tables is 1.8.9 here, so MASQUERADE has --random-fully.
MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'
MASQ_JUMP = f"{MASQ} -j FLANNEL-POSTRTG"
FWD_JUMP = f"{FWD} -j FLANNEL-FWD"


def flanneld_nat6(n: str, sn: str) -> list[str]:
    return [
        f"-m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-s {n} -d {n} {MASQ} -j RETURN",
        f"-s {n} ! -d ff00::/8 {MASQ} -j MASQUERADE --random-fully",
        f"! -s {n} -d {sn} {MASQ} -j RETURN",
        f"! -s {n} -d {n} {MASQ} -j MASQUERADE --random-fully",
    ]


def flanneld_fwd(n: str) -> list[str]:
    return [f"-s {n} {FWD} -j ACCEPT", f"-d {n} {FWD} -j ACCEPT"]


# The keeper as the daemon runs it: argv network4 subnet4 network6 subnet6 resync ("-": no
# such family), --ip-masq and --iptables-forward-rules on, logging to stderr.
KEEPER = """\
import asyncio, ipaddress, logging, sys
from backends.iptables.keeper import Iptables, IptablesKeeper
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
n4, s4, n6, s6, resync = sys.argv[1:6]
net = lambda x: None if x == "-" else ipaddress.ip_network(x)
keeper = IptablesKeeper(
    Iptables() if n4 != "-" else None, net(n4), net(s4), ip_masq=True, forward_rules=True,
    resync=float(resync), runner6=Iptables(family=6) if n6 != "-" else None,
    network6=net(n6), subnet6=net(s6))
asyncio.run(keeper.run())
"""

# UDP over IPv6: the server answers each datagram with the address it came from; the client
# asks (retrying while the server starts) and prints the answer.
ECHO6 = """\
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(peer[0].encode(), peer)
"""
WHO_AM_I6 = """\
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(30):
    s.sendto(b"who", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(64).decode())
        sys.exit(0)
    except TimeoutError:
        pass
sys.exit("no answer")
"""


class Keeper:
    """The keeper process in a namespace, its log in a file; stopped by its PID."""

    def __init__(self, ns, log: Path, n4: str = "-", s4: str = "-", n6: str = "-",
                 s6: str = "-") -> None:
        self.log_path = log
        with open(log, "w") as out:
            self.proc = ns.popen([sys.executable, "-c", KEEPER, n4, s4, n6, s6, str(RESYNC)],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


def saved(ns, tool: str) -> list[str]:
    """`<tool>-save` of a namespace (None: the root namespace) without comments and
    counters, so two reads differ only if the rules did."""
    cmd = [f"{tool}-save"]
    text = run(cmd).stdout if ns is None else ns.exec(cmd).stdout
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines()
            if not line.startswith("#")]


def chain(ns, tool: str, table: str, name: str) -> list[str]:
    prefix = f"-A {name} "
    return [line[len(prefix):] for line in ns.exec([f"{tool}-save", "-t", table]).stdout
            .splitlines() if line.startswith(prefix)]


def flanneld6_in_place(host) -> bool:
    return (chain(host, "ip6tables", "nat", "FLANNEL-POSTRTG") == flanneld_nat6(N6, S6)
            and chain(host, "ip6tables", "nat", "POSTROUTING") == [MASQ_JUMP]
            and chain(host, "ip6tables", "filter", "FLANNEL-FWD") == flanneld_fwd(N6)
            and chain(host, "ip6tables", "filter", "FORWARD") == [FWD_JUMP])


def seed_v4(host) -> None:
    """IPv4 rules a flanneld with another network left behind: an IPv4 keeper removes them
    (they are in our chain and do not belong there); an IPv6 keeper must not see them."""
    payload = "\n".join([
        "*nat", ":FLANNEL-POSTRTG - [0:0]", f"-A POSTROUTING {MASQ_JUMP}",
        f"-A FLANNEL-POSTRTG -s 10.9.0.0/16 -d 10.9.0.0/16 {MASQ} -j RETURN", "COMMIT", ""])
    host.exec(["iptables-restore", "-w", "--noflush"], input=payload)


def add_v6(lab):
    """Host 1 with the underlay's IPv6 on eth0 and IPv6 forwarding; an outside namespace on
    br0 (OUTSIDE6, no route to the overlay); container c in our subnet S6 and container d in
    another subnet of the Network, each on its own veth from the host (routed, not bridged)."""
    host = lab.add_host(1)
    out, c, d = lab.add_netns("o6"), lab.add_netns("c6"), lab.add_netns("d6")
    ip_batch(lab.underlay, [
        f"link add vo6 type veth peer name eth0 netns {out.ns}",
        "link set vo6 master br0", "link set vo6 up"])
    ip_batch(out.ns, [f"addr add {OUTSIDE6}/64 dev eth0 nodad", "link set eth0 up"])
    host.exec(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    host_lines = [f"addr add {HOST6}/64 dev eth0 nodad"]
    ends = []
    for ns, sub, vif in ((c, S6, "vc6"), (d, S6_OTHER, "vd6")):
        net = ipaddress.IPv6Network(sub)
        gw, addr = net.network_address + 1, net.network_address + 2
        host_lines += [f"link add {vif} type veth peer name eth0 netns {ns.ns}",
                       f"addr add {gw}/64 dev {vif} nodad", f"link set {vif} up"]
        ends.append((ns, gw, addr))
    ip_batch(host.ns, host_lines)
    for ns, gw, addr in ends:
        ip_batch(ns.ns, [f"addr add {addr}/64 dev eth0 nodad", "link set eth0 up",
                         f"route add ::/0 via {gw}"])
        ns.ip = str(addr)
    return host, out, c, d


def seen_as(client, server: str) -> str:
    res = client.exec([sys.executable, "-c", WHO_AM_I6, server, str(PORT)], timeout=60)
    return res.stdout.strip()


def test_v6_keeper_writes_flanneld_rules_repairs_them_and_masquerades(lab, tmp_path):
    root4, root6 = saved(None, "iptables"), saved(None, "ip6tables")
    host, out, c, d = add_v6(lab)
    seed_v4(host)
    v4_before = saved(host, "iptables")
    keeper = Keeper(host, tmp_path / "k6.log", n6=N6, s6=S6)
    try:
        # Exactly flanneld's ip6tables rules, and nothing done to iptables.
        wait_for(lambda: flanneld6_in_place(host), timeout=START, what="flanneld's ip6tables rules",
                 detail=keeper.log)
        assert "ip6tables: nat FLANNEL-POSTRTG (5 rules) and filter FLANNEL-FWD (2 rules) in " \
               f"place for network {N6}, subnet {S6}" in keeper.log()

        # Docker's FORWARD policy: only FLANNEL-FWD lets the containers' traffic through.
        host.exec(["ip6tables", "-w", "-P", "FORWARD", "DROP"])
        out.popen([sys.executable, "-c", ECHO6, OUTSIDE6, str(PORT)])
        d.popen([sys.executable, "-c", ECHO6, d.ip, str(PORT)])
        # The outside, with no route back to the overlay, answers the host's address.
        assert seen_as(c, OUTSIDE6) == HOST6
        # Inside the Network the container keeps its own address.
        assert seen_as(c, d.ip) == c.ip

        def repaired(what: str, count: int) -> None:
            wait_for(lambda: flanneld6_in_place(host)
                     and keeper.log().count("ip6tables: repaired") >= count,
                     timeout=REPAIR, what=f"{what} repaired", detail=keeper.log)

        host.exec(["ip6tables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"])
        repaired("a deleted rule", 1)
        assert seen_as(c, d.ip) == c.ip  # without that rule it would have been masqueraded
        # The whole filter chain: its jump, its rules, the chain itself.
        host.exec(["ip6tables", "-w", "-D", "FORWARD", *shlex.split(FWD_JUMP)])
        host.exec(["ip6tables", "-w", "-F", "FLANNEL-FWD"])
        host.exec(["ip6tables", "-w", "-X", "FLANNEL-FWD"])
        repaired("a deleted chain", 5)  # the chain, its 2 rules, the jump: 4 more
        assert seen_as(c, OUTSIDE6) == HOST6  # forwarded again under policy DROP
        log = keeper.log()
        assert "ip6tables: repaired nat FLANNEL-POSTRTG: added a missing rule at position 2: " \
               f"-s {N6} -d {N6} -j RETURN" in log
        assert "ip6tables: repaired filter FLANNEL-FWD: created the missing chain" in log
        assert "ip6tables: repaired filter FORWARD: added the missing jump" in log
        assert log.count("ip6tables: repaired") == 5, log
        assert "iptables:" not in log.replace("ip6tables:", "")
        # The IPv6 keeper never touched iptables: the stale IPv4 rules are still there.
        assert saved(host, "iptables") == v4_before
    finally:
        keeper.stop()
    # Nothing in the namespaces without a keeper, and the root namespace as it was.
    for ns in (out, c, d, lab.underlay_ns):
        assert "FLANNEL" not in ns.exec(["ip6tables-save"]).stdout
    assert saved(None, "iptables") == root4
    assert saved(None, "ip6tables") == root6


def test_v4_and_v6_keepers_leave_each_other_s_tables_alone_and_both_run_together(lab, tmp_path):
    root4, root6 = saved(None, "iptables"), saved(None, "ip6tables")
    host = lab.add_host(1)
    # The IPv6 rules of another v6 subnet are in place (a keeper run earlier, say).
    first = Keeper(host, tmp_path / "k6.log", n6=N6, s6=S6_OTHER)
    try:
        wait_for(lambda: chain(host, "ip6tables", "nat", "FLANNEL-POSTRTG")
                 == flanneld_nat6(N6, S6_OTHER), timeout=START, what="v6 rules", detail=first.log)
    finally:
        first.stop()
    v6_before = saved(host, "ip6tables")
    seed_v4(host)
    k4 = Keeper(host, tmp_path / "k4.log", n4=N4, s4=S4)
    try:
        wait_for(lambda: "in place for network" in k4.log(), timeout=START, what="v4 rules",
                 detail=k4.log)
        assert not any("10.9." in r for r in chain(host, "iptables", "nat", "FLANNEL-POSTRTG"))
        assert len(chain(host, "iptables", "nat", "FLANNEL-POSTRTG")) == 5
        assert saved(host, "ip6tables") == v6_before  # the IPv4 keeper left ip6tables alone
        assert "ip6tables" not in k4.log()
    finally:
        k4.stop()
    v4_after = saved(host, "iptables")
    # Both families in one keeper, the daemon's dual-stack call: the IPv6 subnet rule moves
    # to S6 (the other subnet's rule goes as stale), IPv4 is already right and not touched.
    both = Keeper(host, tmp_path / "k46.log", n4=N4, s4=S4, n6=N6, s6=S6)
    try:
        wait_for(lambda: flanneld6_in_place(host) and both.log().count("in place for") == 2,
                 timeout=START, what="both families", detail=both.log)
        assert saved(host, "iptables") == v4_after
        assert f"ip6tables: nat FLANNEL-POSTRTG: removed a rule that does not belong there " \
               f"(an old network or subnet, or added by hand): ! -s {N6} -d {S6_OTHER} " \
               "-j RETURN" in both.log()
        assert "repaired" not in both.log()
    finally:
        both.stop()
    assert saved(None, "iptables") == root4
    assert saved(None, "ip6tables") == root6
