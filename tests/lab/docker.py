"""A real dockerd per lab host namespace, and everything it leaves behind removed again.

Owns the Docker side of the lab: a busybox image made without a registry (`docker import`
of a tar holding bin/busybox from busybox-static and its applet links), dockerd started with
`nsenter --net=/var/run/netns/<host>` (not `ip netns exec`: that remounts /sys and dockerd
then misses the cgroup mounts) with every path of its own in a temp folder, containers, and
the teardown: containers removed, dockerd stopped by its PID (it stops its containerd), then
a safety net for a run that went wrong: leftover processes of this dockerd (found by its
unique exec-root in their command line, or recorded container PIDs) killed by PID, mounts
under its folders unmounted, its cgroup folders removed, and the few files dockerd and the
containerd shim create outside their folders (/etc/docker/key.json, /run/containerd/s)
removed when they did not exist before.

dockerd runs with --iptables=false and the vfs storage driver (no overlay mounts), so it
changes nothing in the root namespace; the test checks that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.support.wait import wait_for

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's CLI (a different `docker` may come first in PATH)
IMAGE = "tweed-lab-busybox:latest"
# Files dockerd/containerd create outside the folders we give them.
OUTSIDE = (Path("/etc/docker/key.json"), Path("/run/containerd/s"), Path("/run/containerd"))


def require_packages() -> None:
    """Fail (not skip) with the fix when docker.io or busybox-static is missing."""
    missing = [p for p in ("docker.io", "busybox-static") if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
        check=False).stdout != "install ok installed"]
    if missing:
        raise AssertionError(f"Debian packages missing: {' '.join(missing)} "
                             "(make packages installs them)")
    for path in (DOCKERD, DOCKER):
        if not os.access(path, os.X_OK):
            raise AssertionError(f"{path} missing although docker.io is installed")


def busybox_path() -> Path:
    out = subprocess.run(["dpkg-query", "-L", "busybox-static"], capture_output=True,
                         text=True, check=True).stdout.split()
    path = next(Path(p) for p in out if p.endswith("/bin/busybox"))
    return path.resolve()


def build_image_tar(dest: Path) -> Path:
    """A root file system tar: /bin/busybox (static) and a symlink per applet."""
    busybox = busybox_path()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    tar_path = dest / "busybox-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for folder in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for name in applets:
            if name == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return tar_path


class Dockerd:
    """One dockerd in a host's network namespace; `close()` undoes all of it."""

    def __init__(self, host: Any, root: Path, options: list[str], cgroup_parent: str) -> None:
        self.host = host
        self.root = root
        self.data = root / "d"
        self.exec_root = root / "e"
        self.sock = root / "docker.sock"
        self.log_path = root / "dockerd.log"
        self.cgroup_parent = cgroup_parent
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None
        self.container_pids: list[int] = []
        self.container_ids: list[str] = []
        self.containers: list[str] = []

    # -- running -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Dockerd:
        self.data.mkdir(parents=True)
        self.exec_root.mkdir(parents=True)
        config = self.root / "daemon.json"
        # The trust key goes to /etc/docker unless told otherwise.
        config.write_text(json.dumps({"deprecated-key-path": str(self.root / "key.json")}))
        cmd = [
            "nsenter", f"--net=/var/run/netns/{self.host.ns}", DOCKERD,
            "--config-file", str(config), "--data-root", str(self.data),
            "--exec-root", str(self.exec_root), "-p", str(self.root / "docker.pid"),
            "-H", f"unix://{self.sock}", "--iptables=false", "--storage-driver=vfs",
            f"--cgroup-parent={self.cgroup_parent}", *self.options,
        ]
        with open(self.log_path, "ab") as log:
            # nsenter execs dockerd: the PID is dockerd's own.
            self.proc = proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dockerd on {self.host.ns} exited "
                                     f"{proc.returncode}:\n{self.log()[-3000:]}")
            return self.sock.exists() and self.docker("version", check=False).returncode == 0

        wait_for(up, timeout, step=0.2, what=f"dockerd on {self.host.ns} up",
                 detail=lambda: self.log()[-3000:])
        return self

    def docker(self, *args: str, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "DOCKER_CONFIG": str(self.root / "cli")}  # no ~/.docker
        res = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], capture_output=True,
                             text=True, timeout=timeout, env=env, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} on {self.host.ns}: exit "
                                 f"{res.returncode}\n{res.stderr}")
        return res

    def import_image(self, tar_path: Path) -> None:
        self.docker("import", str(tar_path), IMAGE)

    def run_container(self, name: str) -> dict[str, Any]:
        """A detached busybox container on the default bridge; its `docker inspect`."""
        self.containers.append(name)
        self.docker("run", "-d", "--name", name, IMAGE, "/bin/sleep", "3600")
        info = json.loads(self.docker("inspect", name).stdout)[0]
        self.container_ids.append(info["Id"])
        if info["State"]["Pid"]:
            self.container_pids.append(int(info["State"]["Pid"]))
        return info

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> tuple[list[str], list[str]]:
        """Remove everything. Returns (what had to be forced, what could not be removed);
        both are empty after a clean stop."""
        forced: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            for name in self.containers:
                with contextlib.suppress(Exception):
                    self.docker("rm", "-f", name, check=False, timeout=30)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                forced.append(f"dockerd {self.proc.pid} killed")
                self.proc.kill()
                self.proc.wait(timeout=10)
        # A recorded container PID counts only while it is still in our cgroup: after the
        # container ended, the number may belong to someone else.
        stray = [pid for pid in self.container_pids if self._in_our_cgroup(pid)]
        for pid in [*stray, *self._own_processes()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                forced.append(f"process {pid} killed")
        forced += self._unmount()
        forced += self._remove_shim_sockets()
        left = self._remove_cgroups()
        return forced, left

    def _remove_shim_sockets(self) -> list[str]:
        """A killed containerd shim leaves its socket in /run/containerd/s, named (in
        containerd 1.6) sha256("<containerd address>/moby/<container id>")."""
        address = self.exec_root / "containerd" / "containerd.sock"
        removed = []
        for cid in self.container_ids:
            name = hashlib.sha256(f"{address}/moby/{cid}".encode()).hexdigest()
            path = Path("/run/containerd/s") / name
            if path.is_socket():
                path.unlink()
                removed.append(f"removed {path}")
        return removed

    def _in_our_cgroup(self, pid: int) -> bool:
        try:
            return f"/{self.cgroup_parent}/" in Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False

    def _own_processes(self) -> list[int]:
        """PIDs whose command line names our exec-root or data-root (containerd, shims)."""
        marks = (str(self.exec_root).encode(), str(self.data).encode())
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(m in cmdline for m in marks):
                pids.append(int(entry.name))
        return pids

    def _unmount(self) -> list[str]:
        root = str(self.root) + "/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(root):
                points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        return [f"unmounted {p}" for p in points]

    def _remove_cgroups(self) -> list[str]:
        """dockerd/runc make <hierarchy>/<cgroup_parent> in every cgroup hierarchy; they
        stay (empty) after the containers are gone."""
        left = []
        for top in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}"):
            for folder, _, _ in os.walk(top, topdown=False):  # deepest first
                try:
                    os.rmdir(folder)
                except OSError as exc:
                    left.append(f"cgroup {folder}: {exc.strerror}")
        direct = Path("/sys/fs/cgroup") / self.cgroup_parent
        if direct.is_dir():
            with contextlib.suppress(OSError):
                direct.rmdir()
        return left


