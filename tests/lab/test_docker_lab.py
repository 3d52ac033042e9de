"""Docker for real: two lab hosts, each with tweed and a real dockerd started with the
options `tweed docker-opts` wrote from tweed's subnet.env, and a busybox container on each
that pings the other across the overlay, over vxlan and over udp.

dockerd makes docker0 itself here (the hosts have no hand-made bridge), so the test also
shows that docker0 gets FLANNEL_SUBNET and the containers FLANNEL_MTU. Nothing changes in
the root namespace; every dockerd, container, mount, cgroup and folder is removed after.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.agents import Agent, put_config, wait_for
from tests.lab.docker import DockerLab
from tests.support.netns import root_ns_snapshot

pytestmark = pytest.mark.lab

TWEED = Path(sys.executable).with_name("tweed")


@pytest.fixture
def docker_lab(lab) -> Iterator[DockerLab]:
    """Stopped and cleaned before `lab` (which would SIGKILL dockerd with its namespace)."""
    base = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}dk-", dir="/tmp"))
    dl = DockerLab(base, lab.prefix)
    try:
        yield dl
    finally:
        forced, left = dl.close()
        if forced:
            warnings.warn(f"docker teardown had to force: {forced}", stacklevel=1)
        assert not left, f"docker teardown left: {left}"


def docker_opts_words(host, subnet_file: Path, out: Path) -> list[str]:
    """Run `tweed docker-opts` in the host's namespace; DOCKER_OPTS split as sh splits it."""
    host.exec([str(TWEED), "docker-opts", "-f", str(subnet_file), "-d", str(out)])
    res = subprocess.run(["sh", "-c", '. "$1"; printf %s "$DOCKER_OPTS"', "sh", str(out)],
                         capture_output=True, text=True, check=True)
    return res.stdout.split()


def busybox_ping(daemon, container: str, ip: str) -> bool:
    res = daemon.docker("exec", container, "ping", "-c", "1", "-W", "1", ip, check=False)
    return res.returncode == 0


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_docker_containers_ping_across_the_overlay(lab, docker_lab, tmp_path, backend) -> None:
    before = root_ns_snapshot()
    etcd = lab.start_etcd()
    put_config(etcd, backend)
    hosts, agents = [], []
    for i in (1, 2):
        host = lab.add_host(i)
        hosts.append(host)
        agents.append(Agent(host, etcd.client_url, tmp_path, "--resync-period", "2").start())

    daemons, containers = [], []
    for host, agent in zip(hosts, agents, strict=True):
        env = agent.wait_env()
        words = docker_opts_words(host, agent.subnet_file, tmp_path / f"{host.ns}.docker.env")
        assert words == [f"--bip={env['FLANNEL_SUBNET']}", "--ip-masq=true",
                         f"--mtu={env['FLANNEL_MTU']}"]
        daemon = docker_lab.start(host, words)
        daemons.append(daemon)
        # dockerd made docker0 with tweed's subnet
        addr = host.exec(["ip", "-4", "-br", "addr", "show", "docker0"]).stdout.split()
        assert env["FLANNEL_SUBNET"] in addr, addr
        info = daemon.run_container(f"c{host.index}")
        ip = info["NetworkSettings"]["IPAddress"]
        assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network
        mtu = daemon.docker("exec", f"c{host.index}", "cat", "/sys/class/net/eth0/mtu").stdout
        assert int(mtu) == int(env["FLANNEL_MTU"]) == {"vxlan": 1450, "udp": 1472}[backend]
        containers.append(ip)

    (d1, d2), (ip1, ip2) = daemons, containers
    wait_for(lambda: busybox_ping(d1, "c1", ip2), timeout=20, what=f"c1 -> c2 over {backend}")
    res = d2.docker("exec", "c2", "ping", "-c", "3", "-W", "2", ip1, check=False)
    assert res.returncode == 0 and "3 packets received" in res.stdout, res.stdout + res.stderr
    # A packet of the full container MTU crosses too (the inner MTU is right for the backend).
    size = str(int(agents[0].env()["FLANNEL_MTU"]) - 28)
    res = d1.docker("exec", "c1", "ping", "-c", "2", "-W", "2", "-s", size, ip2, check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    for a in agents:
        assert a.stop() == 0
    # dockerd ran with --iptables=false in the host namespaces: the root one is untouched.
    after = root_ns_snapshot()
    assert after == before


def test_docker_opts_refuses_a_host_that_routes_its_subnet_elsewhere(lab, tmp_path) -> None:
    # mk-docker-opts.sh's check, in a real namespace: a route to our subnet via a gateway
    # (a stale host-gw route, say) would keep docker0's own route out of the table.
    host = lab.add_host(1)
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.9.1/24\n"
                   "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")
    out = tmp_path / "docker_opts.env"
    ok = host.exec([str(TWEED), "docker-opts", "-f", str(env), "-d", str(out)], check=False)
    assert ok.returncode == 0, ok.stderr
    host.exec(["ip", "route", "add", "10.5.9.0/24", "via", "192.168.100.77"])
    res = host.exec([str(TWEED), "docker-opts", "-f", str(env), "-d", str(out)], check=False)
    assert res.returncode == 1
    assert res.stderr == ("tweed docker-opts: the routing table already has a route to this "
                          "host's subnet: 10.5.9.0/24 via 192.168.100.77; remove it before "
                          "starting Docker\n")
