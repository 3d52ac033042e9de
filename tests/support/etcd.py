"""EtcdServer: a real etcd (Debian's etcd-server) on a free port, for one test.

Runs in the root namespace on 127.0.0.1, or inside a lab namespace on a lab address. The
data dir is a temp folder kept across `restart()` and removed by `close()`. `etcdctl`
helpers act as "another client" in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member; stop by PID only."""

    def __init__(
        self, host: str = "127.0.0.1", netns: str | None = None, port: int | None = None,
        peer_port: int | None = None,
    ) -> None:
        self.host = host
        self.netns = netns
        # Inside a fresh namespace every port is free; in the root namespace ask the kernel.
        self.port = port or (free_port(host) if netns is None else 2379)
        self.peer_port = peer_port or (free_port(host) if netns is None else 2380)
        self.dir = Path(tempfile.mkdtemp(prefix="tweed-etcd-"))
        self.proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            ETCD, "--name", "default", "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}",
        ]
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self._wrap(cmd), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited at start:\n{self.log_tail()}")
            res = subprocess.run(
                self._wrap([ETCDCTL, f"--endpoints={self.client_url}", "--dial-timeout=1s",
                            "endpoint", "health"]),
                capture_output=True, text=True, env=self._env(), check=False,
            )
            if res.returncode == 0:
                return self
            if time.monotonic() > end:
                raise RuntimeError(f"etcd did not become healthy:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "etcd.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- another client ------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, "ETCDCTL_API": "3"}

    def etcdctl(self, *args: str, input: str | None = None) -> str:
        res = subprocess.run(
            self._wrap([ETCDCTL, f"--endpoints={self.client_url}", "--command-timeout=10s",
                        *args]),
            capture_output=True, text=True, env=self._env(), input=input, timeout=30,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def put(self, key: str, value: str) -> None:
        # "--" so values starting with "-" are not taken for flags.
        self.etcdctl("put", "--", key, value)

    def put_with_lease(self, key: str, value: str, ttl: int) -> int:
        out = self.etcdctl("lease", "grant", str(ttl))
        lease = out.split()[1]  # "lease 694d... granted with TTL(60s)"
        self.etcdctl("put", f"--lease={lease}", "--", key, value)
        return int(lease, 16)

    def get(self, key: str) -> str | None:
        out = json.loads(self.etcdctl("get", key, "-w", "json"))
        kvs = out.get("kvs") or []
        return _b64(kvs[0]["value"]) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = json.loads(self.etcdctl("get", prefix, "--prefix", "-w", "json"))
        return {_b64(kv["key"]): _b64(kv.get("value", "")) for kv in out.get("kvs") or []}

    def delete(self, key: str) -> None:
        self.etcdctl("del", key)

    def revision(self) -> int:
        out = json.loads(self.etcdctl("get", "/", "--prefix", "--keys-only", "-w", "json"))
        return int(out["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.etcdctl("compaction", "--physical", str(revision))


def _b64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()
