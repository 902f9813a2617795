"""File locks: an exclusive lock file for the writers of a state file or directory, re-entrant
per thread (WriterLock), and an flock taken on a file that must still be the one its path names
(lock_still_named).

Invariants:
- A WriterLock is ``flock(LOCK_EX)`` on its own file (created 0600 in a 0700 directory if
  missing), or with ``posix`` a POSIX record lock (``lockf``) on it, which a forked child does not
  inherit; held for the block and released when the block ends, whatever happens in it.
- A thread that holds it already does not take it again: a second flock of the same process, on
  another descriptor, would wait for the first forever (a restore inside a transaction, a purge
  inside a write), and closing a second descriptor would drop a POSIX lock.
- A WriterLock that cannot be taken is a one-line StateError naming what it guards.
- lock_still_named answers for a file only once it holds the file's lock and has seen that the path
  still names that file (same st_dev and st_ino): a file removed or replaced between the open and
  the lock is never taken for the one at the path.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from encfs.errors import StateError


class WriterLock:
    def __init__(self, path: Path, what: str, *, posix: bool = False) -> None:
        """``what`` names what the lock guards, for the error ("key metadata", "the secrets directory ...").
        ``posix``: a POSIX lock, for a lock a forked child must not keep; it excludes other processes
        only, not the other threads of this one."""
        self.path = path
        self.what = what
        self.posix = posix
        self._held = threading.local()

    @contextmanager
    def held(self) -> Iterator[None]:
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"cannot lock {self.what} ({self.path}): {e.strerror}") from None
        try:
            (fcntl.lockf if self.posix else fcntl.flock)(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)


def lock_still_named(fd: int, path: str | bytes | Path, *, follow_symlinks: bool = True) -> os.stat_result | None:
    """Take the exclusive flock of ``fd`` without waiting, then check that ``path`` still names the
    file locked (another process may have removed or replaced it since the caller opened it). The
    file's fstat if so; None if another holds its lock or ``path`` names another file now. OSError
    of the stat of ``path`` (FileNotFoundError: nothing is named so now) escapes. A lock taken is
    released with ``fd`` (the caller closes it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    st, now = os.fstat(fd), os.stat(path, follow_symlinks=follow_symlinks)
    return st if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino) else None
