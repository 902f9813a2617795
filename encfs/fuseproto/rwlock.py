"""The servers' reader-writer lock."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder goes first.

    Servers hold it exclusively for every request except reads, which hold it
    shared: reads then overlap each other (their I/O runs without the GIL) but
    never an operation that changes or closes what they read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0  # shared holders
        self._waiting = 0  # exclusive holders waiting for shared holders to leave
        self._blocked = 0  # shared holders waiting for an exclusive holder to go first

    def acquire_exclusive(self) -> None:
        self._cond.acquire()
        if self._shared:
            self._waiting += 1
            while self._shared:
                self._cond.wait()
            self._waiting -= 1

    def release_exclusive(self) -> None:
        if self._blocked or self._waiting:
            self._cond.notify_all()
        self._cond.release()

    def acquire_shared(self) -> None:
        with self._cond:
            while self._waiting:
                self._blocked += 1
                self._cond.wait()
                self._blocked -= 1
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
