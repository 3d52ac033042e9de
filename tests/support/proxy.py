"""TcpProxy: a loopback TCP forwarder the test can cut, standing in for a network partition.

Runs on its own thread (plain sockets and a selector), so it keeps working while the
test's own event loop runs the client. `cut()` resets every open connection and resets
new ones at once until `restore()`.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST: an abrupt cut, like a partition
    # noticed by the peer.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._cut = False
        self._stop = False
        self.accepted = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wake(self) -> None:
        self._wake_w.send(b"x")

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            socks = list(self._pairs)
            self._pairs.clear()
        self._wake()
        for s in socks:
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=5)
        for s in list(self._pairs):
            _reset(s)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._pairs.pop(sock, None)
            if other is not None:
                self._pairs.pop(other, None)
        for s in (sock, other):
            if s is None:
                continue
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(timeout=0.2):
                sock = key.fileobj
                if key.data == "wake":
                    self._wake_r.recv(4096)
                    continue
                if sock is self._listener:
                    self._accept()
                    continue
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                with self._lock:
                    other = self._pairs.get(sock)  # type: ignore[arg-type]
                if other is None:
                    continue
                if not data:
                    self._drop(sock)  # type: ignore[arg-type]
                    continue
                try:
                    other.sendall(data)
                except OSError:
                    self._drop(sock)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self._cut:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            _reset(client)
            return
        client.setblocking(True)
        upstream.setblocking(True)
        client.settimeout(5)
        upstream.settimeout(5)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
        self._sel.register(client, selectors.EVENT_READ, None)
        self._sel.register(upstream, selectors.EVENT_READ, None)
