"""Real tweed processes against an etcd that wants TLS with client certificates, or a
username and password: the flags work, and each wrong setting is one clear log line (the
process retries quietly and /readyz says why) or, for a file that cannot be used at all,
exit status 1 with one line naming the flag.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.lab import fault_tools
from tests.lab.agents import Agent, put_config, routes, subnet_key, wait_for
from tests.support.certs import Pki
from tests.support.etcd import ClientTls, EtcdServer, ServerTls
from tests.support.netns import UNDERLAY_GW

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
HEALTH_PORT = 9100
USER, PASSWORD = "tweed", "pw-in-env-only"
PEER = ('{"PublicIP":"192.168.100.9","PublicIPv6":null,"BackendType":"host-gw"}')
#: How long a refused agent is watched for repeated lines: its backoff (0.2 s doubling)
#: retries about five times in this long.
QUIET_WATCH = 6.0


def readyz(host, port: int = HEALTH_PORT) -> tuple[int, str]:
    return fault_tools.readyz(host, port)


def start_etcd(lab, **kw) -> EtcdServer:
    """An etcd on the underlay (192.168.100.254), closed by the lab."""
    server = EtcdServer(UNDERLAY_GW, netns=lab.underlay, **kw)
    lab.etcds.append(server)
    return server.start()


def mtls_etcd(lab, pki: Pki) -> EtcdServer:
    etcd = start_etcd(
        lab, tls=ServerTls(pki.cert("server"), pki.key("server"), trusted_ca=pki.ca),
        ctl_tls=ClientTls(pki.ca, pki.cert("client"), pki.key("client")),
    )
    put_config(etcd)
    return etcd


def auth_etcd(lab) -> EtcdServer:
    etcd = start_etcd(lab)
    put_config(etcd)
    etcd.etcdctl("user", "add", "root:root-pw")
    etcd.etcdctl("role", "add", "flannel")
    etcd.etcdctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite",
                 f"{PREFIX}/")
    etcd.etcdctl("user", "add", f"{USER}:{PASSWORD}")
    etcd.etcdctl("user", "grant-role", USER, "flannel")
    etcd.etcdctl("auth", "enable")
    etcd.user = "root:root-pw"
    return etcd


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki", server_ips=(UNDERLAY_GW,))


def tls_flags(pki: Pki, client: str = "client", ca: Path | None = None) -> list[str]:
    return ["--etcd-cafile", str(ca or pki.ca), "--etcd-certfile", str(pki.cert(client)),
            "--etcd-keyfile", str(pki.key(client))]


def problem_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR) ", line)]


def assert_refused_quietly(agent: Agent, phrase: str) -> None:
    """The agent keeps running, said `phrase` in one line, and /readyz says it too."""
    wait_for(lambda: readyz(agent.host)[0] == 503 and phrase in readyz(agent.host)[1],
             timeout=60, what=f"/readyz names {phrase!r}")
    time.sleep(QUIET_WATCH)  # retries happen meanwhile; none may add a line
    log = agent.log()
    assert agent.proc is not None and agent.proc.poll() is None, log
    said = [line for line in log.splitlines() if phrase in line]
    assert len(said) == 1, log
    assert "retrying with backoff" in said[0]
    assert problem_lines(log) == said, log
    assert "Traceback" not in log
    status, body = readyz(agent.host)
    assert status == 503 and phrase in body, body
    assert agent.stop() == 0


# -- TLS ------------------------------------------------------------------------------------
def test_agent_over_mtls_holds_a_lease_and_watches_peers(lab, tmp_path, pki):
    etcd = mtls_etcd(lab, pki)
    assert etcd.client_url == f"https://{UNDERLAY_GW}:{etcd.port}"
    host = lab.add_host(1)
    # One of the three files through the environment, as a unit file might pass it.
    flags = tls_flags(pki)[:4]
    agent = Agent(host, etcd.client_url, tmp_path, *flags, "--resync-period", "2",
                  "--healthz-port", str(HEALTH_PORT),
                  env={"FLANNELD_ETCD_KEYFILE": str(pki.key("client"))}).start()
    env = agent.wait_env(timeout=60)
    assert json.loads(etcd.get(subnet_key(agent.subnet))) == {
        "PublicIP": "192.168.100.1", "PublicIPv6": None, "BackendType": "host-gw"}
    assert env["FLANNEL_NETWORK"] == "10.5.0.0/16"
    wait_for(lambda: readyz(host) == (200, "ready"), timeout=30, what="ready")
    # The peer watch runs over the same TLS channel.
    etcd.put(subnet_key("10.5.200.0/24"), PEER)
    wait_for(lambda: "via 192.168.100.9 dev eth0" in routes(host, "10.5.200.0/24"),
             timeout=30, what="route to the peer")
    log = agent.log()
    assert "Traceback" not in log and problem_lines(log) == [], log
    assert agent.stop() == 0


@pytest.mark.parametrize(("case", "phrase"), [
    ("rogue client certificate", "TLS: etcd refused the client certificate --etcd-certfile"),
    ("server not from our CA", "TLS: etcd's server certificate is not trusted by "
                               "--etcd-cafile"),
])
def test_agent_refused_by_tls_says_so_once_and_keeps_trying(lab, tmp_path, pki, case, phrase):
    etcd = mtls_etcd(lab, pki)
    flags = (tls_flags(pki, client="rogue") if case == "rogue client certificate"
             else tls_flags(pki, ca=pki.other_ca))
    agent = Agent(lab.add_host(1), etcd.client_url, tmp_path, *flags,
                  "--healthz-port", str(HEALTH_PORT)).start()
    assert_refused_quietly(agent, phrase)
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}


@pytest.mark.parametrize("case", ["missing certfile", "key of another certificate"])
def test_unusable_tls_file_exits_1_naming_the_flag(lab, tmp_path, pki, case):
    etcd = mtls_etcd(lab, pki)
    if case == "missing certfile":
        missing = tmp_path / "no-such.pem"
        flags = tls_flags(pki)
        flags[3] = str(missing)
        want = f"--etcd-certfile: cannot read {missing}: No such file or directory"
    else:
        flags = tls_flags(pki)
        flags[5] = str(pki.key("rogue"))
        want = (f"--etcd-keyfile: {pki.key('rogue')} is not the key of the certificate in "
                f"--etcd-certfile {pki.cert('client')}")
    agent = Agent(lab.add_host(1), etcd.client_url, tmp_path, *flags).start()
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == 1
    log = agent.log()
    assert problem_lines(log) == [line for line in log.splitlines() if want in line], log
    assert len(problem_lines(log)) == 1 and " ERROR " in problem_lines(log)[0], log
    assert "Traceback" not in log
    assert not agent.subnet_file.exists()


# -- username and password -------------------------------------------------------------------
def test_agent_logs_in_and_logs_in_again_after_etcd_forgets_its_token(lab, tmp_path):
    etcd = auth_etcd(lab)
    host = lab.add_host(1)
    # The password only in the environment: a flag would show in `ps` to every user.
    agent = Agent(host, etcd.client_url, tmp_path, "--etcd-username", USER,
                  "--resync-period", "2", "--healthz-port", str(HEALTH_PORT),
                  env={"FLANNELD_ETCD_PASSWORD": PASSWORD}).start()
    agent.wait_env(timeout=60)
    assert json.loads(etcd.get(subnet_key(agent.subnet)))["PublicIP"] == "192.168.100.1"
    wait_for(lambda: readyz(host) == (200, "ready"), timeout=30, what="ready")

    # etcd keeps simple tokens in memory: after a restart the agent's token is worthless,
    # and its watch and calls must log in again by themselves.
    etcd.restart()
    etcd.put(subnet_key("10.5.200.0/24"), PEER)
    wait_for(lambda: "via 192.168.100.9 dev eth0" in routes(host, "10.5.200.0/24"),
             timeout=60, what="a peer added after the restart is routed")
    log = agent.log()
    assert "Traceback" not in log and PASSWORD not in log, log
    assert not [line for line in problem_lines(log) if "token" in line or "login" in line], log
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.stop(signal.SIGTERM) == 0


def test_agent_with_a_wrong_password_says_so_once(lab, tmp_path):
    etcd = auth_etcd(lab)
    agent = Agent(lab.add_host(1), etcd.client_url, tmp_path, "--etcd-username", USER,
                  "--healthz-port", str(HEALTH_PORT),
                  env={"FLANNELD_ETCD_PASSWORD": "not-the-password"}).start()
    assert_refused_quietly(
        agent, f"etcd login as {USER!r} refused: wrong --etcd-username or --etcd-password")
    assert "not-the-password" not in agent.log()
