"""EtcdServer: one real etcd (Debian's etcd-server, /usr/bin/etcd) for one test.

Owns the etcd process, its temp data dir and its log. It runs on 127.0.0.1 in the root
namespace, or inside a lab namespace on a lab address, IPv4 or IPv6 (`ip netns exec NS
etcd ...`; ip execs, so the Popen PID is etcd itself). Ports are free ones, kept across
`restart()`; the data dir too, until `close()` removes it. The `etcdctl` helpers (class
`Etcdctl`, usable alone for any endpoint, e.g. a proxy) act as "another client" in tests.
With `tls=ServerTls(...)` etcd serves its clients over https (and, given a trusted CA,
demands a client certificate from it); `Etcdctl` then speaks TLS with `ClientTls` files and
logs in with `user` ("name:password") once auth is enabled.
Processes are stopped by their PID only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.wait import poll

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"

# Asks the kernel for free ports (preferring the given ones), run where etcd will listen.
_FREE_PORTS = """
import socket, sys
host, want = sys.argv[1], [int(p) for p in sys.argv[2:]]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
held, out = [], []
for p in want:
    s = socket.socket(family)
    try:
        s.bind((host, p))
    except OSError:
        s.close()
        s = socket.socket(family)
        s.bind((host, 0))
    held.append(s)
    out.append(s.getsockname()[1])
print(*out)
"""


def free_ports(host: str = "127.0.0.1", netns: str | None = None,
               prefer: tuple[int, ...] = (0, 0)) -> list[int]:
    """Distinct ports free on `host` (in `netns` if given); 0 in `prefer` means any."""
    if netns is None:
        held: list[socket.socket] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            for port in prefer:
                s = socket.socket(family)
                held.append(s)
                try:
                    s.bind((host, port))
                except OSError:
                    s.bind((host, 0))
            return [s.getsockname()[1] for s in held]
        finally:
            for s in held:
                s.close()
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", _FREE_PORTS, host,
           *map(str, prefer)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return [int(p) for p in out.split()]


def _clean_env() -> dict[str, str]:
    """The environment without ETCD_*/ETCDCTL_* settings that would override our flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}


@dataclass(frozen=True)
class ClientTls:
    """What etcdctl needs to speak TLS: the CA that signed the server's certificate and,
    for a server that demands one, a client certificate and its key."""

    cacert: Path
    cert: Path | None = None
    key: Path | None = None

    def args(self) -> list[str]:
        out = [f"--cacert={self.cacert}"]
        if self.cert is not None and self.key is not None:
            out += [f"--cert={self.cert}", f"--key={self.key}"]
        return out


@dataclass(frozen=True)
class ServerTls:
    """etcd's client-side TLS: its certificate and key and, if given, the CA whose client
    certificates it accepts (--client-cert-auth: no valid client certificate, no access)."""

    cert: Path
    key: Path
    trusted_ca: Path | None = None

    def args(self) -> list[str]:
        out = ["--cert-file", str(self.cert), "--key-file", str(self.key)]
        if self.trusted_ca is not None:
            out += ["--trusted-ca-file", str(self.trusted_ca), "--client-cert-auth"]
        return out


class Etcdctl:
    """`etcdctl` (API v3) against one endpoint, run in `netns` if given: "another client".

    `tls` makes it speak TLS; `user` ("name:password") makes it log in (etcd with auth).
    """

    netns: str | None

    def __init__(self, client_url: str, netns: str | None = None,
                 tls: ClientTls | None = None, user: str | None = None) -> None:
        self._client_url = client_url
        self.netns = netns
        self.tls = tls
        self.user = user

    def _conn_args(self) -> list[str]:
        out = self.tls.args() if self.tls is not None else []
        if self.user:
            out.append(f"--user={self.user}")
        return out

    @property
    def client_url(self) -> str:
        return self._client_url

    def _wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    @staticmethod
    def _ctl_env() -> dict[str, str]:
        return {**_clean_env(), "ETCDCTL_API": "3"}

    def etcdctl(self, *args: str, input: str | None = None, command_timeout: float = 10.0,
                timeout: float = 30.0) -> str:
        """Run `etcdctl --endpoints=<client_url> ARGS` (in the netns if any); stdout.

        `command_timeout` is etcdctl's own (an unreachable etcd fails after it), `timeout`
        the hard limit on the process. Raises RuntimeError with etcdctl's stderr on failure.
        """
        cmd = self._wrap([ETCDCTL, f"--endpoints={self.client_url}", "--dial-timeout=2s",
                          f"--command-timeout={command_timeout}s", *self._conn_args(), *args])
        res = subprocess.run(cmd, capture_output=True, text=True, env=self._ctl_env(),
                             input=input, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"etcdctl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}"
            )
        return res.stdout

    def put(self, key: str, value: str) -> None:
        # "--" so that values (or keys) starting with "-" are not taken for flags.
        self.etcdctl("put", "--", key, value)

    def put_with_lease(self, key: str, value: str, ttl: int) -> int:
        """Grant a lease of `ttl` s, put key with it; returns the lease ID."""
        lease_id = int(json.loads(self.etcdctl("lease", "grant", str(ttl), "-w", "json"))["ID"])
        self.etcdctl("put", f"--lease={lease_id:x}", "--", key, value)
        return lease_id

    def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL in seconds of a lease (-1 when it has expired or was revoked)."""
        out = json.loads(self.etcdctl("lease", "timetolive", f"{lease_id:x}", "-w", "json"))
        return int(out["ttl"])

    def get(self, key: str) -> str | None:
        out = json.loads(self.etcdctl("get", "-w", "json", "--", key))
        kvs = out.get("kvs") or []
        return _b64(kvs[0].get("value", "")) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = json.loads(self.etcdctl("get", "--prefix", "-w", "json", "--", prefix))
        return {_b64(kv["key"]): _b64(kv.get("value", "")) for kv in out.get("kvs") or []}

    def delete(self, key: str) -> None:
        self.etcdctl("del", "--", key)

    def revision(self) -> int:
        """The store's current revision."""
        out = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        return int(out[0]["Status"]["header"]["revision"])

    def compact(self, revision: int) -> None:
        """Compact history up to `revision` (physically, so watches from before fail)."""
        self.etcdctl("compaction", "--physical", str(revision))


