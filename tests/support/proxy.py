"""TcpProxy: a loopback TCP forwarder that a test can cut, standing in for a network partition.

Owns a listening socket on 127.0.0.1:<free port>, the connections it forwards to one target,
and the thread that runs them (plain non-blocking sockets and a selector), so it keeps working
while the test's own event loop (asyncio or uvloop) runs the client in the main thread.
`cut()` resets (RST) every open connection and refuses new ones until `restore()`.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

_CHUNK = 65536
_HIGH_WATER = 1 << 20  # stop reading a side while its peer has this much unsent


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET, as on an abrupt cut."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Side:
    """One socket of a forwarded connection and the bytes waiting to be written to it."""

    __slots__ = ("conn", "connecting", "eof_in", "events", "out", "peer", "shut_out", "sock")

    def __init__(self, sock: socket.socket, conn: _Conn) -> None:
        self.sock = sock
        self.conn = conn
        self.peer: _Side = self
        self.out = bytearray()
        self.eof_in = False  # read EOF from this socket
        self.shut_out = False  # shutdown(SHUT_WR) done on this socket
        self.connecting = False
        self.events = 0


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = _Side(client, self)
        self.upstream = _Side(upstream, self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.upstream.connecting = True

    @property
    def sides(self) -> tuple[_Side, _Side]:
        return self.client, self.upstream


class TcpProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port, on a background thread.

    `accepted` counts connections accepted (also those refused while cut), `active` is the
    number being forwarded now. `cut(mode="reset")` refuses new connections with an RST at
    once; `mode="blackhole"` accepts them and never answers (like packets dropped), and
    resets them at `restore()`.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 connect_timeout: float = 5.0) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self._listener = socket.create_server((listen_host, 0), backlog=128)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self.accepted = 0
        self.refused = 0
        self._mode: str | None = None  # None (forwarding), "reset" or "blackhole"
        self._conns: set[_Conn] = set()
        self._held: list[socket.socket] = []  # blackholed connections
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._calls: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    # -- public API (any thread) -------------------------------------------------------
    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', to put in a client's endpoint URL."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def active(self) -> int:
        return len(self._conns)

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    def cut(self, mode: str = "reset") -> None:
        """Reset every open connection; refuse ("reset") or hang ("blackhole") new ones."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"mode must be 'reset' or 'blackhole', not {mode!r}")

        def do() -> None:
            self._mode = mode
            for conn in list(self._conns):
                self._close_conn(conn, abrupt=True)

        self._call(do)

    def restore(self) -> None:
        """Forward new connections again (blackholed ones are reset now)."""

        def do() -> None:
            self._mode = None
            held, self._held = self._held, []
            for sock in held:
                _reset(sock)

        self._call(do)

    def close(self) -> None:
        """Reset all connections, stop the thread, close the listener. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(timeout=10)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._sel.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._mode or "forwarding"
        return (f"<TcpProxy {self.address} -> {self.target[0]}:{self.target[1]} {state} "
                f"active={self.active} accepted={self.accepted}>")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run fn on the proxy thread and wait for it: sockets are only touched there."""
        if self._closed or not self._thread.is_alive():
            raise RuntimeError(f"TcpProxy is not running (error: {self._error!r})")
        done = threading.Event()
        self._calls.put((fn, done))
        self._wake()
        if not done.wait(timeout):
            raise RuntimeError("TcpProxy thread did not answer")

    # -- proxy thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._sel.select(timeout=0.5):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    elif key.data is None:
                        self._accept()
                    else:
                        self._io(key.data, mask)
                self._run_calls()
        except BaseException as e:  # kept for the error message of _call
            self._error = e
            raise
        finally:
            self._run_calls()
            for conn in list(self._conns):
                self._close_conn(conn, abrupt=True)
            for sock in self._held:
                _reset(sock)
            self._held.clear()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            if self._mode == "reset":
                self.refused += 1
                _reset(client)
                continue
            if self._mode == "blackhole":
                self._held.append(client)
                continue
            client.setblocking(False)
            upstream = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET,
                                     socket.SOCK_STREAM)
            upstream.setblocking(False)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS):
                _reset(client)
                upstream.close()
                continue
            conn = _Conn(client, upstream)
            self._conns.add(conn)
            self._update(conn)

    def _io(self, side: _Side, mask: int) -> None:
        conn = side.conn
        if conn not in self._conns:
            return
        try:
            if side.connecting and mask & selectors.EVENT_WRITE:
                err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect to target failed")
                side.connecting = False
            if mask & selectors.EVENT_READ and not side.eof_in:
                data = side.sock.recv(_CHUNK)
                if data:
                    side.peer.out += data
                else:
                    side.eof_in = True
            if mask & selectors.EVENT_WRITE and side.out and not side.connecting:
                sent = side.sock.send(side.out)
                del side.out[:sent]
            for s in conn.sides:
                # Pass a half-close on once everything before it has been written.
                if s.peer.eof_in and not s.out and not s.shut_out and not s.connecting:
                    s.sock.shutdown(socket.SHUT_WR)
                    s.shut_out = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # A reset or failure on one side is passed on as a reset of the other.
            self._close_conn(conn, abrupt=True)
            return
        if all(s.eof_in and s.shut_out for s in conn.sides):
            self._close_conn(conn, abrupt=False)
        else:
            self._update(conn)

    def _update(self, conn: _Conn) -> None:
        for s in conn.sides:
            want = 0
            if not s.eof_in and len(s.peer.out) < _HIGH_WATER and not s.connecting:
                want |= selectors.EVENT_READ
            if s.out or s.connecting:
                want |= selectors.EVENT_WRITE
            if want == s.events:
                continue
            if s.events == 0:
                self._sel.register(s.sock, want, s)
            elif want == 0:
                self._sel.unregister(s.sock)
            else:
                self._sel.modify(s.sock, want, s)
            s.events = want

    def _close_conn(self, conn: _Conn, abrupt: bool) -> None:
        self._conns.discard(conn)
        for s in conn.sides:
            if s.events:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(s.sock)
                s.events = 0
            if abrupt:
                _reset(s.sock)
            else:
                with contextlib.suppress(OSError):
                    s.sock.close()
