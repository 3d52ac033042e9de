"""Lab: several "hosts" on one machine, as network namespaces on one underlay bridge.

Topology (LAB.md): an underlay namespace with bridge br0 (192.168.100.254/24, where etcd
listens); each host namespace has `eth0` = 192.168.100.<i>/24 on that bridge; a host can get
a `docker0` bridge holding FLANNEL_SUBNET and "containers" (namespaces with a veth on
docker0 and a default route). Nothing is created in the root namespace: veth pairs are made
directly inside their namespaces. Names carry a per-run prefix; `close()` removes
everything, and stops the processes it started, by PID.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass, field

from tests.support.etcd import EtcdServer

UNDERLAY_NET = "192.168.100"
UNDERLAY_GW = f"{UNDERLAY_NET}.254"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def ns_exec(ns: str, cmd: list[str], check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                         timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns} failed ({res.returncode}): "
                           f"{res.stderr.strip()}")
    return res


@dataclass
class Container:
    """A container stand-in: a namespace with eth0 on its host's docker0."""

    ns: str
    ip: str

    def exec(self, cmd: list[str], check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        return ns_exec(self.ns, cmd, check, timeout)


@dataclass
class Host:
    lab: Lab
    index: int
    ns: str
    address: str
    containers: list[Container] = field(default_factory=list)
    docker0: ipaddress.IPv4Interface | None = None

    def exec(self, cmd: list[str], check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        return ns_exec(self.ns, cmd, check, timeout)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)
        self.lab.procs.append(proc)
        return proc

    def add_docker0(self, flannel_subnet: str, mtu: int) -> None:
        """A docker0 bridge holding FLANNEL_SUBNET (e.g. 10.5.72.1/24), as dockerd makes it."""
        self.docker0 = ipaddress.IPv4Interface(flannel_subnet)
        ip("-n", self.ns, "link", "add", "docker0", "mtu", str(mtu), "type", "bridge")
        ip("-n", self.ns, "addr", "add", flannel_subnet, "dev", "docker0")
        ip("-n", self.ns, "link", "set", "docker0", "up")

    def add_container(self, suffix: str, mtu: int) -> Container:
        assert self.docker0 is not None, "add_docker0 first"
        ns = f"{self.lab.prefix}c{self.index}{suffix}"
        ip("netns", "add", ns)
        self.lab.namespaces.append(ns)
        addr = self.docker0.ip + 1 + len(self.containers)
        hostside = f"vc{suffix}"
        ip("link", "add", "eth0", "netns", ns, "mtu", str(mtu), "type", "veth",
           "peer", "name", hostside, "netns", self.ns, "mtu", str(mtu))
        ip("-n", self.ns, "link", "set", hostside, "master", "docker0", "up")
        prefix = self.docker0.network.prefixlen
        ip("-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", str(self.docker0.ip))
        c = Container(ns, str(addr))
        self.containers.append(c)
        return c


class Lab:
    """The underlay, its hosts and their containers; close() removes it all."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"tw{os.getpid() % 100000}-"
        self.underlay = f"{self.prefix}u"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[int, Host] = {}
        self.etcds: list[EtcdServer] = []
        ip("netns", "add", self.underlay)
        self.namespaces.append(self.underlay)
        u = ["-n", self.underlay]
        ip(*u, "link", "set", "lo", "up")
        ip(*u, "link", "add", "br0", "type", "bridge")
        ip(*u, "addr", "add", f"{UNDERLAY_GW}/24", "dev", "br0")
        ip(*u, "link", "set", "br0", "up")

    def start_etcd(self) -> EtcdServer:
        server = EtcdServer(UNDERLAY_GW, netns=self.underlay)
        self.etcds.append(server)
        return server.start()

    def add_host(self, i: int) -> Host:
        ns = f"{self.prefix}h{i}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", "eth0", "netns", ns, "type", "veth",
           "peer", "name", f"vh{i}", "netns", self.underlay)
        ip("-n", self.underlay, "link", "set", f"vh{i}", "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{UNDERLAY_NET}.{i}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ns_exec(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        host = Host(self, i, ns, f"{UNDERLAY_NET}.{i}")
        self.hosts[i] = host
        return host

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for server in self.etcds:
            server.close()
        self.etcds.clear()
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        self.namespaces.clear()
