"""Health server: `/healthz` (the process and its loop answer), `/readyz` (the truth) and
`/metrics` (Prometheus text format).

A tiny HTTP/1.0 responder on asyncio streams; it serves two fixed paths, so a web
framework would add weight and nothing else. `/readyz` is 200 only when the lease is
held, subnet.env is written and the backend's last sync left the kernel as desired;
otherwise 503 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], str | None]  # None when ready, else the reason
Metrics = Callable[[], bytes]


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: ReadyCheck,
    metrics: Metrics | None,
) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
            pass
        parts = line.decode(errors="replace").split()
        path = parts[1] if len(parts) >= 2 else ""
        if path == "/healthz":
            status, body = "200 OK", "ok\n"
        elif path == "/readyz":
            reason = ready()
            status, body = ("200 OK", "ready\n") if reason is None else (
                "503 Service Unavailable", f"not ready: {reason}\n")
        elif path == "/metrics" and metrics is not None:
            status, body = "200 OK", metrics().decode()
        else:
            status, body = "404 Not Found", "not found\n"
        data = body.encode()
        ctype = "text/plain; version=0.0.4" if path == "/metrics" else "text/plain"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_health_server(
    host: str, port: int, ready: ReadyCheck, metrics: Metrics | None = None
) -> asyncio.Server:
    """Listen on host:port; raises OSError if the address cannot be bound."""
    server = await asyncio.start_server(lambda r, w: _handle(r, w, ready, metrics), host, port)
    log.info("health server on http://%s:%d (/healthz, /readyz, /metrics)", host, port)
    return server
