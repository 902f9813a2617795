"""Audit trail: one JSON line per key-service call (the CloudTrail of encfs).

Invariant: records carry ids, versions, contexts and outcomes, never key
material or plaintext; callers pass only those fields. Each record is written
with a single ``write(2)`` on an ``O_APPEND`` descriptor, so concurrent
processes never interleave partial lines. A record that cannot be written is a
StateError naming the log (KeyService.open opens it first, so an unwritable log
refuses a command before it acts).

Rotation (docs/FORMAT.md section 5): before each append the path is compared
with the open descriptor (st_dev, st_ino, as logging.handlers.WatchedFileHandler
does); once the log was renamed or removed the next record goes to a new
``audit.log``, never to the rotated file. A record appended while the rename
happens may land at the end of the rotated file (kept: rotation renames, it
never truncates). Records do not chain, so each file reads on its own;
``read_all`` reads the rotated files (``audit.log.N``, ``audit.log.N.gz``)
oldest first, then ``audit.log``.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import pwd
import re
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encfs.errors import StateError

log = logging.getLogger(__name__)

# logrotate's numbered names (contrib/logrotate/encfs): audit.log.1, audit.log.2.gz, ...
_ROTATED = re.compile(r"\.(\d+)(\.gz)?")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=64)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class AuditLog:
    """Append-only JSON-lines audit log at ``$ENCFS_HOME/audit.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._acting = threading.local()

    @contextmanager
    def acting_for(self, principal: Mapping[str, Any]) -> Iterator[None]:
        """Records written by this thread inside the block name ``principal`` (the key daemon's
        client: Principal.audit_fields) instead of this process."""
        before = getattr(self._acting, "principal", None)
        self._acting.principal = dict(principal)
        try:
            yield
        finally:
            self._acting.principal = before

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Records written by this thread inside the block are appended together, in one write(2),
        when it ends (the key daemon's batch of requests; it replies only after). A record that
        cannot be written fails the block's end, as each record's would."""
        if getattr(self._acting, "buffer", None) is not None:
            yield  # nested: the outer block writes
            return
        self._acting.buffer = []
        try:
            yield
        finally:
            data, self._acting.buffer = b"".join(self._acting.buffer), None
            if data:
                self._append(data)

    def _descriptor(self) -> int:
        if self._fd is not None and self._pid == os.getpid() and self._rotated(self._fd):
            os.close(self._fd)
            self._fd = None
        if self._fd is None or self._pid != os.getpid():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StateError(f"cannot write the audit log {self.path}: {e.strerror}") from None
            self._pid = os.getpid()
        return self._fd

    def _rotated(self, fd: int) -> bool:
        """Whether the path no longer names the open file (renamed or removed by a rotation)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # keep the open file: the path's trouble is reported when it is reopened
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def open(self) -> None:
        """Open the log now: a service that cannot audit refuses before it acts, not after."""
        with self._lock:
            self._descriptor()

    def record(self, operation: str, **fields: Any) -> None:
        """Append one record; ``fields`` are _line's (outcome, key_id, key_version, context, error,
        now) and any extras."""
        self._append(self._line(operation, **fields))

    def record_many(self, operation: str, contexts: Sequence[Mapping[str, str] | None],
                    principals: Sequence[Mapping[str, Any]] | None = None, **fields: Any) -> None:
        """One record per context (otherwise identical), written together.

        Each line is exactly what record() would write; the fields other than the
        context are encoded once, around a marker that each context replaces. ``principals``
        (one per context: the key daemon's batch of several clients' requests) names each
        record's principal."""
        if not contexts:
            return
        if principals is not None:
            assert len(principals) == len(contexts)
            self._append(b"".join(self._line(operation, context=c, principal=p, **fields)
                                  for c, p in zip(contexts, principals)))
            return
        marker = {"\0": "\0"}
        template = self._line(operation, context=marker, **fields).decode()
        head, _, tail = template.partition(json.dumps(marker, separators=(",", ":")))
        self._append("".join(
            head + json.dumps(dict(c) if c is not None else None, separators=(",", ":")) + tail
            for c in contexts).encode())

    def _line(
        self,
        operation: str,
        *,
        outcome: str = "success",
        key_id: str | None = None,
        key_version: int | None = None,
        context: Mapping[str, str] | None = None,
        error: str | None = None,
        now: float | None = None,
        principal: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> bytes:
        if principal is None:
            principal = getattr(self._acting, "principal", None)
        if principal is None:
            uid = os.getuid()
            principal = {"uid": uid, "user": _user_name(uid), "pid": os.getpid()}
        entry: dict[str, Any] = {
            "time": iso_time(time.time() if now is None else now),
            "principal": dict(principal),
            "operation": operation,
            "key_id": key_id,
            "key_version": key_version,
            "encryption_context": dict(context) if context is not None else None,
            "outcome": outcome,
        }
        if error is not None:
            entry["error"] = error
        entry.update(extra)
        return (json.dumps(entry, sort_keys=False, separators=(",", ":")) + "\n").encode()

    def _append(self, data: bytes) -> None:
        buffer = getattr(self._acting, "buffer", None)
        if buffer is not None:
            buffer.append(data)
            return
        with self._lock:
            fd = self._descriptor()
            try:
                written = os.write(fd, data)
            except OSError as e:
                raise StateError(f"cannot write the audit log {self.path}: {e.strerror}") from None
            if written != len(data):
                self._cut_torn(fd, written)
                raise StateError(f"cannot write the audit log {self.path}: short write "
                                 f"({written} of {len(data)} bytes; is its disk full?)")

    def _cut_torn(self, fd: int, written: int) -> None:
        """Remove the ``written`` bytes a short write (a full disk) through ``fd`` left at the end of the log: the
        next record would be appended to that torn line and be unreadable with it, although its
        request was answered. Only while they are still the file's last bytes (another process may
        have appended since: its record then already shares their line)."""
        try:
            end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: just past this write
            if os.fstat(fd).st_size == end:
                os.ftruncate(fd, end - written)
        except OSError as e:
            log.warning("audit log %s: cannot remove a torn record: %s", self.path, e.strerror)

    def read(self) -> Iterator[dict[str, Any]]:
        """The records of ``audit.log`` itself."""
        return _read_file(self.path)

    def rotated_files(self) -> list[Path]:
        """The rotated logs beside ``audit.log``, oldest (highest number) first."""
        found: list[tuple[int, Path]] = []
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(f"cannot read the audit log directory {self.path.parent}: {e.strerror}") from None
        for name in names:
            m = _ROTATED.fullmatch(name[len(self.path.name):]) if name.startswith(self.path.name) else None
            if m:
                found.append((int(m.group(1)), self.path.parent / name))
        return [p for _n, p in sorted(found, key=lambda f: (-f[0], f[1].name))]

    def read_all(self) -> Iterator[dict[str, Any]]:
        """Every record, the rotated files' first (oldest first), in the order they were written.

        A rotation during the read may move a file between listing and opening it: its
        records can then be missed or read twice (run it again)."""
        for path in self.rotated_files():
            yield from _read_file(path)
        yield from self.read()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    """One log's records; a line that is not a record is reported (a warning naming the file and
    line) and skipped, so the rest of the trail stays readable."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    yield record
                else:
                    log.warning("audit log %s: line %d is not a record (skipped)", path, number)
    except FileNotFoundError:
        return
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; damaged data is zlib's
        log.warning("audit log %s cannot be read to its end: %s", path, getattr(e, "strerror", None) or e)


def former_key_ids(records: Sequence[Mapping[str, Any]], ref: str) -> set[str]:
    """The keys ``ref`` (a key id, or an alias) named in ``records``: how `encfs key audit --key`
    finds the history of a deleted key, or of an alias since deleted or moved (the key ids it
    named, each record carries its own)."""
    from encfs.keys.metadata import is_key_id, normalize_alias

    if is_key_id(ref):
        wanted = ref.lower()
        return {wanted} if any(wanted in (r.get("key_id"), r.get("destination_key_id")) for r in records) else set()
    alias = normalize_alias(ref)
    return {str(r["key_id"]) for r in records if r.get("alias") == alias and r.get("key_id")}
