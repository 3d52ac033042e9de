"""Lab: several "hosts" on one machine, as network namespaces on one underlay bridge.

Owns every namespace, device and process of the topology in /work/shared/LAB.md: an
underlay namespace `<prefix>u` with bridge br0 (192.168.100.254/24, where etcd listens);
host namespaces `<prefix>h<i>` whose `eth0` (192.168.100.<i>/24) is a veth into br0; per
host a `docker0` bridge holding FLANNEL_SUBNET and "container" namespaces `<prefix>c<i><x>`
with a veth on docker0 and a default route. Nothing is ever created in the root namespace
(veth pairs are made directly inside their namespaces) and no route to a test range is
added there. Names carry a per-run prefix (`tw<pid % 10000>-`); `close()` stops the
processes it started (by PID) and removes all of it, also after a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import string
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.etcd import EtcdServer
from tests.support.wait import poll

UNDERLAY = ipaddress.IPv4Network("192.168.100.0/24")
UNDERLAY_GW = "192.168.100.254"
UNDERLAY_MTU = 1500
IFNAMSIZ = 15  # longest interface name


class CommandError(subprocess.CalledProcessError):
    """A failed command; unlike CalledProcessError, its message includes stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}\nstderr: {err}"


def run(cmd: Sequence[str], check: bool = True, timeout: float = 60.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output captured; CommandError (with stderr) on failure."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                         input=input, check=False)
    if check and res.returncode != 0:
        raise CommandError(res.returncode, list(cmd), res.stdout, res.stderr)
    return res


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check, timeout=30)


def ip_batch(ns: str, lines: Iterable[str]) -> None:
    """Run several `ip` commands in namespace `ns` with one process (`ip -n NS -batch -`)."""
    text = "".join(f"{line}\n" for line in lines)
    run(["ip", "-n", ns, "-batch", "-"], input=text, timeout=30)


