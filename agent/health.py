"""Health server: `/healthz` (the process and its loop answer) and `/readyz` (the truth).

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


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: ReadyCheck
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
        else:
            status, body = "404 Not Found", "not found\n"
        data = body.encode()
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_health_server(host: str, port: int, ready: ReadyCheck) -> asyncio.Server:
    """Listen on host:port; raises OSError if the address cannot be bound."""
    server = await asyncio.start_server(lambda r, w: _handle(r, w, ready), host, port)
    log.info("health server on http://%s:%d (/healthz, /readyz)", host, port)
    return server
