"""Small files replaced atomically: write a temporary file, fsync it, rename it over.

Invariant: a reader (or a crash, power loss included) sees either the whole
old file or the whole new one, never an empty or partial file. That is the
gocryptfs failure encfs avoids for its per-directory and config files.
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | bytes | Path


def write_atomic(path: PathLike, data: bytes, mode: int = 0o600, *, sync_dir: bool = False) -> None:
    """Replace ``path`` with ``data``; with ``sync_dir`` also make the rename durable."""
    target = os.fsencode(path)
    tmp = target + b".tmp.%d" % os.getpid()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        dfd = os.open(os.path.dirname(target) or b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
