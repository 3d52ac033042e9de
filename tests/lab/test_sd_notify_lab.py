"""A real tweed process talks to "systemd": a datagram socket given as NOTIFY_SOCKET.

The socket is a file path (an abstract socket would belong to the test's network
namespace, not the host's). The test plays the service manager: it records every message
with the sender's PID from SCM_CREDENTIALS, as systemd does for NotifyAccess=main, and
checks STATUS lines while tweed waits for its config, READY=1 only once subnet.env is
written, WATCHDOG=1 at WATCHDOG_USEC/2, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.agents import Agent, put_config, wait_for

pytestmark = pytest.mark.lab

WATCHDOG_USEC = 400_000  # a ping every 0.2 s


@dataclass
class Message:
    at: float
    fields: list[str]
    pid: int
    subnet_file_written: bool  # when the message arrived


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, path: Path, subnet_file: Path) -> None:
        self.path = path
        self.subnet_file = subnet_file
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []

    def _written(self) -> bool:
        try:
            return "FLANNEL_SUBNET=" in self.subnet_file.read_text()
        except FileNotFoundError:
            return False

    def drain(self) -> list[Message]:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                return self.messages
            pid = next((int.from_bytes(d[:4], "little") for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            self.messages.append(Message(time.monotonic(), data.decode().split("\n"), pid,
                                         self._written()))

    def having(self, field: str) -> list[Message]:
        return [m for m in self.drain() if field in m.fields]

    def statuses(self) -> list[str]:
        return [f[len("STATUS="):] for m in self.drain() for f in m.fields
                if f.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()


def test_tweed_reports_status_ready_watchdog_and_stopping(lab, tmp_path: Path) -> None:
    etcd = lab.start_etcd()
    host = lab.add_host(1)
    subnet_file = tmp_path / f"{host.ns}.subnet.env"
    systemd = FakeSystemd(tmp_path / "notify.sock", subnet_file)
    try:
        agent = Agent(host, etcd.client_url, tmp_path, "--resync-period", "2", env={
            "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        assert agent.subnet_file == subnet_file
        agent.start()
        assert agent.proc is not None
        # No config in etcd yet: tweed says what it waits for, and is not ready.
        wait_for(lambda: any("no network config" in s for s in systemd.statuses()),
                 timeout=20, what="STATUS naming the missing config")
        assert not systemd.having("READY=1")
        assert systemd.having("EXTEND_TIMEOUT_USEC=20000000"), "start timeout not extended"

        put_config(etcd, "vxlan")
        (ready,) = wait_for(lambda: systemd.having("READY=1"), timeout=30, what="READY=1")
        assert ready.subnet_file_written, "READY=1 came before subnet.env was written"
        env = agent.env()
        subnet = env["FLANNEL_SUBNET"].replace(".1/", ".0/")
        assert f"STATUS=ready: subnet {subnet}, backend vxlan" in ready.fields
        # The states before ready were reported, each once in a row, all "not ready".
        before = [s for m in systemd.messages if m.at < ready.at for s in m.fields
                  if s.startswith("STATUS=")]
        assert before and all(s.startswith("STATUS=not ready: ") for s in before)
        assert all(a != b for a, b in itertools.pairwise(before))

        # Watchdog pings at WATCHDOG_USEC/2 while the loop runs: 2 s gives about 10.
        start = time.monotonic()
        time.sleep(2.0)
        pings = [m for m in systemd.having("WATCHDOG=1") if m.at >= start]
        assert 6 <= len(pings) <= 14, f"{len(pings)} pings in 2 s"

        assert agent.stop(signal.SIGTERM) == 0
        (stopping,) = systemd.having("STOPPING=1")
        assert any(f.startswith("STATUS=stopping") for f in stopping.fields)
        assert systemd.messages[-1] is stopping, "messages after STOPPING=1"
        assert len(systemd.having("READY=1")) == 1
        # Every message came from the main process itself (NotifyAccess=main).
        assert {m.pid for m in systemd.messages} == {agent.proc.pid}
    finally:
        systemd.close()
