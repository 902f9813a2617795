"""Audit trail: one JSON line per key-service call (the CloudTrail of encfs).

Invariant: records carry ids, versions, contexts and outcomes, never key
material or plaintext; callers pass only those fields. Each record is written
with a single ``write(2)`` on an ``O_APPEND`` descriptor, so concurrent
processes never interleave partial lines. A record that cannot be written is a
StateError naming the log (KeyService.open opens it first, so an unwritable log
refuses a command before it acts).
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encfs.errors import StateError


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

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StateError(f"cannot write the audit log {self.path}: {e.strerror}") from None
            self._pid = os.getpid()
        return self._fd

    def open(self) -> None:
        """Open the log now: a service that cannot audit refuses before it acts, not after."""
        with self._lock:
            self._descriptor()

    def record(self, operation: str, **fields: Any) -> None:
        """Append one record; ``fields`` are _line's (outcome, key_id, key_version, context, error,
        now) and any extras."""
        self._append(self._line(operation, **fields))

    def record_many(self, operation: str, contexts: Sequence[Mapping[str, str] | None], **fields: Any) -> None:
        """One record per context (otherwise identical), written together.

        Each line is exactly what record() would write; the fields other than the
        context are encoded once, around a marker that each context replaces."""
        if not contexts:
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
        **extra: Any,
    ) -> bytes:
        uid = os.getuid()
        entry: dict[str, Any] = {
            "time": iso_time(time.time() if now is None else now),
            "principal": {"uid": uid, "user": _user_name(uid), "pid": os.getpid()},
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
        with self._lock:
            try:
                written = os.write(self._descriptor(), data)
            except OSError as e:
                raise StateError(f"cannot write the audit log {self.path}: {e.strerror}") from None
            if written != len(data):
                raise StateError(f"cannot write the audit log {self.path}: short write "
                                 f"({written} of {len(data)} bytes; is its disk full?)")

    def read(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        except FileNotFoundError:
            return

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None
