"""systemd's notify protocol: READY=1, STATUS=, STOPPING=1, WATCHDOG=1, EXTEND_TIMEOUT_USEC=.

Owns the datagram socket to the service manager ($NOTIFY_SOCKET: a path, or an abstract
socket written with a leading '@') and `report`, the task that tells systemd the daemon's
state. Nothing is sent, and no socket is opened, when NOTIFY_SOCKET is unset. A failed send
is logged once and otherwise ignored: systemd being away must never stop the agent.

`report` samples the daemon's state every POLL seconds instead of being called from each
place that changes it: the state lives in several objects (config waiter, lease manager,
backend), and one cheap sample keeps daemon.py free of notify calls. Because the pings
come from a task on the event loop, a blocked loop sends no WATCHDOG=1 and systemd
restarts the agent, which is what the watchdog is for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from agent.state import AgentState

log = logging.getLogger("tweed.sd_notify")

#: Seconds between two samples of the daemon's state.
POLL = 0.25
#: While not yet ready, ask systemd every EXTEND_EVERY s to extend the start timeout by
#: EXTEND_BY s: a live agent waiting for etcd or its config is not a hung start, while one
#: whose loop is stuck stops extending and runs into TimeoutStartSec.
EXTEND_EVERY = 5.0
EXTEND_BY = 20.0
#: systemd reads at most this many bytes of one message; longer STATUS text is cut.
STATUS_MAX = 1024


def socket_address(value: str | None) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value: a path stays a path, '@name' is the
    abstract name (a leading NUL byte); None when unset, empty or of another kind (vsock)."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd set
    no watchdog for this process (unset, not a positive integer, or WATCHDOG_PID names
    another process). Defaults: os.environ and our own PID."""
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    usec = environ.get("WATCHDOG_USEC", "")
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return value / 2 / 1_000_000


class Notifier:
    """Sends notify messages to one socket; does nothing when there is none."""

    def __init__(self, value: str | None) -> None:
        self.value = value
        self.address = socket_address(value)
        if value and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; "
                        "systemd will not hear from tweed", value)
        self._sock: socket.socket | None = None
        self._failed: set[int | None] = set()  # errnos already logged

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE fields as one datagram; True if the kernel took it."""
        if self.address is None or not fields:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                # Non-blocking: a service manager that does not read must not stall the
                # event loop; the message is dropped instead. Not connected, so a systemd
                # that re-executes itself (and re-creates the socket) is reached again.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if exc.errno not in self._failed:
                self._failed.add(exc.errno)
                log.warning("cannot notify systemd at %s: %s", self.value,
                            exc.strerror or exc)
            return False
        return True

    def status(self, text: str, *more: str) -> bool:
        """STATUS=text (newlines folded, cut to STATUS_MAX bytes), plus `more` fields."""
        flat = " ".join(text.split("\n"))
        cut = flat.encode()[:STATUS_MAX].decode(errors="ignore")
        return self.send(*more, f"STATUS={cut}")

    def stopping(self, text: str) -> bool:
        return self.status(text, "STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def daemon_status(daemon: AgentState) -> tuple[bool, str]:
    """(ready, STATUS text) of the agent: ready is not_ready_reason() is None."""
    reason = daemon.not_ready_reason()
    if reason is not None:
        return False, f"not ready: {reason}"
    manager, config = daemon.manager, daemon.config
    # Ready means a config is running and a lease is held.
    assert manager is not None and manager.lease is not None and config is not None
    parts = [f"ready: subnet {manager.lease.describe()}, backend {config.backend_type}"]
    if not manager.etcd_reachable:
        parts.append("etcd unreachable, retrying (data path unaffected)")
    if daemon.config_state != "running":
        parts.append(f"network config in etcd {daemon.config_state}, running on the old one")
    return True, "; ".join(parts)


async def report(
    notifier: Notifier,
    state: Callable[[], tuple[bool, str]],
    watchdog: float | None = None,
    poll: float = POLL,
) -> None:
    """Until cancelled: STATUS= whenever state()'s text changes, READY=1 with the first
    ready state, EXTEND_TIMEOUT_USEC= before that, WATCHDOG=1 every `watchdog` s. Returns
    at once when the notifier has no socket."""
    if not notifier.enabled:
        return
    log.debug("notifying systemd at %s (watchdog ping every %s s)", notifier.value, watchdog)
    loop = asyncio.get_running_loop()
    last: str | None = None
    ready_sent = False
    next_ping = next_extend = loop.time()
    broken = False
    while True:
        now = loop.time()
        try:
            ready, text = state()
            broken = False
        except Exception:
            # A bug in the sample must not stop the watchdog pings; it is logged once.
            if not broken:
                log.exception("reading the daemon state for systemd failed")
            broken = True
            ready, text = ready_sent, last or "state unknown"
        if ready and not ready_sent:
            notifier.status(text, "READY=1")
            ready_sent = True
            last = text
        elif text != last:
            notifier.status(text)
            last = text
        if not ready_sent and now >= next_extend:
            notifier.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1_000_000)}")
            next_extend = now + EXTEND_EVERY
        if watchdog is not None and now >= next_ping:
            notifier.watchdog()
            next_ping = now + watchdog
        wait = poll if watchdog is None else min(poll, max(0.0, next_ping - loop.time()))
        await asyncio.sleep(wait)
