"""Every failure a user (or the host) can cause, injected into the real daemon: no traceback,
and the documented outcome (docs/troubleshooting.md, "Mistakes at start and while
running").

The daemon is the real one, run by its own main() (tests/support/daemon_rig.py: a
MemoryRegistry and a FakeNetlink whose calls fail on demand). Each injection point is one
`Point` below, with its outcome:
- `exit`: armed before the start; main() returns 1 with one ERROR line naming what failed,
  and writes no subnet.env;
- `retry`: armed before the start (`when="start"`) or once the agent is ready (`"run"`,
  then `trigger` makes the agent meet it); the agent stays up, counts the failure,
  /readyz says why (when `reason` is set), and is ready again once the failure is healed;
  SIGTERM then stops it with exit 0;
- `stop`: armed once ready; SIGTERM stops it with exit 0 and one WARNING line.
A new injection point is one more `Point`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

import backends.udp.network as udp_network
from agent.daemon import Daemon
from agent.health import start_health_server
from agent.subnet_file import write_problem
from tests.support.daemon_rig import CONFIG, OWN, DaemonRig, NetlinkError, peer_value

NET = "10.5.0.0/16"
PEER = "10.5.7.0-24"
VXLAN = json.dumps({"Network": NET, "Backend": {"Type": "vxlan"}}).encode()
#: The python datapath with every offload off: nothing it probes needs a real TUN.
UDP = json.dumps({"Network": NET, "Backend": {
    "Type": "udp", "Datapath": "python", "TSO": False, "Coalesce": False,
    "UDPGSO": False, "UDPGRO": False}}).encode()
IPV6_ONLY = json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                        "IPv6Network": "fd00:5::/56"}).encode()
BAD_VNI = json.dumps({"Network": NET, "Backend": {"Type": "vxlan", "VNI": "seven"}}).encode()


@dataclass
class Ctx:
    """What a point's actions may touch: the rig, the test's folder, the fake TUN's error."""

    rig: DaemonRig
    tmp: Path
    tun_error: Exception | None = None


Action = Callable[[Ctx], Awaitable[None] | None]


@dataclass(frozen=True)
class Point:
    """One injection point and its documented outcome."""

    id: str
    outcome: Literal["exit", "retry", "stop"]
    arm: Action
    #: exit: the ERROR line's text; retry: the /readyz reason's text (None: stays ready);
    #: stop: the WARNING line's text.
    line: str | None = None
    heal: Action | None = None
    config: bytes = CONFIG
    when: Literal["start", "run"] = "start"
    trigger: Action | None = None
    #: How many times the failure was counted (retry points); None: said by /readyz only.
    counter: Callable[[Daemon, DaemonRig], int] | None = None
    #: What must hold once healed, besides ready (e.g. the peer's route).
    healed: Callable[[DaemonRig], bool] | None = None
    #: Where the subnet file goes, relative to the test's folder (with "link/": a symlink).
    subnet_file: str = "subnet.env"
    opts: dict[str, Any] = field(default_factory=dict)


# -- actions ---------------------------------------------------------------------------------

def netlink(op: str, exc: Exception | None = None) -> tuple[Action, Action]:
    """Arm and heal: the FakeNetlink call `op` raises (pyroute2's plain NetlinkError)."""
    def arm(c: Ctx) -> None:
        c.rig.fake.failing[op] = exc or NetlinkError()

    def heal(c: Ctx) -> None:
        c.rig.fake.failing.pop(op, None)

    return arm, heal


def registry(op: str) -> tuple[Action, Action]:
    """Arm and heal: the registry call `op` raises RegistryUnavailable."""
    def arm(c: Ctx) -> None:
        c.rig.reg.failing.add(op)

    def heal(c: Ctx) -> None:
        c.rig.reg.failing.discard(op)

    return arm, heal


def etcd_errors(op: str) -> Callable[[Daemon, DaemonRig], int]:
    return lambda d, rig: rig.reg.requests.get((op, "error"), 0)


def failures(step: str) -> Callable[[Daemon, DaemonRig], int]:
    return lambda d, rig: d.failures[step]


def acquire_errors(d: Daemon, rig: DaemonRig) -> int:
    return d.manager.counters.acquire_errors if d.manager is not None else 0


async def put_peer(c: Ctx) -> None:
    await c.rig.reg.put(PEER, peer_value(7), ttl=600)