class EtcdServer(Etcdctl):
    """One single-member etcd cluster; `start()` returns self once it answers.

    `tls` serves clients over https (`ctl_tls`: the files this object's own etcdctl uses);
    `extra_args` go to etcd as they are (e.g. `--auth-token-ttl 2`).
    """

    def __init__(self, host: str = "127.0.0.1", netns: str | None = None,
                 port: int | None = None, peer_port: int | None = None,
                 name: str = "default", tls: ServerTls | None = None,
                 ctl_tls: ClientTls | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.name = name
        self.server_tls = tls
        self.extra_args = extra_args
        self._auto_ports = port is None and peer_port is None
        if port is None or peer_port is None:
            # In a fresh lab namespace the usual ports are free; keep them for readable logs.
            prefer = (2379, 2380) if netns else (0, 0)
            auto = free_ports(host, netns, prefer)
            port = port or auto[0]
            peer_port = peer_port or auto[1]
        self.port: int = port
        self.peer_port: int = peer_port
        super().__init__(self.client_url, netns, ctl_tls)
        self.dir = Path(tempfile.mkdtemp(prefix="tweed-etcd-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._ever_started = False
        self._log_offset = 0

    # -- addresses -------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.server_tls is not None else "http"

    @property
    def url_host(self) -> str:
        """The host as it goes in a URL: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.url_host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.url_host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life cycle ------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start etcd (keeping data dir and ports) and wait until it serves a request."""
        if self._closed:
            raise RuntimeError("EtcdServer is closed")
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._spawn()
                self._wait_healthy(timeout)
                self._ever_started = True
                return self
            except _PortTaken:
                # Another process took an auto-picked port between probe and bind: re-pick,
                # but only before the first successful start (restart keeps the ports).
                if not self._auto_ports or self._ever_started or attempt == 2:
                    raise
                self.port, self.peer_port = free_ports(self.host, self.netns)
                shutil.rmtree(self.data_dir, ignore_errors=True)
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        cmd = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            # One member, no peers to lose: short timeouts make (re)starts quick.
            "--heartbeat-interval", "50",
            "--election-timeout", "300",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *(self.server_tls.args() if self.server_tls is not None else []),
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== start {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self._wrap(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_clean_env(),
            )

    def _wait_healthy(self, timeout: float) -> None:
        proc = self.proc
        assert proc is not None
        why = "port not open"  # the last reason it was not healthy, for the error

        def healthy() -> bool:
            nonlocal why
            if proc.poll() is not None:
                tail = self.log_tail()
                self.proc = None
                msg = f"etcd exited during start ({self.client_url}); log tail:\n{tail}"
                if "address already in use" in self._log_since_start():
                    raise _PortTaken(msg)
                raise RuntimeError(msg)
            if self.netns is None and not _listening(self.host, self.port):
                why = "port not open"
                return False
            res = subprocess.run(
                self._wrap([ETCDCTL, f"--endpoints={self.client_url}",
                            "--dial-timeout=500ms", "--command-timeout=2s",
                            *self._conn_args(), "endpoint", "health"]),
                capture_output=True, text=True, env=self._ctl_env(), check=False,
                timeout=10,
            )
            why = res.stderr.strip()
            return res.returncode == 0

        if not poll(healthy, timeout, step=0.05):
            self.stop()
            raise RuntimeError(
                f"etcd at {self.client_url} not healthy within {timeout} s "
                f"({why}); log tail:\n{self.log_tail()}"
            )

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM etcd by its PID, wait; SIGKILL if it does not exit in `timeout` s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL by PID: a crash, no clean shutdown."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, timeout: float = 20.0) -> EtcdServer:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop etcd and remove the temp dir (data and log). Idempotent."""
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<EtcdServer {self.client_url}{where} pid={self.pid}>"


def _listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (root namespace only)."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


class _PortTaken(RuntimeError):
    """etcd could not bind one of its ports."""


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()
