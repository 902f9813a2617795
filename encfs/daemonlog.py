"""Where a daemon's log goes, how repeats are limited, and how integrity failures are worded.

Invariants:
- A daemon (`encfs mount`, `encfs volume attach`, daemonized or -f) always logs somewhere:
  ``--log-file`` if given, else syslog (facility daemon, ident "encfs") when the syslog
  socket exists ($ENCFS_SYSLOG_SOCKET, default /dev/log), else
  ``<state dir>/log/encfs-<id>.log`` (directory 0700, file 0600, reopened after logrotate
  renames it: WatchedFileHandler).
- Every handler it installs is rate-limited (RateLimit): the same message (format string and
  the text of its arguments) passes once per window; the repeats become one "repeated N times"
  line once the window has ended (seen at the next message) or the daemon exits. At most ``max_keys`` distinct messages are tracked, so
  memory and log volume stay bounded.
- An integrity failure is one line: the plaintext path, the block or sector, and a cause in
  CAUSES, chosen from the exception's type, never from its text. No key material or PIN.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from encfs.errors import InvalidCiphertext, KeyNotFound, KeyStateError, TokenError

SYSLOG_SOCKET_ENV = "ENCFS_SYSLOG_SOCKET"
DEFAULT_SYSLOG_SOCKET = "/dev/log"
WINDOW = 60.0
MAX_KEYS = 1024
CAUSES = ("tampered", "wrong key", "key disabled", "token unreachable")
_FORMAT = "%(asctime)s {name}[%(process)d] %(levelname)s %(message)s"

_Key = tuple[str, int, str, tuple[str, ...]]


class RateLimit(logging.Filter):
    """Lets each distinct message through once per ``window`` seconds (see the Invariants)."""

    def __init__(self, handler: logging.Handler, window: float = WINDOW, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.handler, self.window, self.max_keys, self.clock = handler, window, max_keys, clock
        # key -> [window start, repeats suppressed, the first record]; oldest window first
        self._seen: OrderedDict[_Key, list[object]] = OrderedDict()
        self._lock = threading.Lock()
        handler.addFilter(self)

    @staticmethod
    def _key(record: logging.LogRecord) -> _Key:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return record.name, record.levelno, str(record.msg), tuple(str(a) for a in args)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "encfs_summary", False):
            return True
        due: list[tuple[_Key, list[object]]] = []
        with self._lock:  # the servers log from several threads; filters run outside the handler's lock
            now = self.clock()
            while self._seen:  # windows that ended, oldest first (keys are kept in arrival order)
                oldest = next(iter(self._seen.values()))
                if now - float(oldest[0]) < self.window:  # type: ignore[arg-type]
                    break
                due.append(self._seen.popitem(last=False))
            key = self._key(record)
            entry = self._seen.get(key)
            if entry is not None:  # within its window: counted, not logged
                entry[1] = int(entry[1]) + 1  # type: ignore[call-overload]
            else:
                while len(self._seen) >= self.max_keys:
                    due.append(self._seen.popitem(last=False))
                self._seen[key] = [now, 0, record]
        for k, e in due:
            self._summarise(k, e)
        return entry is None

    def flush_pending(self) -> None:
        """Report every window's repeats now (at exit)."""
        with self._lock:
            due = list(self._seen.items())
            self._seen.clear()
        for key, entry in due:
            self._summarise(key, entry)

    def _summarise(self, key: _Key, entry: list[object]) -> None:
        count, first = entry[1], entry[2]
        if not count or not isinstance(first, logging.LogRecord):
            return
        summary = logging.makeLogRecord(first.__dict__)
        summary.msg, summary.args = f"%s (repeated %d times in {self.window:.0f} s)", (first.getMessage(), count)
        summary.encfs_summary = True
        summary.created = time.time()
        self.handler.handle(summary)


def flush_pending() -> None:
    """Every root handler's pending "repeated" lines, now: a daemon calls it as it exits."""
    for h in logging.getLogger().handlers:
        for f in h.filters:
            if isinstance(f, RateLimit):
                f.flush_pending()


def integrity_cause(e: BaseException) -> str:
    """One of CAUSES for an exception met while opening stored data."""
    if isinstance(e, KeyStateError | KeyNotFound):
        return "key disabled"
    if isinstance(e, TokenError):
        return "token unreachable"
    if isinstance(e, InvalidCiphertext):
        return "wrong key"
    return "tampered"


def report_integrity(log: logging.Logger, path: str | bytes, where: str, e: BaseException) -> None:
    """The one line for an integrity failure at ``where`` ("block 3", "sector 8", "header") of the
    plaintext ``path`` (quoted: a name cannot forge a log line)."""
    log.error("%r: %s: integrity failure (%s)", os.fsdecode(path), where, integrity_cause(e))
    mark_reported(e)


def mark_reported(e: BaseException) -> None:
    e.encfs_reported = True  # type: ignore[attr-defined]


def reported(e: BaseException) -> bool:
    """Whether report_integrity already logged ``e`` (then the FUSE layer only answers EIO)."""
    return bool(getattr(e, "encfs_reported", False))


def log_id(path: str | os.PathLike[str]) -> str:
    """A file name for a mount point or volume: its absolute path, '/' as '-'."""
    text = os.path.abspath(os.fspath(path)).strip("/") or "root"
    return "".join(c if c.isalnum() or c in "._" else "-" for c in text)


def default_log_file(state_dir: Path, ident: str) -> Path:
    return state_dir / "log" / f"encfs-{ident}.log"


def _syslog_socket() -> str | None:
    path = os.environ.get(SYSLOG_SOCKET_ENV) or DEFAULT_SYSLOG_SOCKET
    try:
        return path if stat.S_ISSOCK(os.stat(path).st_mode) else None
    except OSError:
        return None


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """Created 0600 whatever the umask, also when it reopens the file after a rotation."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def destination(log_file: str | None, state_dir: Path, ident: str, name: str) -> logging.Handler:
    """The daemon's log handler (see the Invariants), formatted and rate-limited."""
    handler: logging.Handler
    sock = None if log_file else _syslog_socket()
    if sock is not None:
        handler = logging.handlers.SysLogHandler(sock, logging.handlers.SysLogHandler.LOG_DAEMON,
                                                 socktype=socket.SOCK_DGRAM)
        handler.ident = f"encfs[{os.getpid()}]: "  # the volume daemon too: one ident to filter on
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        path = Path(log_file) if log_file else default_log_file(state_dir, ident)
        if not log_file:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = _PrivateFileHandler(path)
        handler.setFormatter(logging.Formatter(_FORMAT.format(name=name)))
    RateLimit(handler)
    return handler


def configure(log_file: str | None, state_dir: Path, ident: str, name: str,
              keep: list[logging.Handler] | None = None, debug: bool = False) -> None:
    """Send the process's log (INFO and up) to the destination, plus ``keep`` (a -f daemon's stderr:
    warnings and errors, or with ``debug`` everything, the request trace included)."""
    keep = keep or []
    root = logging.getLogger()
    for h in root.handlers[:]:
        if h not in keep:
            root.removeHandler(h)
            h.close()
    for h in keep:
        if debug:
            h.setLevel(logging.DEBUG)
        elif h.level == logging.NOTSET:  # as before: the CLI's stderr showed warnings and errors
            h.setLevel(logging.WARNING)
        if not any(isinstance(f, RateLimit) for f in h.filters):
            RateLimit(h)
    root.addHandler(destination(log_file, state_dir, ident, name))
    root.setLevel(logging.INFO)