def peer_routed(rig: DaemonRig) -> bool:
    return any(str(dst) == "10.5.7.0/24" for dst in rig.fake.table)


async def lose_lease(c: Ctx) -> None:
    """Delete our key: the agent acquires a subnet again and sets it up anew."""
    m = c.rig.daemon.manager
    assert m is not None and m.lease is not None
    await c.rig.reg.delete(m.lease.name)


def put_config(value: bytes) -> Action:
    async def put(c: Ctx) -> None:
        await c.rig.reg.set_config(value)
    return put


def tun_fails(c: Ctx) -> None:
    c.tun_error = OSError(errno.ENOENT, "No such file or directory", "/dev/net/tun")


def folder_is_a_file(c: Ctx) -> None:
    (c.tmp / "not-a-folder").write_text("")


def state_file_is_a_folder(c: Ctx) -> None:
    (c.tmp / "subnet.env.flannel.1.json").mkdir()


def link_to(target: str) -> Action:
    """Point tmp/link (the subnet file's folder) at tmp/<target>."""
    def swap(c: Ctx) -> None:
        link = c.tmp / "link"
        link.unlink()
        link.symlink_to(c.tmp / target)
    return swap


def both(*actions: Action) -> Action:
    async def run(c: Ctx) -> None:
        for a in actions:
            result = a(c)
            if result is not None:
                await result
    return run


def _points() -> list[Point]:
    points: list[Point] = []
    # Netlink at start: the interface choice, the backend's devices, the first sync.
    iface = "cannot read the host's interfaces and routes to choose the external interface"
    for op, opts in (("links", {}), ("default_route_oif", {}),
                     ("route_get_oif", {"iface_can_reach": "192.168.100.9"})):
        points.append(Point(f"netlink-{op}", "exit", netlink(op)[0], iface, opts=opts))
    points += [
        Point("netlink-routes-start", "exit", netlink("routes")[0],
              "cannot program the host-gw backend for subnet"),
        Point("netlink-find_vxlan", "exit", netlink("find_vxlan")[0],
              "cannot set up the vxlan backend: NetlinkError", config=VXLAN),
        Point("netlink-ensure_vxlan-start", "exit", netlink("ensure_vxlan")[0],
              "cannot set up vxlan device flannel.1", config=VXLAN),
        Point("netlink-neighbours-start", "exit", netlink("neighbours")[0],
              "cannot program the vxlan backend for subnet", config=VXLAN),
        Point("netlink-configure_link-start", "exit", netlink("configure_link")[0],
              "cannot configure TUN device flannel0", config=UDP),
        Point("tun-open", "exit", tun_fails, "cannot open TUN device flannel0", config=UDP),
    ]
    # Netlink while running: a batch of peers the kernel cannot take, a new lease's device.
    for op in ("apply", "routes"):
        arm, heal = netlink(op)
        points.append(Point(f"netlink-{op}-batch", "retry", arm,
                            "backend not programmed: NetlinkError", heal, when="run",
                            trigger=put_peer, counter=failures("kernel"), healed=peer_routed))
    arm, heal = netlink("apply")
    points.append(Point("netlink-apply-listing", "retry", both(arm, put_peer),
                        "backend not programmed: NetlinkError", heal,
                        counter=failures("kernel"), healed=peer_routed))
    for op, config in (("ensure_vxlan", VXLAN), ("fdb_entries", VXLAN),
                       ("configure_link", UDP)):
        arm, heal = netlink(op)
        points.append(Point(f"netlink-{op}-new-lease", "retry", arm,
                            f"cannot set up the new subnet {OWN}", heal, config=config,
                            when="run", trigger=lose_lease,
                            counter=failures("backend_setup")))
    arm, heal = netlink("close")
    points.append(Point("netlink-close", "stop", arm, "stopping: closing netlink failed: "
                        "NetlinkError: (1, 'Operation not permitted')"))
    arm, heal = registry("close")
    points.append(Point("etcd-close", "stop", arm, "stopping: closing the etcd client "
                        "failed: injected: close fails"))
    # Files.
    points += [
        Point("subnet-file-folder", "exit", folder_is_a_file, "--subnet-file: cannot write",
              subnet_file="not-a-folder/subnet.env"),
        Point("vxlan-state-file", "exit", state_file_is_a_folder,
              "cannot write the vxlan state file", config=VXLAN),
        Point("subnet-file-new-lease", "retry", link_to("not-a-folder"),
              f"cannot set up the new subnet {OWN}: --subnet-file: cannot write",
              both(link_to("real")), when="run", trigger=both(folder_is_a_file, lose_lease),
              counter=failures("subnet_file"), subnet_file="link/subnet.env"),
    ]
    # The config: waited out like any invalid one.
    points += [
        Point("config-ipv6-only", "retry", put_config(IPV6_ONLY),
              "invalid network config at /coreos.com/network/config: EnableIPv4 is false",
              put_config(CONFIG), config=b""),
        Point("config-backend-option", "retry", put_config(BAD_VNI),
              "invalid network config at /coreos.com/network/config: Backend.VNI:",
              put_config(VXLAN), config=b""),
        Point("config-backend-type", "retry", put_config(b'{"Network":"10.5.0.0/16",'
                                                         b'"Backend":{"Type":"ipip"}}'),
              "Backend.Type 'ipip' is not available", put_config(CONFIG), config=b""),
    ]
    # etcd: every call retried.
    waiting = "cannot reach etcd to read /coreos.com/network/config"
    no_lease = "no subnet lease yet: etcd unreachable"
    arm, heal = registry("get_config")
    points.append(Point("etcd-get_config", "retry", arm, waiting, heal,
                        counter=etcd_errors("get_config")))
    arm, heal = registry("watch_config")
    points.append(Point("etcd-watch_config-start", "retry", arm, waiting,
                        both(heal, put_config(CONFIG)), config=b"",
                        counter=etcd_errors("watch_config")))
    points.append(Point("etcd-watch_config-run", "retry", arm, None, heal, when="run",
                        trigger=put_config(VXLAN), counter=etcd_errors("watch_config")))
    for op in ("list_subnets", "create_subnet"):
        arm, heal = registry(op)
        points.append(Point(f"etcd-{op}", "retry", arm, no_lease, heal,
                            counter=acquire_errors))
    arm, heal = registry("update_subnet")
    points.append(Point("etcd-update_subnet", "retry", both(arm, own_lease("10.5.1.0-24")),
                        no_lease, heal, counter=acquire_errors))
    arm, heal = registry("delete_subnet")
    points.append(Point("etcd-delete_subnet", "retry", both(arm, own_lease("10.5.0.0-24")),
                        no_lease, heal, counter=acquire_errors))
    arm, heal = registry("watch_subnets")
    points.append(Point("etcd-watch_subnets", "retry", arm, None, heal, when="run",
                        trigger=put_peer, counter=lambda d, rig: d.manager.counters
                        .watch_reconnects if d.manager is not None else 0,
                        healed=peer_routed))
    arm, heal = registry("create_subnet")
    points.append(Point("etcd-create_subnet-lost-lease", "retry", arm,
                        "acquiring a subnet again", heal, when="run", trigger=lose_lease,
                        counter=acquire_errors))
    return points