def ns_exec(ns: str, cmd: Sequence[str], check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run cmd in namespace `ns` (`ip netns exec`) and wait for it."""
    return run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout, input=input)


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """PIDs of the processes whose network namespace is `ns`."""
    res = ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def root_ns_snapshot() -> dict[str, list[str]]:
    """The root namespace's links, addresses, routes and iptables rules, for comparison.

    Counters and timestamps are left out, so two snapshots differ only if state changed.
    """
    def lines(*cmd: str) -> list[str]:
        res = run(cmd, check=False)
        return sorted(line.strip() for line in res.stdout.splitlines() if line.strip())

    rules = [re.sub(r"\[\d+:\d+\]", "", line)
             for line in lines("iptables-save") if not line.startswith("#")]
    return {
        "links": lines("ip", "-br", "link"),
        "addrs": lines("ip", "-br", "addr"),
        "routes4": lines("ip", "-4", "route", "show", "table", "all"),
        "routes6": lines("ip", "-6", "route", "show", "table", "all"),
        "iptables": rules,
    }


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines (subnet.env); blank lines and # comments are skipped."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def read_env(path: str | os.PathLike[str]) -> dict[str, str]:
    return parse_env(Path(path).read_text())


def stop_processes(procs: Iterable[subprocess.Popen[Any]], timeout: float = 3.0) -> None:
    """SIGTERM each live process by its PID, wait up to `timeout` s overall, then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    poll(lambda: all(p.poll() is not None for p in live), timeout, step=0.02)
    for p in live:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def _check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


class Namespace:
    """A network namespace of the lab: run commands in it, start tracked processes."""

    def __init__(self, lab: Lab, ns: str) -> None:
        self.lab = lab
        self.ns = ns
        self.procs: list[subprocess.Popen[Any]] = []

    def exec(self, cmd: Sequence[str], check: bool = True, timeout: float = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run cmd here and wait; CommandError (a CalledProcessError) if check and it fails."""
        return ns_exec(self.ns, cmd, check=check, timeout=timeout, input=input)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start cmd here (Popen kwargs pass through). `ip netns exec` execs, so the PID is
        cmd's own; the lab stops it by that PID at close if it still runs."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)
        self.procs.append(proc)
        self.lab.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return netns_pids(self.ns)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ns}>"


class Container(Namespace):
    """A container stand-in: a namespace whose eth0 is a veth on its host's docker0."""

    def __init__(self, host: Host, ns: str, ip: str, prefixlen: int, mtu: int,
                 host_ifname: str) -> None:
        super().__init__(host.lab, ns)
        self.host = host
        self.ip = ip
        self.prefixlen = prefixlen
        self.mtu = mtu
        self.host_ifname = host_ifname  # the veth end on docker0, in the host namespace

    def remove(self) -> None:
        """Stop its processes and delete its namespace (the veth goes with it)."""
        stop_processes(self.procs)
        # Deleting the veth first makes the removal synchronous: a deleted namespace is
        # torn down by the kernel asynchronously and its devices can answer for a while.
        ip("-n", self.host.ns, "link", "del", self.host_ifname, check=False)
        self.lab._del_netns(self.ns)
        with contextlib.suppress(ValueError):
            self.host.containers.remove(self)


class Host(Namespace):
    """A host: a namespace with eth0 = 192.168.100.<index>/24 on the underlay bridge."""

    def __init__(self, lab: Lab, index: int, ns: str) -> None:
        super().__init__(lab, ns)
        self.index = index
        self.address = str(UNDERLAY.network_address + index)  # eth0's address
        self.docker0: ipaddress.IPv4Interface | None = None
        self.docker0_mtu: int | None = None
        self.containers: list[Container] = []

    @property
    def ip(self) -> str:
        return self.address

    def add_docker0(self, flannel_subnet: str, mtu: int = 1500) -> ipaddress.IPv4Interface:
        """A `docker0` bridge holding FLANNEL_SUBNET exactly (e.g. "10.5.72.1/24"), up, as
        dockerd --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU makes it."""
        if self.docker0 is not None:
            raise RuntimeError(f"{self.ns} already has docker0 {self.docker0}")
        iface = ipaddress.IPv4Interface(flannel_subnet)
        ip_batch(self.ns, [
            f"link add docker0 mtu {int(mtu)} type bridge",
            f"addr add {flannel_subnet} dev docker0",
            "link set docker0 up",
        ])
        self.docker0, self.docker0_mtu = iface, int(mtu)
        return iface

    def add_container(self, name_suffix: str = "a", mtu: int | None = None) -> Container:
        """A container namespace `<prefix>c<index><name_suffix>` on docker0: the next free
        address of docker0's subnet, MTU `mtu` (default docker0's), default route via
        docker0's address."""
        if self.docker0 is None:
            raise RuntimeError(f"{self.ns}: add_docker0() first")
        mtu = int(mtu if mtu is not None else self.docker0_mtu or 1500)
        ns = f"{self.lab.prefix}c{self.index}{name_suffix}"
        host_if = _check_ifname(f"vc{name_suffix}")
        used = {ipaddress.IPv4Address(c.ip) for c in self.containers} | {self.docker0.ip}
        addr = next((a for a in self.docker0.network.hosts() if a not in used), None)
        if addr is None:
            raise RuntimeError(f"no free address left in {self.docker0.network}")
        plen = self.docker0.network.prefixlen
        self.lab._add_netns(ns)
        ip_batch(self.ns, [
            f"link add {host_if} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {ns}",
            f"link set {host_if} master docker0",
            f"link set {host_if} up",
        ])
        ip_batch(ns, [
            "link set lo up",
            f"addr add {addr}/{plen} dev eth0",
            "link set eth0 up",
            f"route add default via {self.docker0.ip}",
        ])
        container = Container(self, ns, str(addr), plen, mtu, host_if)
        self.containers.append(container)
        return container

    def remove(self) -> None:
        """Take the host out: stop its (and its containers') processes, delete namespaces."""
        for c in list(self.containers):
            c.remove()
        stop_processes(self.procs)
        ip("-n", self.lab.underlay, "link", "del", f"vh{self.index}", check=False)
        self.lab._del_netns(self.ns)
        self.lab.hosts.pop(self.index, None)


def _pick_prefix() -> str:
    """`tw<pid % 10000>-`, or with a letter added if namespaces with it exist already."""
    base = f"tw{os.getpid() % 10000}"
    existing = list_netns()
    for extra in ["", *string.ascii_lowercase]:
        prefix = f"{base}{extra}-"
        if not any(name.startswith(prefix) for name in existing):
            return prefix
    raise RuntimeError(f"no free namespace prefix for {base}: clean up `ip netns list`")


class Lab:
    """The underlay, its hosts, their containers and etcd; `close()` removes it all."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or _pick_prefix()
        self.underlay = f"{self.prefix}u"
        self.namespaces: list[str] = []  # created by this lab and not yet deleted
        self.procs: list[subprocess.Popen[Any]] = []
        self.hosts: dict[int, Host] = {}
        self.etcds: list[EtcdServer] = []
        self._closed = False
        try:
            self._add_netns(self.underlay)
            ip_batch(self.underlay, [
                "link set lo up",
                f"link add br0 mtu {UNDERLAY_MTU} type bridge",
                f"addr add {UNDERLAY_GW}/{UNDERLAY.prefixlen} dev br0",
                "link set br0 up",
            ])
            self.underlay_ns = Namespace(self, self.underlay)
        except BaseException:
            self.close()
            raise

    # -- namespaces --------------------------------------------------------------------
    def _add_netns(self, ns: str) -> None:
        if self._closed:
            raise RuntimeError("Lab is closed")
        if not ns.startswith(self.prefix):
            raise ValueError(f"namespace {ns!r} lacks the lab prefix {self.prefix!r}")
        ip("netns", "add", ns)
        self.namespaces.append(ns)

    def _del_netns(self, ns: str) -> None:
        # Whatever still runs in there was started by this lab's processes: stop it by PID.
        for pid in netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ip("netns", "del", ns, check=False)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def add_netns(self, suffix: str) -> Namespace:
        """An extra empty namespace `<prefix><suffix>` (lo up), removed at close."""
        ns = f"{self.prefix}{suffix}"
        self._add_netns(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return Namespace(self, ns)

    # -- hosts and etcd ----------------------------------------------------------------
    def add_host(self, i: int) -> Host:
        """Host namespace `<prefix>h<i>`: eth0 = 192.168.100.<i>/24 (MTU 1500) on br0,
        lo up, net.ipv4.ip_forward=1."""
        if not 1 <= i <= 253:
            raise ValueError(f"host index {i} outside 1..253")
        if i in self.hosts:
            raise ValueError(f"host {i} exists already")
        ns = f"{self.prefix}h{i}"
        peer = _check_ifname(f"vh{i}")
        self._add_netns(ns)
        host = Host(self, i, ns)
        ip_batch(self.underlay, [
            f"link add {peer} mtu {UNDERLAY_MTU} type veth peer name eth0 mtu {UNDERLAY_MTU} "
            f"netns {ns}",
            f"link set {peer} master br0",
            f"link set {peer} up",
        ])
        ip_batch(ns, [
            "link set lo up",
            f"addr add {host.address}/{UNDERLAY.prefixlen} dev eth0",
            "link set eth0 up",
        ])
        ns_exec(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.hosts[i] = host
        return host

    def start_etcd(self, timeout: float = 20.0) -> EtcdServer:
        """A started EtcdServer in the underlay namespace on 192.168.100.254 (free ports)."""
        server = EtcdServer(UNDERLAY_GW, netns=self.underlay)
        self.etcds.append(server)
        return server.start(timeout)

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop processes (by PID), close etcd servers, delete every namespace with this
        lab's prefix. Idempotent; raises after trying everything if something remains."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        try:
            stop_processes(self.procs)
        except Exception as e:
            errors.append(f"stopping processes: {e!r}")
        self.procs.clear()
        for server in self.etcds:
            try:
                server.close()
            except Exception as e:
                errors.append(f"closing {server!r}: {e!r}")
        self.etcds.clear()
        # Containers first, the underlay last; then anything else with our prefix (the
        # prefix was unused when this lab started, so such namespaces are ours).
        for ns in reversed(list(self.namespaces)):
            self._del_netns(ns)
        for ns in list_netns():
            if ns.startswith(self.prefix):
                self._del_netns(ns)
        self.hosts.clear()
        left = [ns for ns in list_netns() if ns.startswith(self.prefix)]
        if left:
            errors.append(f"namespaces not deleted: {left}")
        if errors:
            raise RuntimeError("Lab.close: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} hosts={sorted(self.hosts)}>"
