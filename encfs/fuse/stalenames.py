"""Names the kernel may hold wrongly after a name change that failed part way.

The kernel keeps a name it learnt (a dentry, positive or negative) for the
entry timeout (fs.ENTRY_TIMEOUT: an hour), trusting that names change only
through the mount. An operation that changed the backing directory and then
failed (a mkdir whose chown failed, an unlink whose long-name side file could
not be removed, a rename whose directory-id bookkeeping failed) answers an
error, so the kernel keeps what it believed before: the servers then tell it
to forget those names (FUSE_NOTIFY_INVAL_ENTRY), and its next access asks.

Invariants:
- ``changes_names`` records the (parent inode, name) pairs of an operation that
  raised, unless its errno says nothing was changed (UNCHANGED); recording a
  name that did not change costs one LOOKUP later, never a wrong answer.
- A server sends the invalidations only after the failed request's reply: the
  kernel holds the directory's lock until then (fuse_reverse_inval_entry takes it).
"""

from __future__ import annotations

import collections
import errno
import functools
from collections.abc import Callable
from typing import Any

from encfs.fuseproto.wire import FuseError

# Answered before anything in the backing directory changed.
UNCHANGED = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR,
                       errno.ENOTDIR, errno.EINVAL})


class StaleNames:
    """A thread-safe queue of (parent inode, name) pairs the kernel should forget."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()

    def add(self, parent: int, name: bytes) -> None:
        self._queue.append((parent, name))

    def drain(self) -> list[tuple[int, bytes]]:
        if not self._queue:  # after almost every error reply: no exception raised and caught
            return []
        out = []
        while True:
            try:
                out.append(self._queue.popleft())
            except IndexError:
                return out


def changes_names(*pairs: tuple[int, int]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an EncryptedFS operation whose arguments ``pairs`` (positions of a parent inode
    and a name, after ``self``) name entries it may change: on failure they go to
    ``self.stale_names``."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def operation(self: Any, *args: Any) -> Any:
            try:
                return func(self, *args)
            except Exception as e:
                if not (isinstance(e, FuseError) and e.errno in UNCHANGED):
                    for parent, name in pairs:
                        self.stale_names.add(args[parent], args[name])
                raise
        return operation
    return decorate
