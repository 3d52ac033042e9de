"""Unit tests for agent.health: the three paths over a real socket on 127.0.0.1, and
/healthz telling the truth about the event loop (a stalled loop, a stopped heartbeat)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest

from agent.health import Heartbeat, start_health_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path (blocking)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


class Server:
    def __init__(self, port: int, heartbeat: Heartbeat) -> None:
        self.port = port
        self.heartbeat = heartbeat
        self.reason: str | None = "no subnet lease yet"

    async def get(self, path: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(get, self.port, path)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    hb = Heartbeat(interval=0.05, limit=0.3)
    state: dict[str, Server] = {}
    srv = await start_health_server(
        "127.0.0.1", 0, lambda: state["s"].reason, lambda: b"tweed_ready 0\n", hb)
    port = srv.sockets[0].getsockname()[1]
    state["s"] = s = Server(port, hb)
    beat = asyncio.create_task(hb.run())
    try:
        yield s
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        srv.close()
        await srv.wait_closed()


def test_heartbeat_judges_age_and_lateness() -> None:
    clock = Clock()
    hb = Heartbeat(interval=1.0, limit=5.0, clock=clock)
    assert hb.problem() is None
    clock.now += 1.0
    hb.beat(due=clock.now - 0.01)
    assert hb.problem() is None and hb.lag == pytest.approx(0.01)
    # A timer due 7 s ago ran only now: the loop was blocked.
    clock.now += 8.0
    hb.beat(due=clock.now - 7.0)
    assert "blocked" in (hb.problem() or "")
    clock.now += 1.0
    hb.beat(due=clock.now)
    assert hb.problem() is None
    # No beat for longer than interval + limit: the heartbeat has stopped.
    clock.now += 6.5
    assert "stopped" in (hb.problem() or "")


async def test_paths(server: Server) -> None:
    status, ctype, body = await server.get("/healthz")
    assert (status, body) == (200, "ok\n")
    assert ctype.startswith("text/plain")
    assert await server.get("/readyz") == (503, "text/plain; charset=utf-8",
                                           "not ready: no subnet lease yet\n")
    server.reason = None
    assert (await server.get("/readyz"))[::2] == (200, "ready\n")
    status, ctype, body = await server.get("/metrics")
    assert (status, body) == (200, "tweed_ready 0\n")
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    assert (await server.get("/nope"))[0] == 404
    assert (await server.get("/healthz?verbose=1"))[0] == 200


async def test_healthz_fails_after_the_loop_was_blocked_then_recovers(server: Server) -> None:
    await asyncio.sleep(0.2)  # a few beats
    assert (await server.get("/healthz"))[0] == 200
    result: dict[str, tuple[int, str, str]] = {}
    asked = threading.Event()

    def probe() -> None:
        asked.set()
        result["r"] = get(server.port, "/healthz", timeout=10)

    t = threading.Thread(target=probe)
    t.start()
    asked.wait(5)
    time.sleep(1.0)  # noqa: ASYNC251 - blocks the event loop, as a stuck callback would
    await asyncio.to_thread(t.join, 10)
    status, _, body = result["r"]
    # The request waited in the socket's backlog; answered once the loop ran again, it
    # says what happened instead of "ok".
    assert status == 503, body
    assert "event loop" in body
    # One beat later the loop is judged healthy again.
    await asyncio.sleep(0.2)
    assert (await server.get("/healthz"))[:3:2] == (200, "ok\n")


async def test_healthz_fails_when_the_heartbeat_stops(server: Server) -> None:
    hb = Heartbeat(interval=0.05, limit=0.1)
    srv = await start_health_server("127.0.0.1", 0, lambda: None, None, hb)
    port = srv.sockets[0].getsockname()[1]
    try:
        task = asyncio.create_task(hb.run())
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        task.cancel()
        await asyncio.sleep(0.3)
        status, _, body = await asyncio.to_thread(get, port, "/healthz")
        assert status == 503 and "heartbeat stopped" in body
        # No metrics callable: /metrics is not served.
        assert (await asyncio.to_thread(get, port, "/metrics"))[0] == 404
    finally:
        srv.close()
        await srv.wait_closed()
