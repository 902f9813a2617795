"""Where key policies and grants live: one JSON file per key under the daemon's state directory.

    <state_dir>/policies/<key id>.json   the key policy document, as put
    <state_dir>/grants/<key id>.json     {"Grants": [ListGrants entries]}

Invariants:
- Every change is written with ``write_atomic(..., sync_dir=True)`` before the call returns: a
  crash or restart keeps either the old file or the new one, and loses nothing acknowledged.
- A file that cannot be read or parsed is a one-line StateError naming it, never an empty policy
  or no grants (that could lift a Deny, or hide a grant someone relies on).
- A read is served from a cache only while the file's (inode, mtime, size) is unchanged, and each
  write through this store drops its entry: a change takes effect on the next check.
- File names are key ids (UUIDs), checked before any path is built: nothing escapes the directory.
- Memory does not grow with the key ids clients name: only files that exist are remembered (any
  client names any key id in a blob's header; an absent file is looked for again each time).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from encfs.atomicfile import write_atomic
from encfs.diskio import fsync_dir
from encfs.errors import EncfsError, StateError, UsageError

POLICIES, GRANTS = "policies", "grants"
T = TypeVar("T")


def check_key_id(key_id: str) -> str:
    try:
        if str(uuid.UUID(key_id)) == key_id:
            return key_id
    except (ValueError, TypeError, AttributeError):
        pass
    raise UsageError(f"{str(key_id)[:80]!r} is not a key id")


class AclStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        # (kind, key id) of a file that exists -> its path, (inode, mtime, size) and parsed value
        self._cache: dict[tuple[str, str], tuple[Path, tuple[int, int, int], Any]] = {}
        self._lock = threading.Lock()

    def path(self, kind: str, key_id: str) -> Path:
        return self.state_dir / kind / f"{check_key_id(key_id)}.json"

    def read(self, kind: str, key_id: str, parse: Callable[[Any, Path], T]) -> T | None:
        """The parsed file (``parse(json, path)``; it raises StateError on a bad shape), None if absent."""
        entry = (kind, key_id)
        cached = self._cache.get(entry)
        if cached is not None:  # one stat per check while nothing changed (the daemon's every request)
            path = cached[0]
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and cached[1] == (st.st_ino, st.st_mtime_ns, st.st_size):
                return cached[2]  # type: ignore[no-any-return]
        else:
            path = self.path(kind, key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._cache.pop(entry, None)
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache.get(entry)
            if cached is not None and cached[1] == stamp:
                return cached[2]  # type: ignore[no-any-return]
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        try:
            value = parse(json.loads(raw), path)
        except ValueError as e:  # bad UTF-8 or JSON
            raise StateError(f"{path} is damaged: {_first_line(e)}") from None
        except EncfsError as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"{path} is damaged: {e.message}") from None
        self._cache[entry] = (path, stamp, value)
        return value

    def write(self, kind: str, key_id: str, document: Any) -> None:
        path = self.path(kind, key_id)
        data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        with self._lock:
            self._ensure_dir(path.parent)
            self._cache.pop((kind, key_id), None)
            try:
                write_atomic(path, data, 0o600, sync_dir=True)
            except OSError as e:
                raise StateError(f"cannot write {path}: {e.strerror}") from None

    def remove(self, kind: str, key_id: str) -> None:
        path = self.path(kind, key_id)
        with self._lock:
            self._cache.pop((kind, key_id), None)
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            except OSError as e:
                raise StateError(f"cannot remove {path}: {e.strerror}") from None
            fsync_dir(path.parent)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        except OSError as e:
            raise StateError(f"cannot create {directory}: {e.strerror}") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