class DockerLab:
    """The dockerds of one test; `close()` stops them all and restores OUTSIDE."""

    def __init__(self, base: Path, prefix: str) -> None:
        require_packages()
        self.base = base
        self.prefix = prefix
        self.daemons: list[Dockerd] = []
        self.existed = {p: p.exists() for p in OUTSIDE}
        self._image: Path | None = None

    def image_tar(self) -> Path:
        if self._image is None:
            self._image = build_image_tar(self.base)
        return self._image

    def start(self, host: Any, options: list[str]) -> Dockerd:
        # Unix socket paths are short (108 bytes): base is a short folder under /tmp.
        daemon = Dockerd(host, self.base / host.ns, options,
                         cgroup_parent=f"{self.prefix}docker-{host.ns}")
        self.daemons.append(daemon)
        daemon.start()
        daemon.import_image(self.image_tar())
        return daemon

    def close(self) -> tuple[list[str], list[str]]:
        """Stop and remove everything: (what had to be forced, what is left over)."""
        forced: list[str] = []
        left: list[str] = []
        for daemon in self.daemons:
            try:
                f, lft = daemon.close()
                forced += f
                left += lft
            except Exception as exc:
                left.append(f"closing dockerd on {daemon.host.ns}: {exc!r}")
        for path in OUTSIDE:  # in order: the file, then the folders, deepest first
            if self.existed[path] or not path.exists():
                continue
            try:
                if path.is_dir():
                    path.rmdir()  # only when empty: never someone else's
                else:
                    path.unlink()
            except OSError as exc:
                left.append(f"{path}: {exc.strerror}")
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            left.append(f"{self.base} not removed")
        return forced, left
