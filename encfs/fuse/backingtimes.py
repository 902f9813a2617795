"""A backing file's atime and mtime are its plaintext's (fs.py reports them as they are), so work
of encfs's own that changes no contents leaves them as they were: moving journaled blocks into
place (content.py), a re-key (rekeyfile.py, fullrekey.py) and a header's re-wrap (rewrap.py,
rewraplog.py). Such work reads through ``open_quiet`` descriptors and ends with ``keep_times``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("encfs.fuse")


def open_quiet(opener: Callable[[int], int], flags: int) -> int:
    """``opener(flags | O_NOATIME)``: reads through it leave the file's atime alone. O_NOATIME needs
    the file's ownership or CAP_FOWNER; without them, ``opener(flags)``."""
    try:
        return opener(flags | os.O_NOATIME)
    except PermissionError:
        return opener(flags)


def times_of(fd: int) -> tuple[int, int]:
    """The (atime, mtime) in nanoseconds of the file open as ``fd``."""
    st = os.fstat(fd)
    return st.st_atime_ns, st.st_mtime_ns


def keep_times(fd: int, times: tuple[int, int], what: str | bytes = "a file") -> None:
    """Give the file open as ``fd`` the (atime, mtime) ``times``: its own from before the change,
    or the ones a redo record or side file kept for it. Only the owner (or CAP_FOWNER) may set
    them: otherwise a warning, as the change itself is done."""
    try:
        os.utime(fd, ns=times)
    except OSError as e:
        log.warning("%s: its times were not kept (%s)", os.fsdecode(what), e.strerror)
