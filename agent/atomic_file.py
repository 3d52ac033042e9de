"""atomic_write: replace a file so that readers see the old or the new content, never a mix.

Used for subnet.env, the vxlan VtepMAC state file and `tweed docker-opts` output;
`check_writable` finds out at start whether such a file could be written in a folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Write a file so readers see the old or the new content, never a mix: temp file in
    the same folder, fsync, chmod, rename, fsync the folder. Creates the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # fsync the folder so the rename itself survives a crash.
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_writable(folder: Path) -> None:
    """Raise OSError now if atomic_write could not write in `folder` later: the folder is
    created if missing, and a temp file made and removed in it (as root, permission bits
    alone would not tell)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tweed-check.", dir=folder)
    os.close(fd)
    os.unlink(tmp)
