"""The test support itself: real etcd, the cuttable proxy, the namespace lab and its teardown."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from tests.support.etcd import Etcdctl, EtcdServer
from tests.support.netns import Lab, list_netns, parse_env, root_ns_snapshot
from tests.support.proxy import TcpProxy
from tests.support.wait import WaitTimeout, poll, until, wait_for

# --- etcd -------------------------------------------------------------------------------


@pytest.mark.etcd
def test_etcd_put_get_and_restart_keeps_data_and_port(etcd: EtcdServer) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", etcd.client_url)
    etcd.put("/a/1", "one")
    etcd.put("/a/2", "-starts-with-a-dash")
    etcd.put("/b", "bee")
    assert etcd.get("/a/1") == "one"
    assert etcd.get("/missing") is None
    assert etcd.get_prefix("/a/") == {"/a/1": "one", "/a/2": "-starts-with-a-dash"}
    etcd.delete("/b")
    assert etcd.get("/b") is None

    lease = etcd.put_with_lease("/leased", "x", ttl=60)
    assert 50 < etcd.lease_ttl(lease) <= 60
    rev = etcd.revision()
    assert rev >= 5
    etcd.compact(rev)
    with pytest.raises(RuntimeError, match="compacted"):
        etcd.etcdctl("get", "/a/1", f"--rev={rev - 1}")

    url, pid = etcd.client_url, etcd.pid
    etcd.restart()
    assert etcd.client_url == url and etcd.pid != pid
    assert etcd.get_prefix("/a/") == {"/a/1": "one", "/a/2": "-starts-with-a-dash"}
    assert etcd.get("/leased") == "x"
    assert etcd.revision() == rev

    etcd.stop()
    with pytest.raises(RuntimeError):
        etcd.etcdctl("get", "/a/1", command_timeout=1)
    etcd.start()
    assert etcd.get("/a/1") == "one"


@pytest.mark.etcd
def test_etcd_close_removes_everything() -> None:
    server = EtcdServer().start()
    proc, tmp = server.proc, server.dir
    assert proc is not None and tmp.is_dir()
    server.close()
    server.close()  # idempotent
    assert proc.poll() is not None
    assert not tmp.exists()


# --- proxy ------------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A loopback TCP echo server (one thread per connection), closed after the test."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(c: socket.socket) -> None:
        with contextlib.suppress(OSError), c:
            while data := c.recv(65536):
                c.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(c)
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[:2]
    finally:
        stop.set()
        t.join(5)
        srv.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()


def connect(proxy: TcpProxy) -> socket.socket:
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    return s


def echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_proxy_forwards_cuts_and_restores(echo_server, tcp_proxy) -> None:
    proxy = tcp_proxy(*echo_server)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", proxy.address)
    a = connect(proxy)
    assert echo(a, b"hello") == b"hello"
    assert proxy.accepted == 1 and proxy.active == 1

    proxy.cut()
    assert proxy.is_cut
    with pytest.raises(ConnectionResetError):  # the open connection is reset (RST)
        a.sendall(b"more")
        a.recv(10)
        a.sendall(b"more")  # in case the RST only arrives after the first send
        a.recv(10)
    a.close()
    wait_for(lambda: proxy.active == 0, 5, step=0.02, what="no connection left open")
    # New connections are refused with a reset, nothing reaches the target. (Under load
    # the reset can already arrive while connect() returns, so connect is inside too.)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        b = connect(proxy)
        try:
            echo(b, b"x")
            echo(b, b"x")
        finally:
            b.close()
    # The proxy thread counts after it sends the reset: wait for it rather than race it.
    wait_for(lambda: proxy.accepted == 2 and proxy.refused == 1, 5, step=0.02,
             what="the refused connection counted")

    proxy.restore()
    c = connect(proxy)
    assert echo(c, b"again") == b"again"
    # Large transfers and half-close work (the target sees EOF, we get all data back).
    blob = bytes(range(256)) * 20000  # 5 MB
    received = bytearray()
    reader = threading.Thread(target=lambda: _read_all(c, received))
    reader.start()
    c.sendall(blob)
    c.shutdown(socket.SHUT_WR)
    reader.join(30)
    assert bytes(received) == blob
    c.close()
    wait_for(lambda: proxy.active == 0, 5, step=0.02, what="no connection left open")
    assert proxy.accepted == 3


def _read_all(s: socket.socket, into: bytearray) -> None:
    while chunk := s.recv(65536):
        into += chunk


def test_proxy_blackhole_mode(echo_server, tcp_proxy) -> None:
    proxy = tcp_proxy(*echo_server)
    proxy.cut(mode="blackhole")
    s = connect(proxy)
    s.sendall(b"ping")
    s.settimeout(0.3)
    with pytest.raises(TimeoutError):  # no answer, no reset: packets are lost
        s.recv(10)
    s.settimeout(5)
    proxy.restore()  # the held connection is reset, new ones go through
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    s.close()
    with connect(proxy) as t:
        assert echo(t, b"ok") == b"ok"


def test_proxy_works_under_a_running_uvloop(echo_server, tcp_proxy) -> None:
    proxy = tcp_proxy(*echo_server)

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        r, w = await asyncio.open_connection(proxy.host, proxy.port)
        w.write(b"abc")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"abc"
        proxy.cut()  # called from the loop's own thread
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            w.write(b"x")
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        proxy.restore()
        r, w = await asyncio.open_connection(proxy.host, proxy.port)
        w.write(b"def")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"def"
        w.close()

    uvloop.run(main())


@pytest.mark.etcd
def test_proxy_in_front_of_etcd(etcd: EtcdServer, tcp_proxy) -> None:
    host, port = etcd.client_url.removeprefix("http://").split(":")
    proxy = tcp_proxy(host, int(port))
    via = Etcdctl(proxy.url)  # another client, through the proxy
    etcd.put("/k", "v")
    assert via.get("/k") == "v"
    proxy.cut()
    with pytest.raises(RuntimeError):
        via.etcdctl("get", "/k", command_timeout=1)
    proxy.restore()
    assert via.get("/k") == "v"


# --- lab --------------------------------------------------------------------------------


def ping(ns, addr: str) -> bool:
    return ns.exec(["ping", "-c", "1", "-W", "2", addr], check=False).returncode == 0


@pytest.mark.lab
def test_lab_two_hosts_containers_and_etcd(lab: Lab) -> None:
    assert re.fullmatch(r"tw\d{1,4}[a-z]?-", lab.prefix)
    h1, h2 = lab.add_host(1), lab.add_host(2)
    assert (h1.ns, h2.ns) == (f"{lab.prefix}h1", f"{lab.prefix}h2")
    assert "192.168.100.1/24" in h1.exec(["ip", "-br", "addr", "show", "eth0"]).stdout
    assert "mtu 1500" in h1.exec(["ip", "link", "show", "eth0"]).stdout
    assert h1.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert ping(h1, "192.168.100.2") and ping(h2, "192.168.100.1")

    gw = h1.add_docker0("10.5.72.1/24", 1450)
    assert str(gw) == "10.5.72.1/24"
    c1 = h1.add_container("a", 1450)
    c1b = h1.add_container("b", 1450)
    h2.add_docker0("10.5.9.1/24", 1450)
    c2 = h2.add_container("a", 1450)
    assert (c1.ns, c1.ip, c1b.ip, c2.ip) == (f"{lab.prefix}c1a", "10.5.72.2", "10.5.72.3",
                                             "10.5.9.2")
    assert "mtu 1450" in c1.exec(["ip", "link", "show", "eth0"]).stdout
    assert "default via 10.5.72.1 dev eth0" in c1.exec(["ip", "route"]).stdout
    assert "10.5.72.1/24" in h1.exec(["ip", "-br", "addr", "show", "docker0"]).stdout
    assert ping(c1, "10.5.72.1") and ping(c2, "10.5.9.1") and ping(c1, c1b.ip)
    assert not ping(c1, c2.ip)  # no overlay yet: that is the agent's job

    etcd = lab.start_etcd()
    assert etcd.client_url.startswith("http://192.168.100.254:")
    etcd.put("/from-underlay", "yes")
    res = h2.exec(["etcdctl", f"--endpoints={etcd.client_url}", "get", "/from-underlay",
                   "--print-value-only"])
    assert res.stdout.strip() == "yes"
    etcd.restart()  # same address and port, same data
    res = h1.exec(["etcdctl", f"--endpoints={etcd.client_url}", "get", "/from-underlay",
                   "--print-value-only"])
    assert res.stdout.strip() == "yes"
    with pytest.raises(subprocess.CalledProcessError, match="does not exist"):
        h1.exec(["ip", "link", "show", "nosuchdev"])  # failures carry stderr
    # Tracked processes are stopped by PID when a host is removed.
    sleeper = h2.popen(["sleep", "300"])
    h2.remove()
    assert sleeper.wait(5) is not None
    assert not any(ns.startswith(f"{lab.prefix}h2") or ns == c2.ns for ns in list_netns())
    assert 2 not in lab.hosts
    assert not ping(h1, "192.168.100.2")
    assert ping(c1, "10.5.72.1")


@pytest.mark.lab
def test_lab_close_leaves_nothing_behind(tmp_path: Path) -> None:
    before = root_ns_snapshot()
    lab = Lab()
    try:
        etcd = lab.start_etcd()
        hosts = [lab.add_host(i) for i in (1, 2, 3)]
        for i, h in enumerate(hosts, start=1):
            h.add_docker0(f"10.5.{i}.1/24", 1500)
            h.add_container("a", 1500)
        sleeper = hosts[0].popen(["sleep", "300"])
        in_container = hosts[1].containers[0].popen(["sleep", "300"])
        assert sum(ns.startswith(lab.prefix) for ns in list_netns()) == 1 + 3 + 3
    finally:
        lab.close()
    lab.close()  # idempotent
    assert [ns for ns in list_netns() if ns.startswith(lab.prefix)] == []
    assert sleeper.poll() is not None and in_container.poll() is not None
    assert not etcd.running and not etcd.dir.exists()
    after = root_ns_snapshot()
    assert after == before


@pytest.mark.lab
def test_lab_is_removed_when_a_step_fails() -> None:
    lab = Lab()
    prefix = lab.prefix
    with pytest.raises(RuntimeError, match="add_docker0"), lab:
        host = lab.add_host(7)
        host.add_container("a")  # no docker0 yet
    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []


@pytest.mark.lab
def test_twenty_hosts(lab: Lab) -> None:
    t0 = time.monotonic()
    hosts = [lab.add_host(i) for i in range(1, 21)]
    took = time.monotonic() - t0
    print(f"20 hosts in {took:.2f} s")
    assert ping(hosts[0], "192.168.100.20") and ping(hosts[19], "192.168.100.1")


def test_parse_env() -> None:
    text = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\n# c\nFLANNEL_MTU=1450\n"
    assert parse_env(text) == {"FLANNEL_NETWORK": "10.5.0.0/16",
                               "FLANNEL_SUBNET": "10.5.72.1/24", "FLANNEL_MTU": "1450"}


# --- waiting ----------------------------------------------------------------------------


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = []

    def pred() -> list[int] | None:
        calls.append(1)
        return [len(calls)] if len(calls) == 3 else None

    assert wait_for(pred, 5, step=0.001) == [3]
    assert len(calls) == 3


def test_wait_for_names_what_it_waited_for_the_last_value_and_the_detail() -> None:
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        wait_for(lambda: [], 0.2, step=0.01, what="routes on h1", detail=lambda: "log tail")
    assert 0.2 <= time.monotonic() - t0 < 2
    assert str(info.value) == "routes on h1: not met within 0.2 s (last value [])\nlog tail"
    assert isinstance(info.value, AssertionError)
    # Unnamed: the predicate's name and line; False says nothing, so it is left out.
    with pytest.raises(WaitTimeout, match=r"^test_wait_for_names.*<lambda> at "
                       r"\S*tests/lab/test_lab_support\.py:\d+: not met within 0\.05 s$"):
        wait_for(lambda: False, 0.05, step=0.01)


def test_poll_returns_the_last_falsy_value_at_the_deadline() -> None:
    assert poll(lambda: 0, 0.05, step=0.01) == 0
    assert poll(lambda: "x", 0.05) == "x"


async def test_until_takes_plain_and_async_predicates_and_bounds_a_hanging_one() -> None:
    n = 0

    async def grows() -> int:
        nonlocal n
        n += 1
        return n if n >= 3 else 0

    assert await until(grows, 5, step=0.001) == 3
    assert await until(lambda: "plain", 5) == "plain"
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"^etcd answers: not met within 0\.2 s$"):
        await until(lambda: asyncio.sleep(60), 0.2, what="etcd answers")
    assert time.monotonic() - t0 < 2  # the hanging predicate was cancelled
