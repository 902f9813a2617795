"""An exclusive lock file for the writers of a state file or directory, re-entrant per thread.

Invariants:
- The lock is ``flock(LOCK_EX)`` on its own file (created 0600 in a 0700 directory if missing),
  held for the block and released when the block ends, whatever happens in it.
- A thread that holds it already does not take it again: a second flock of the same process, on
  another descriptor, would wait for the first forever (a restore inside a transaction, a purge
  inside a write).
- A lock that cannot be taken is a one-line StateError naming what it guards.
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
    def __init__(self, path: Path, what: str) -> None:
        """``what`` names what the lock guards, for the error ("key metadata", "the secrets directory ...")."""
        self.path = path
        self.what = what
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
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)
