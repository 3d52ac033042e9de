"""Health server: `/healthz` (the process and its event loop answer), `/readyz` (the truth)
and `/metrics` (Prometheus text format), on one address (`--healthz-ip`:`--healthz-port`).

A tiny HTTP/1.0 responder on asyncio streams; it serves three fixed paths, so a web
framework would add weight and nothing else. The handler runs on the agent's own event
loop, so a blocked loop cannot answer at all (a probe times out, as it should); a
`Heartbeat` task besides measures how late the loop runs its timers, so a loop that was
just stalled, or a heartbeat that stopped, makes `/healthz` answer 503 with the reason.
`/readyz` is 200 only when the lease is held, subnet.env is written and the backend's last
sync left the kernel as desired; otherwise 503 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], str | None]  # None when ready, else the reason
Metrics = Callable[[], bytes]

#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 1.0
#: A heartbeat older than this, or a timer this late, makes /healthz fail (seconds).
STALL_LIMIT = 5.0
#: Seconds a client gets to send its request line and headers.
REQUEST_TIMEOUT = 5.0
#: generate_latest writes the classic text format; every Prometheus version reads 0.0.4
#: (newer prometheus-client versions would announce 1.0.0, unknown to older servers).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Heartbeat:
    """A task that wakes every `interval` s on the event loop and notes how late it woke."""

    def __init__(
        self, interval: float = HEARTBEAT_INTERVAL, limit: float = STALL_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.limit = limit
        self.clock = clock
        self.last = clock()
        self.lag = 0.0  # how late the last wake-up was, in seconds

    def beat(self, due: float) -> None:
        """Record a wake-up that was due at `due`."""
        self.last = self.clock()
        self.lag = max(0.0, self.last - due)

    async def run(self) -> None:
        while True:
            due = self.clock() + self.interval
            await asyncio.sleep(self.interval)
            self.beat(due)

    def problem(self) -> str | None:
        """Why the loop is not healthy, or None."""
        age = self.clock() - self.last
        if age > self.interval + self.limit:
            return f"event loop heartbeat stopped {age:.1f} s ago"
        if self.lag > self.limit:
            return f"event loop was blocked: a timer ran {self.lag:.1f} s late"
        return None


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: ReadyCheck,
    metrics: Metrics | None, heartbeat: Heartbeat | None,
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
        parts = line.decode(errors="replace").split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        ctype = "text/plain; charset=utf-8"
        if path == "/healthz":
            problem = heartbeat.problem() if heartbeat is not None else None
            status, body = ("200 OK", "ok\n") if problem is None else (
                "503 Service Unavailable", f"unhealthy: {problem}\n")
        elif path == "/readyz":
            reason = ready()
            status, body = ("200 OK", "ready\n") if reason is None else (
                "503 Service Unavailable", f"not ready: {reason}\n")
        elif path == "/metrics" and metrics is not None:
            status, body, ctype = "200 OK", metrics().decode(), METRICS_CONTENT_TYPE
        else:
            status, body = "404 Not Found", "not found\n"
        data = body.encode()
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )
        await writer.drain()
    except (TimeoutError, ConnectionError, ValueError):
        # ValueError: a request line longer than the stream's limit (64 KiB); such a
        # client gets no answer, and no traceback lands in the log.
        pass
    finally:
        writer.close()


async def start_health_server(
    host: str, port: int, ready: ReadyCheck, metrics: Metrics | None = None,
    heartbeat: Heartbeat | None = None,
) -> asyncio.Server:
    """Listen on host:port; raises OSError if the address cannot be bound."""
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, ready, metrics, heartbeat), host, port)
    log.info("health server on http://%s:%d (/healthz, /readyz, /metrics)", host, port)
    return server
