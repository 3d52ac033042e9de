"""Running real tweed processes on lab hosts, and reading what they produce."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.subnet_file import parse_subnet_env
from tests.support.wait import wait_for  # the lab tests import it from here too

PREFIX = "/coreos.com/network"


class Agent:
    """One tweed process in a host namespace, with its log and subnet file."""

    def __init__(self, host, etcd_url: str, workdir: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.host = host
        self.env_vars = env
        self.subnet_file = workdir / f"{host.ns}.subnet.env"
        self.log_path = workdir / f"{host.ns}.tweed.log"
        self.args = [
            sys.executable, "-m", "agent",
            "--etcd-endpoints", etcd_url,
            "--iface", "eth0",
            "--subnet-file", str(self.subnet_file),
            *extra,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Agent:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        env = {**os.environ, **self.env_vars} if self.env_vars else None
        self.proc = self.host.popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal by PID and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def env(self) -> dict[str, str]:
        try:
            return parse_subnet_env(self.subnet_file.read_text())
        except FileNotFoundError:
            return {}

    def wait_env(self, timeout: float = 30.0) -> dict[str, str]:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tweed on {self.host.ns} exited:\n{self.log()}")
            env = self.env()
            return env if "FLANNEL_SUBNET" in env else None

        return wait_for(ready, timeout, what=f"subnet.env on {self.host.ns}",
                        detail=lambda: f"its log:\n{self.log()[-3000:]}")

    @property
    def subnet(self) -> str:
        """The leased subnet as a network, e.g. 10.5.72.0/24."""
        import ipaddress

        return str(ipaddress.IPv4Interface(self.env()["FLANNEL_SUBNET"]).network)


def subnet_key(subnet: str) -> str:
    addr, length = subnet.split("/")
    return f"{PREFIX}/subnets/{addr}-{length}"


def put_config(etcd, backend: str = "host-gw", network: str = "10.5.0.0/16",
               **options: object) -> None:
    """The network config, with extra Backend options (e.g. Datapath="c")."""
    etcd.put(f"{PREFIX}/config", json.dumps(
        {"Network": network, "Backend": {"Type": backend, **options}}))


def routes(host, subnet: str) -> str:
    """`ip route show <subnet>` in the host's namespace."""
    return host.exec(["ip", "route", "show", subnet]).stdout.strip()


def ping(ns_obj, ip: str, count: int = 3) -> bool:
    res = ns_obj.exec(["ping", "-c", str(count), "-W", "2", "-i", "0.2", ip], check=False)
    return res.returncode == 0


def bring_up(lab, etcd, workdir: Path, i: int, *extra: str, resync: str = "2",
             env: dict[str, str] | None = None):
    """Host i with a running tweed (resync period `resync` s), docker0 from its
    subnet.env and one container; returns (host, agent, container)."""
    host = lab.add_host(i)
    agent = Agent(host, etcd.client_url, workdir, "--resync-period", resync, *extra,
                  env=env).start()
    env = agent.wait_env()
    host.add_docker0(env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
    container = host.add_container("a", int(env["FLANNEL_MTU"]))
    return host, agent, container
