"""How failures inside an operation reach the kernel: as an errno, never as a traceback.

Invariants:
- An OSError keeps its errno; a FuseError is answered as it is.
- Integrity failures (errors.IntegrityError: a block, name, header or journal that fails
  authentication) and key-service errors are logged with the operation's name and answered
  with EIO: wrong bytes are never returned, and nothing about the key leaks into the reply.
  One already reported with its path (daemonlog.report_integrity) is not logged again.
- Anything else propagates: the server logs it and answers EIO (fuseproto/server.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from encfs import daemonlog
from encfs.errors import EncfsError, IntegrityError
from encfs.fuseproto.wire import FuseError

log = logging.getLogger("encfs.fuse")


def _as_fuse_error(op: str, e: Exception) -> FuseError | None:
    """The FuseError to answer for a failure inside operation ``op``, without leaking details:
    integrity failures and key-service errors are logged and become EIO. None: not ours to map."""
    if isinstance(e, FuseError):
        return e
    if isinstance(e, OSError):
        return FuseError(e.errno or errno.EIO)
    if daemonlog.reported(e):  # logged once already, with the path (encfs.daemonlog)
        return FuseError(errno.EIO)
    if isinstance(e, IntegrityError):
        log.error("%s: integrity failure: %s", op, e)
        return FuseError(errno.EIO)
    if isinstance(e, EncfsError):
        log.error("%s: %s", op, e.message)
        return FuseError(errno.EIO)
    return None


def reraise_as_errno(op: str, e: Exception) -> NoReturn:
    """Raise ``e`` (caught inside operation ``op``) as the kernel should see it: as errno (see
    _as_fuse_error), or unchanged if it is not ours to map. For hot paths, where a try
    statement costs less than entering failures_as_errno."""
    mapped = _as_fuse_error(op, e)
    if mapped is None or mapped is e:
        raise e
    raise mapped from None


@contextlib.contextmanager
def failures_as_errno(op: str) -> Iterator[None]:
    """Failures inside the block reach the kernel as errno (see _as_fuse_error)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - mapped or raised again unchanged
        reraise_as_errno(op, e)


def fuse_op(func: Callable[..., Any]) -> Callable[..., Any]:
    """An operation whose failures reach the kernel as errno (see _as_fuse_error)."""
    name = func.__name__

    @functools.wraps(func)
    def handler(self: Any, *args: Any) -> Any:
        try:
            return func(self, *args)
        except Exception as e:  # noqa: BLE001 - mapped or raised again unchanged
            reraise_as_errno(name, e)

    return handler
