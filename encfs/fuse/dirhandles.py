"""Open directory handles (OPENDIR to RELEASEDIR), apart from the filesystem's operations as
gocryptfs keeps its open-file table apart from its frontend.

Invariants:
- A handle lists its directory's backing entries once, at the first READDIR from offset 0
  (and again at a rewind to 0), sorted, without encfs's internal entries: offsets index that
  snapshot, so entries added or removed meanwhile shift nothing, and a READDIR that resumes
  at offset n continues where the last one stopped.
- A handle names its directory by inode, not by path: a directory renamed while open keeps
  listing through its new path.
- Handle numbers are never reused within a mount. The table is changed only by OPENDIR and
  RELEASEDIR, which the servers run under their namespace lock (server.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from encfs.fuse.names import is_internal


@dataclass
class DirHandle:
    inode: int
    entries: list[bytes] | None = None  # backing entries, listed by the first READDIR at offset 0

    def listing(self, start: int, list_backing: Callable[[], list[bytes]]) -> list[bytes]:
        """The snapshot READDIR at offset ``start`` reads: listed afresh (``list_backing()``)
        at the first read or a rewind to 0."""
        if start == 0 or self.entries is None:
            self.entries = sorted(n for n in list_backing() if not is_internal(n))
        return self.entries


class DirHandles:
    """Handle number -> DirHandle."""

    def __init__(self) -> None:
        self._handles: dict[int, DirHandle] = {}
        self._next = 1

    def open(self, inode: int) -> int:
        fh, self._next = self._next, self._next + 1
        self._handles[fh] = DirHandle(inode)
        return fh

    def __getitem__(self, fh: int) -> DirHandle:
        return self._handles[fh]

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