def own_lease(name: str) -> Action:
    """A lease of ours (our PublicIP) already in etcd: reused (update) or, if it does not
    fit the config, deleted."""
    async def put(c: Ctx) -> None:
        await c.rig.reg.put(name, peer_value(1), ttl=600)
    return put


POINTS = _points()


# -- the test ----------------------------------------------------------------------------------

class FakeTun:
    """Stands in for flannel0: one end of a datagram socket pair (no device is made)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def fileno(self) -> int:
        return self.ours.fileno()

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def fake_udp_host(monkeypatch: pytest.MonkeyPatch, ctx: Ctx) -> None:
    """The udp backend without a TUN device or the rig's address: the root namespace is
    left alone; the netlink calls (configure_link) still go to the FakeNetlink."""
    def open_tun(name: str, vnet_hdr: bool = False) -> FakeTun:
        if ctx.tun_error is not None:
            raise ctx.tun_error
        return FakeTun()

    def open_socket(addr: object, port: int, size: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    monkeypatch.setattr(udp_network, "open_tun", open_tun)
    monkeypatch.setattr(udp_network, "open_socket", open_socket)
    monkeypatch.delenv("TWEED_DATAPATH", raising=False)


async def act(action: Action | None, ctx: Ctx) -> None:
    if action is not None:
        result = action(ctx)
        if result is not None:
            await result


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with_trace = [f"{r.name}: {r.getMessage()}" for r in caplog.records
                  if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]
    assert not with_trace, with_trace
    assert "Traceback" not in caplog.text


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
async def test_injected_failure(
    point: Point, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    if point.subnet_file.startswith("link/"):
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
    subnet_file = tmp_path / point.subnet_file
    exits = point.outcome == "exit"
    # A start that fails must leave no subnet.env of its own: there is none before it.
    rig = DaemonRig(tmp_path, previous=None if exits else OWN, subnet_file=subnet_file,
                    subnet_lease_ttl=600, **point.opts)
    ctx = Ctx(rig, tmp_path)
    fake_udp_host(monkeypatch, ctx)
    d = rig.daemon
    if point.config:
        await rig.reg.set_config(point.config)
    if point.when == "start":
        await act(point.arm, ctx)
    main = rig.start(d.main)
    try:
        if exits:
            assert await asyncio.wait_for(main, 10.0) == 1
            errors = lines(caplog, logging.ERROR)
            assert point.line is not None
            assert any(point.line in e for e in errors), errors
            assert all("\n" not in e for e in errors)
            assert not subnet_file.exists()
            assert_no_traceback(caplog)
            return
        if point.when == "run":
            await rig.ready()
            await act(point.arm, ctx)
            await act(point.trigger, ctx)
        if point.outcome == "retry":
            await retried(point, rig, d)
            await act(point.heal, ctx)
            await rig.until(lambda: d.not_ready_reason() is None, "ready again", 20.0)
            if point.healed is not None:
                await rig.until(lambda: point.healed(rig), "healed", 20.0)
        else:
            await rig.ready()
            await act(point.arm, ctx)
        signal.raise_signal(signal.SIGTERM)
        assert await asyncio.wait_for(main, 5.0) == 0
        if point.outcome == "stop":
            assert point.line is not None
            warnings = lines(caplog, logging.WARNING)
            assert any(point.line in w for w in warnings), warnings
        assert_no_traceback(caplog)
    finally:
        await rig.stop()


async def retried(point: Point, rig: DaemonRig, d: Daemon) -> None:
    """The agent is up, has counted the failure and (if the point says so) /readyz says it."""
    def seen() -> bool:
        if point.counter is not None and point.counter(d, rig) == 0:
            return False
        return point.line is None or point.line in (d.not_ready_reason() or "")
    await rig.until(seen, f"the failure counted and said ({point.line})", 10.0)


def test_every_netlink_call_and_registry_call_has_a_point() -> None:
    """A Netlink or Registry method with no injection point fails here."""
    from agent.registry import Registry
    from backends.kernel.types import Netlink

    def methods(proto: type) -> set[str]:
        return {n for n in vars(proto) if not n.startswith("_") and callable(getattr(proto, n))}

    wanted = ({f"netlink-{m}" for m in methods(Netlink)}
              | {f"etcd-{m}" for m in methods(Registry)})
    missing = {w for w in wanted if not any(p.id.startswith(w) for p in POINTS)}
    assert not missing, missing


async def test_a_request_line_over_the_limit_is_dropped_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_health_server("127.0.0.1", 0, lambda: None)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()
        await asyncio.sleep(0.05)  # the handler's end, and any log of it
    finally:
        server.close()
    assert_no_traceback(caplog)


@pytest.mark.parametrize(("exc", "why"), [
    (PermissionError(errno.EACCES, "Permission denied", "/run/flannel"), "Permission denied"),
    (FileExistsError(errno.EEXIST, "File exists", "/run/flannel"),
     "/run/flannel (or a folder above it) is a file, not a folder"),
    (OSError("disk full"), "disk full"),
])
def test_the_subnet_file_line_names_the_file_the_flag_and_what_to_do(
    exc: OSError, why: str,
) -> None:
    line = write_problem(Path("/run/flannel/subnet.env"), exc)
    assert line.startswith(f"--subnet-file: cannot write /run/flannel/subnet.env: {why}; ")
    assert "make that folder writable" in line and "\n" not in line


def test_the_troubleshooting_page_documents_every_outcome_line() -> None:
    """Each line a user can meet here is in docs/troubleshooting.md (its fixed part)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    for text in ("cannot read the host's interfaces and routes", "--subnet-file: cannot write",
                 "cannot write the vxlan state file", "cannot set up the new subnet",
                 "backend not programmed: ", "EnableIPv4 is false",
                 "cannot configure TUN device flannel0", "cannot open TUN device flannel0",
                 "stopping: ", "tweed_failures_total"):
        assert text in doc, text
