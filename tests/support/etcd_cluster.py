"""EtcdCluster: a three-member etcd cluster, one member per lab namespace.

Owns three `EtcdServer`s, each in its own namespace on the lab's underlay (made with
`Lab.add_host`, so member i listens on 192.168.100.<i>:2379 and peers on :2380), bootstrapped
together with one `--initial-cluster`. The members are registered with the lab, so
`Lab.close()` stops them (by PID) and removes their data dirs also after a failure.
`leader()` asks every running member (`etcdctl endpoint status -w json`) who leads.
`cut_off(member)` partitions one member from the others (iptables in its own namespace,
removed on exit); `clients_of(address)` says which members a client at that address has a
connection to (`ss` in the members' namespaces).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tests.support.etcd import Etcdctl, EtcdServer
from tests.support.netns import Host, Lab

#: Host indexes of the members' namespaces (far from the agents' 1, 2, 3, ...).
MEMBER_INDEXES = (201, 202, 203)


class EtcdCluster:
    """Three etcd members on lab namespaces; `ctl` talks to all of them."""

    def __init__(self, lab: Lab, indexes: tuple[int, ...] = MEMBER_INDEXES) -> None:
        self.lab = lab
        self.hosts: list[Host] = [lab.add_host(i) for i in indexes]
        self.members: list[EtcdServer] = []
        for i, host in zip(indexes, self.hosts, strict=True):
            m = EtcdServer(host.address, netns=host.ns, name=f"m{i}")
            lab.etcds.append(m)  # Lab.close() stops it and removes its data
            self.members.append(m)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            # Later flags win in etcd's flag parsing: these replace EtcdServer's one-member
            # --initial-cluster and its very short timings (a 2-CPU machine shared with other
            # tests would hold elections all the time with a 300 ms election timeout).
            # --pre-vote as etcd 3.5 has by default (Debian's 3.4 does not): a member that
            # was cut off and comes back does not depose the leader with its higher term.
            m.extra_args = ("--initial-cluster", initial,
                            "--initial-cluster-token", f"{lab.prefix}cluster",
                            "--heartbeat-interval", "100", "--election-timeout", "1000",
                            "--pre-vote")
        # A member is healthy only once a quorum has formed, so they must start together.
        with ThreadPoolExecutor(len(self.members)) as pool:
            for future in [pool.submit(m.start, 60.0) for m in self.members]:
                future.result()

    @property
    def endpoints(self) -> str:
        """All client URLs, comma-separated (tweed's --etcd-endpoints)."""
        return ",".join(m.client_url for m in self.members)

    @property
    def ctl(self) -> Etcdctl:
        """etcdctl against every member (it fails over), run in the underlay namespace."""
        return Etcdctl(self.endpoints, self.lab.underlay)

    def running(self) -> list[EtcdServer]:
        return [m for m in self.members if m.running]

    def leader(self) -> EtcdServer:
        """The member that every running member names as leader; AssertionError if none."""
        running = self.running()
        ctl = Etcdctl(",".join(m.client_url for m in running), self.lab.underlay)
        status = json.loads(ctl.etcdctl("endpoint", "status", "-w", "json"))
        ids = {s["Endpoint"]: s["Status"]["header"]["member_id"] for s in status}
        leaders = {s["Status"]["leader"] for s in status}
        if len(leaders) != 1 or 0 in leaders:
            raise AssertionError(f"no single leader: {status}")
        (leader_id,) = leaders
        for m in running:
            if ids.get(m.client_url) == leader_id:
                return m
        raise AssertionError(f"leader {leader_id:x} is not a running member: {status}")

    def host_of(self, member: EtcdServer) -> Host:
        return self.hosts[self.members.index(member)]

    @contextlib.contextmanager
    def cut_off(self, member: EtcdServer) -> Iterator[None]:
        """Drop `member`'s peer traffic both ways while inside the block; its client port
        stays reachable. The rules live in the member's own namespace only."""
        ns = self.host_of(member)
        port = str(member.peer_port)
        rules = [[chain, "-p", "tcp", match, port, "-j", "DROP"]
                 for chain in ("INPUT", "OUTPUT") for match in ("--dport", "--sport")]
        added: list[list[str]] = []
        try:
            for rule in rules:
                ns.exec(["iptables", "-w", "-A", *rule])
                added.append(rule)
            yield
        finally:
            for rule in added:
                ns.exec(["iptables", "-w", "-D", *rule], check=False)

    def clients_of(self, address: str) -> list[EtcdServer]:
        """The members holding an established client connection from `address`."""
        peer = re.compile(rf"\s{re.escape(address)}:\d+\s*$")
        found = []
        for m, host in zip(self.members, self.hosts, strict=True):
            out = host.exec(["ss", "-Htn", "state", "established",
                             f"( sport = :{m.port} )"]).stdout
            if any(peer.search(line) for line in out.splitlines()):
                found.append(m)
        return found

    def healthy(self) -> bool:
        """Whether every running member answers `endpoint health`."""
        ctl = Etcdctl(",".join(m.client_url for m in self.running()), self.lab.underlay)
        try:
            ctl.etcdctl("endpoint", "health")
        except RuntimeError:
            return False
        return True
