"""Small files replaced atomically: write a temporary file, fsync it, rename it over.

Invariant: a reader (or a crash, power loss included) sees either the whole
old file or the whole new one, never an empty or partial file. That is the
gocryptfs failure encfs avoids for its per-directory and config files. A write
that the disk cannot take (ENOSPC) raises and leaves the old file in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from encfs.diskio import fsync_dir, pwrite_all

PathLike = str | bytes | Path


def write_atomic(path: PathLike, data: bytes, mode: int = 0o600, *, sync_dir: bool = False,
                 tmp_dir: PathLike | None = None, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data``; with ``sync_dir`` also make the rename durable. The
    temporary file is ``path``.tmp.<pid>, or in ``tmp_dir`` (same filesystem) if given.
    With ``dir_fd``, ``path`` is a name in that directory (backingdirs.py's *at() calls)."""
    if dir_fd is not None and (sync_dir or tmp_dir is not None):
        raise ValueError("dir_fd takes neither sync_dir nor tmp_dir")
    target = os.fsencode(path)
    tmp = target + b".tmp.%d" % os.getpid()
    if tmp_dir is not None:
        tmp = os.path.join(os.fsencode(tmp_dir), os.path.basename(tmp))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(target) or b".")


def remove_dead_temporaries(path: Path, *more: Path, locked: bool = False) -> None:
    """Remove the temporary files (``.tmp.PID``) of ``path`` and ``more`` (files of the same
    directory, which is listed once) whose process is gone: a writer killed between its write and
    its rename leaves one. Call it where only one writer runs (under the files' lock); another
    user's process counts as alive. ``locked``: every writer of these files holds a lock that the
    caller holds now, so the temporary of any other process is stale, even if its pid is alive (a
    pid is reused); then only regular files are removed (a name matched by a directory or symlink
    is not one of its writers'). OSError (but ENOENT) escapes, naming the temporary."""
    if any(p.parent != path.parent for p in more):
        raise ValueError("remove_dead_temporaries lists one directory: every path must be in it")
    prefixes = {f"{p.name}.tmp" for p in (path, *more)}
    for tmp in path.parent.glob("*.tmp.*"):
        prefix, _, pid = tmp.name.rpartition(".")
        if not (prefix in prefixes and pid.isdigit()):
            continue
        if locked:
            stale = int(pid) != os.getpid() and tmp.is_file() and not tmp.is_symlink()
        else:
            stale = not _alive(int(pid))
        if stale:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True
