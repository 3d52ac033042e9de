"""agent.sd_notify against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import sd_notify
from agent.sd_notify import Notifier, daemon_status, report, socket_address, watchdog_interval
from tests.support.daemon_rig import DaemonRig


@pytest.fixture
def listener(tmp_path: Path):
    """(NOTIFY_SOCKET value, bound non-blocking receiving socket) on a file path."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield str(path), sock
    finally:
        sock.close()


def block_the_loop(seconds: float) -> None:
    """What a stuck event loop looks like: the thread does not return to it."""
    time.sleep(seconds)


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc/def") == b"\0abc/def"
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None  # not supported: nothing is sent
    assert socket_address("relative/path") is None


def test_no_notify_socket_means_nothing_is_sent_and_no_socket_opened() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.send("READY=1") is False
    assert n._sock is None


def test_messages_arrive_on_a_path_socket(listener) -> None:
    value, sock = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert n.enabled
    assert n.status("waiting\nfor etcd", "READY=1")
    assert n.watchdog()
    assert n.stopping("bye")
    n.close()
    assert received(sock) == [
        "READY=1\nSTATUS=waiting for etcd",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=bye",
    ]


def test_messages_arrive_on_an_abstract_socket() -> None:
    name = f"tweed-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier(f"@{name}")
        assert n.send("READY=1")
        assert sock.recv(4096) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_sender_credentials_are_our_pid(listener) -> None:
    # systemd's NotifyAccess=main accepts only messages whose SCM_CREDENTIALS name the
    # main PID; the kernel adds them for a receiver with SO_PASSCRED.
    value, sock = listener
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier(value).send("READY=1")
    _, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    creds = [d for lvl, typ, d in anc if lvl == socket.SOL_SOCKET
             and typ == socket.SCM_CREDENTIALS]
    assert creds and int.from_bytes(creds[0][:4], "little") == os.getpid()


def test_long_status_is_cut(listener) -> None:
    value, sock = listener
    Notifier(value).status("x" * 5000)
    (msg,) = received(sock)
    assert msg == "STATUS=" + "x" * sd_notify.STATUS_MAX


def test_send_failure_is_logged_once_and_not_raised(tmp_path, caplog) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.send("WATCHDOG=1") is False
    assert n.send("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_unsupported_socket_kind_is_warned_about(caplog) -> None:
    n = Notifier("vsock:2:1")
    assert not n.enabled
    assert "not a path or an abstract socket" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 4242) == expected


def test_watchdog_interval_defaults_to_our_environment(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.5


def _daemon(reason=None, reachable=True, config_state="running"):
    return SimpleNamespace(
        not_ready_reason=lambda: reason,
        manager=SimpleNamespace(lease=SimpleNamespace(describe=lambda: "10.5.7.0/24"),
                                etcd_reachable=reachable),
        config=SimpleNamespace(backend_type="vxlan"),
        config_state=config_state,
    )


def test_daemon_status_texts() -> None:
    assert daemon_status(_daemon("no subnet lease yet: etcd unreachable")) == (
        False, "not ready: no subnet lease yet: etcd unreachable")
    assert daemon_status(_daemon()) == (True, "ready: subnet 10.5.7.0/24, backend vxlan")
    ready, text = daemon_status(_daemon(reachable=False, config_state="changed"))
    assert ready
    assert "etcd unreachable" in text
    assert "network config in etcd changed" in text


async def test_daemon_status_of_a_real_daemon(tmp_path: Path) -> None:
    rig = DaemonRig(tmp_path)  # a Daemon over MemoryRegistry and FakeNetlink
    d = rig.daemon
    assert daemon_status(d) == (False, "not ready: waiting for a valid network config")
    try:
        await rig.serve_ready()
        assert daemon_status(d) == (True, "ready: subnet 10.5.1.0/24, backend host-gw")
        await rig.reg.set_config(b'{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}')
        await rig.until(lambda: d.config_state == "changed", "the new config noticed")
        assert daemon_status(d) == (True, "ready: subnet 10.5.1.0/24, backend host-gw; network "
                                    "config in etcd changed, running on the old one")
        rig.reg.available = False
        await rig.until(lambda: d.manager is not None and not d.manager.etcd_reachable,
                        "etcd unreachable")
        ready, text = daemon_status(d)
        assert ready and "; etcd unreachable, retrying (data path unaffected)" in text
    finally:
        await rig.stop()


async def test_report_status_changes_ready_once_and_watchdog(listener, monkeypatch) -> None:
    value, sock = listener
    monkeypatch.setattr(sd_notify, "EXTEND_EVERY", 1000.0)
    states = iter([
        (False, "not ready: waiting for etcd"),
        (False, "not ready: waiting for etcd"),
        (False, "not ready: no subnet lease yet"),
        (True, "ready: subnet 10.5.7.0/24"),
    ])
    last = [(True, "ready: subnet 10.5.7.0/24")]

    def state():
        return next(states, last[0])

    n = Notifier(value)
    task = asyncio.create_task(report(n, state, watchdog=0.05, poll=0.01))
    await asyncio.sleep(0.3)
    last[0] = (False, "not ready: no subnet lease yet: etcd unreachable")
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    msgs = received(sock)
    non_ping = [m for m in msgs if m != "WATCHDOG=1"]
    assert non_ping == [
        "STATUS=not ready: waiting for etcd",
        f"EXTEND_TIMEOUT_USEC={int(sd_notify.EXTEND_BY * 1e6)}",
        "STATUS=not ready: no subnet lease yet",
        "READY=1\nSTATUS=ready: subnet 10.5.7.0/24",
        "STATUS=not ready: no subnet lease yet: etcd unreachable",
    ]
    # 0.4 s at one ping per 0.05 s; a loose lower bound for a busy machine.
    assert msgs.count("WATCHDOG=1") >= 4


async def test_report_extends_the_start_timeout_only_until_ready(listener, monkeypatch) -> None:
    value, sock = listener
    monkeypatch.setattr(sd_notify, "EXTEND_EVERY", 0.05)
    ready = [False]
    task = asyncio.create_task(report(Notifier(value), lambda: (ready[0], "s"), poll=0.01))
    await asyncio.sleep(0.3)
    before = received(sock)
    ready[0] = True
    await asyncio.sleep(0.3)
    task.cancel()
    after = received(sock)
    assert sum(m.startswith("EXTEND_TIMEOUT_USEC=") for m in before) >= 3
    assert after[0] == "READY=1\nSTATUS=s"
    assert not any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in after)


async def test_report_without_socket_returns_at_once() -> None:
    await asyncio.wait_for(report(Notifier(None), lambda: (True, "x"), watchdog=0.01), 1)


async def test_a_failing_state_does_not_stop_the_watchdog(listener, caplog) -> None:
    value, sock = listener

    def state():
        raise RuntimeError("bug")

    task = asyncio.create_task(report(Notifier(value), state, watchdog=0.02, poll=0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    msgs = received(sock)
    assert msgs.count("WATCHDOG=1") >= 3
    assert caplog.text.count("reading the daemon state for systemd failed") == 1


async def test_no_watchdog_ping_while_the_loop_is_blocked(listener) -> None:
    value, sock = listener
    task = asyncio.create_task(report(Notifier(value), lambda: (True, "s"), watchdog=0.02,
                                      poll=0.01))
    await asyncio.sleep(0.05)
    received(sock)
    block_the_loop(0.3)  # nothing may be sent meanwhile
    assert received(sock) == []
    await asyncio.sleep(0.05)
    task.cancel()
    assert "WATCHDOG=1" in received(sock)
