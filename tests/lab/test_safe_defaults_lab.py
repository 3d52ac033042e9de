"""Safe defaults of a real tweed process (issue 7, security): the health and metrics server
listens on loopback unless --healthz-ip says otherwise, subnet.env is 0644 (Docker and
other readers need it) and the vxlan state file with the VtepMAC is 0600, whatever the
umask the agent was started with.
"""

from __future__ import annotations

import stat
import sys

import pytest

from tests.lab.agents import Agent, put_config, wait_for

pytestmark = pytest.mark.lab

PORT = 9100


def connect(host, ip: str, port: int = PORT) -> str:
    """'ok' or the errno name of a TCP connect to ip:port from inside the host namespace."""
    code = (
        "import errno, socket\n"
        "try:\n"
        f" socket.create_connection(({ip!r}, {port}), timeout=5).close()\n"
        " print('ok')\n"
        "except OSError as e:\n"
        " print(errno.errorcode.get(e.errno, e))\n"
    )
    return host.exec([sys.executable, "-c", code]).stdout.strip()


def listeners(host, port: int = PORT) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` in the host namespace."""
    out = host.exec(["ss", "-Htln", f"sport = :{port}"]).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", ["000", "077"])
def test_metrics_on_loopback_and_state_files_with_safe_modes(lab, tmp_path, umask):
    etcd = lab.start_etcd()
    put_config(etcd, "vxlan")
    host = lab.add_host(1)
    agent = Agent(host, etcd.client_url, tmp_path, "--healthz-port", str(PORT))
    # umask 000 would make careless files world-writable, 077 unreadable for Docker.
    agent.args = ["sh", "-c", f'umask {umask} && exec "$@"', "sh", *agent.args]
    agent.start()
    agent.wait_env(timeout=60)
    wait_for(lambda: listeners(host), timeout=30, what="health server listening")

    assert listeners(host) == [f"127.0.0.1:{PORT}"]
    assert connect(host, "127.0.0.1") == "ok"
    assert connect(host, host.address) == "ECONNREFUSED"  # not on eth0's address

    assert mode(agent.subnet_file) == 0o644
    state = agent.subnet_file.with_name(f"{agent.subnet_file.name}.flannel.1.json")
    assert '"VtepMAC"' in state.read_text()
    assert mode(state) == 0o600
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(host.ns)) == sorted(
        [agent.subnet_file.name, state.name, agent.log_path.name])
    assert agent.stop() == 0


def test_healthz_ip_opens_the_server_to_other_addresses_only_when_asked(lab, tmp_path):
    etcd = lab.start_etcd()
    put_config(etcd)
    host = lab.add_host(1)
    agent = Agent(host, etcd.client_url, tmp_path, "--healthz-port", str(PORT),
                  "--healthz-ip", host.address).start()
    agent.wait_env(timeout=60)
    wait_for(lambda: listeners(host), timeout=30, what="health server listening")
    assert listeners(host) == [f"{host.address}:{PORT}"]
    assert connect(host, host.address) == "ok"
    assert agent.stop() == 0
