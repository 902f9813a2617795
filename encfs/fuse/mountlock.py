"""The mount lock: one read-write mount of a CIPHERDIR at a time, on this machine or on any
machine sharing the storage.

``encfs.lock`` in the CIPHERDIR root (its name has a '.', so it is encfs's
bookkeeping, never a user entry) carries:

- a POSIX record lock (fcntl F_SETLK, which NFS and most network filesystems
  pass to the server): exclusive for a read-write mount, shared for a
  read-only one, so read-only mounts coexist and a read-write mount excludes
  every other mount. The kernel drops it when the daemon dies, kill -9 included;
- an owner record, written by read-write mounts only: JSON padded with spaces
  to a multiple of 512 bytes, rewritten in place through the locked
  descriptor (never renamed: the lock belongs to the inode): host name, boot
  id, pid and its start time, a random owner id, mountpoint, mount time,
  heartbeat time, mode, ``errors`` (the daemon's count of requests answered EIO,
  rewritten at most once a second when it changes, for `encfs status`), and ``state``: "mounted" while mounted, "clean" after
  a clean unmount. A heartbeat thread rewrites it every HEARTBEAT seconds.
  ``encfs rekey`` (rewrap.py) holds the lock the same way, with mode "rekey",
  and ``encfs fsck`` (fsck.py) with mode "fsck", so that nothing mounts while they run.

Taking the lock (``MountLock.acquire``):
- the fcntl lock is held by someone else: refused, naming the holder;
- the lock is free and the record says "mounted":
  * by this host (same host name and boot id): if that process is alive (same
    pid and start time) it still serves the mount on storage whose locks do not
    work: refused; otherwise it was killed: taken over;
  * by another host, heartbeat younger than LEASE: the storage does not share
    locks between hosts and that mount is alive: refused; older: that mount is
    presumed crashed: taken over, with a warning;
  a record taken over (or one that cannot be read) means the last read-write
  mount did not end cleanly: ``MountLock.recovering`` is True, and a warning says so
  (not for a killed `encfs rekey` whose marker stays: the marker's refusal or resumption says it);
- a read-only mount on storage it cannot write (read-only media, no lock file)
  goes ahead without a lock, with a warning.

Hosts sharing storage must keep their clocks within a few seconds of each
other (NTP): the heartbeat's age is judged on the reader's clock.

Invariants:
- in a process that holds the lock, encfs.lock is opened only by its
  MountLock and closed only by ``release``: closing any descriptor of a file
  drops every POSIX lock the process holds on it;
- only the holder of the exclusive lock writes the record; "clean" is written
  only after every backing file is closed (the caller's duty), so a record
  left "mounted" always means a mount that did not end cleanly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.daemon import proc_start
from encfs.diskio import pwrite_all
from encfs.errors import Busy, MountError

LOCK_NAME = "encfs.lock"
# A read-write mount rewrites its heartbeat every HEARTBEAT seconds. On storage that shares no locks
# between hosts, a "mounted" record of another host whose heartbeat is older than LEASE belongs to a
# crashed mount and is taken over; a live one is always less than HEARTBEAT (plus a stalled write) old.
LEASE = 30.0
HEARTBEAT = LEASE / 3
RECORD_VERSION = 1
REKEY_MODE = "rekey"  # the record's mode while `encfs rekey` holds the lock (encfs/fuse/rewrap.py)
REKEY_MARKER = "encfs.rekey"  # rewrap.py's marker of an interrupted re-key (FORMAT.md §6.9)
FSCK_MODE = "fsck"  # the record's mode while `encfs fsck` holds the lock (encfs/fuse/fsck.py)
_RECORD_UNIT = 512  # one sector: the record is written in one piece
_UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_READONLY_MEDIA = (errno.EROFS, errno.EACCES, errno.EPERM)

log = logging.getLogger("encfs.fuse")


class MountBusy(MountError, Busy):
    """The CIPHERDIR is mounted by another process or host."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _flock(kind: int) -> bytes:
    """struct flock for the whole file (l_type, l_whence, l_start, l_len, l_pid)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def _conflict(fd: int, kind: int) -> tuple[int, int] | None:
    """(lock type, pid) of a lock that would block ``kind`` on ``fd`` (F_GETLK, which takes nothing)."""
    got = fcntl.fcntl(fd, fcntl.F_GETLK, _flock(kind))
    l_type, _, _, _, pid = struct.unpack("hhqqi4x", got)
    return None if l_type == fcntl.F_UNLCK else (l_type, pid)


def _read_record(fd: int) -> dict[str, Any] | str | None:
    """The owner record; None if there is none yet, the reason if it cannot be read."""
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, min(size, 1 << 16), 0)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    text = raw.rstrip(b" \n\0")
    if not text:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        return "damaged (not JSON)"
    if not isinstance(rec, dict):
        return "damaged (not an object)"
    return rec


def _this_host() -> tuple[str, str]:
    return socket.gethostname(), _boot_id()


def _num(rec: dict[str, Any], key: str) -> float:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _who(rec: dict[str, Any]) -> str:
    if rec.get("mode") in (REKEY_MODE, FSCK_MODE):
        return f"by `encfs {rec['mode']}` (pid {rec.get('pid', '?')} on host {rec.get('host', '?')})"
    return f"at {rec.get('mountpoint', '?')} by pid {rec.get('pid', '?')} on host {rec.get('host', '?')}"


def _held(cipherdir: Path, rec: dict[str, Any]) -> str:
    if rec.get("mode") == REKEY_MODE:
        return f"{cipherdir} is being re-keyed {_who(rec)}"
    if rec.get("mode") == FSCK_MODE:
        return f"{cipherdir} is being checked {_who(rec)}"
    return f"{cipherdir} is already mounted {_who(rec)}"


def _judge(cipherdir: Path, rec: dict[str, Any] | str | None, now: float) -> tuple[bool, str | None]:
    """For a free fcntl lock: (the last read-write mount did not end cleanly, why not) for a record
    that may be taken over; raises MountBusy for one that belongs to a live mount."""
    if rec is None:
        return False, None
    if isinstance(rec, str):
        return True, f"its owner record is {rec}"
    if rec.get("state") != "mounted":
        return False, None
    # A killed `encfs fsck` wrote no file that a crash can tear (its copies to lost+found are renamed
    # into place whole): only a crash it took over from makes the next holder recover. Treating it
    # as a crashed mount would cut a damaged last block off as torn (silently shortening the file).
    crashed = rec.get("mode") != FSCK_MODE or rec.get("after_crash") is True
    host, boot = _this_host()
    if rec.get("host") == host and rec.get("boot_id") == boot:
        pid = rec.get("pid")
        if isinstance(pid, int) and pid > 0:
            start = proc_start(pid)
            if start is not None and start == rec.get("pid_start"):  # that very process, still running
                raise MountBusy(_held(cipherdir, rec))
        return (True, f"the mount {_who(rec)} ended without unmounting") if crashed else (False, None)
    age = now - _num(rec, "heartbeat")
    if age < LEASE:
        wait = max(1, int(LEASE - age + 1))
        raise MountBusy(f"{_held(cipherdir, rec)} (heartbeat {max(0, int(age))} s ago; "
                        f"if that host crashed, retry in {wait} s)")
    if not crashed:
        return False, None
    return True, f"the mount {_who(rec)} stopped its heartbeat {int(age)} s ago: presumed crashed"


def _rekey_marked(cipherdir: Path, rec: dict[str, Any] | str | None) -> bool:
    """Whether the holder that did not end cleanly was a re-key whose marker stays: the marker is
    the account of it (every command then refuses in one line naming the command that finishes the
    re-key, or finishes it and says so), so a warning about it would only come first."""
    return isinstance(rec, dict) and rec.get("mode") == REKEY_MODE and os.path.lexists(cipherdir / REKEY_MARKER)


def _busy(cipherdir: Path, rec: dict[str, Any] | str | None, held: tuple[int, int] | None) -> MountBusy:
    """The refusal when the fcntl lock is held: named from the record if a read-write mount holds it."""
    if isinstance(rec, dict) and rec.get("state") == "mounted" and (held is None or held[0] == fcntl.F_WRLCK):
        return MountBusy(_held(cipherdir, rec))
    pid = f" (pid {held[1]})" if held and held[1] > 0 else ""
    if held and held[0] == fcntl.F_RDLCK:
        return MountBusy(f"{cipherdir} is already mounted read-only{pid}: a read-write mount needs it alone")
    return MountBusy(f"{cipherdir} is in use by another encfs process{pid}")


def _open(path: Path, read_only: bool) -> int | None:
    """The lock file's descriptor; None for a read-only mount that can neither open nor create it."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        if read_only:
            try:
                return os.open(path, os.O_RDONLY | flags)
            except FileNotFoundError:
                try:
                    return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
                except OSError as e:
                    if e.errno in _READONLY_MEDIA:
                        return None
                    raise
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except OSError as e:
        raise MountError(f"cannot open the mount lock {path}: {e.strerror}") from None


def _peek(cipherdir: Path, conflicting_with: int | None = None
          ) -> tuple[tuple[int, int] | None, dict[str, Any] | str | None]:
    """Taking no lock: the lock that would block one of kind ``conflicting_with`` (None if there is
    none, none was asked for, or F_GETLK failed), and the owner record. OSError if the lock file
    cannot be opened."""
    fd = os.open(cipherdir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        held = None
        if conflicting_with is not None:
            try:
                held = _conflict(fd, conflicting_with)
            except OSError:
                pass
        return held, _read_record(fd)
    finally:
        os.close(fd)


def check(cipherdir: Path, *, read_only: bool) -> None:
    """Fail fast (before forking the daemon) if the CIPHERDIR is mounted; takes no lock."""
    try:
        held, rec = _peek(cipherdir, fcntl.F_RDLCK if read_only else fcntl.F_WRLCK)
    except OSError:
        return  # nothing to look at: the daemon decides
    if held is not None:
        raise _busy(cipherdir, rec, held)
    _judge(cipherdir, rec, time.time())


def serves_read_write(cipherdir: Path, mountpoint: str) -> bool:
    """Whether a live read-write mount of ``cipherdir`` at ``mountpoint`` holds the lock (takes none)."""
    try:
        held, rec = _peek(cipherdir, fcntl.F_RDLCK)  # only an exclusive (read-write) holder conflicts with a reader
    except OSError:
        return False
    return held is not None and isinstance(rec, dict) and rec.get("state") == "mounted" \
        and rec.get("mode") == "rw" and rec.get("mountpoint") == mountpoint


def owner_record(cipherdir: Path) -> dict[str, Any] | None:
    """The owner record a read-write mount wrote (takes no lock), for `encfs status`; None if
    there is none or it cannot be read."""
    try:
        _held_by, rec = _peek(cipherdir)
    except OSError:
        return None
    return rec if isinstance(rec, dict) else None


def describe(cipherdir: Path) -> str:
    """The lock's state in one line, for `encfs info` (takes no lock)."""
    try:
        held, rec = _peek(cipherdir, fcntl.F_WRLCK)
    except FileNotFoundError:
        return "never mounted read-write since the lock was introduced"
    except OSError as e:
        return f"unknown ({e.strerror})"
    if held is not None and held[0] == fcntl.F_RDLCK:
        return "mounted read-only"
    if isinstance(rec, str):
        return f"owner record {rec}"
    if not isinstance(rec, dict):
        return "mounted" if held else "not mounted"
    age = int(time.time() - _num(rec, "heartbeat"))
    if rec.get("state") == "mounted":
        if held is not None:
            return f"mounted read-write {_who(rec)} (heartbeat {age} s ago)"
        return f"not unmounted cleanly: last mounted read-write {_who(rec)} (heartbeat {age} s ago)"
    return "not mounted (last unmounted cleanly)" if held is None else "mounted"


class MountLock:
    """The lock a mount daemon holds for its whole life (see the module docstring)."""

    def __init__(self, path: Path, fd: int | None, read_only: bool, recovering: bool,
                 previous: dict[str, Any] | None) -> None:
        self.path, self.read_only = path, read_only
        self.recovering = recovering  # the last read-write mount did not end cleanly: run crash recovery
        self.previous = previous  # the owner record found, if any
        self._fd = fd
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] = {}
        self._size = 0
        self.error_count: Callable[[], int | None] = lambda: 0  # requests answered EIO (set by serve)

    @classmethod
    def acquire(cls, cipherdir: Path, mountpoint: Path | str, *, read_only: bool,
                mode: str = "rw") -> MountLock:
        """Take the lock for a mount at ``mountpoint``; MountBusy if the CIPHERDIR is mounted.
        ``mode``: what a read-write holder records (REKEY_MODE: `encfs rekey`, no mountpoint)."""
        path = cipherdir / LOCK_NAME
        fd = _open(path, read_only)
        if fd is None:
            log.warning("%s: cannot create %s (read-only storage): mounting read-only without a lock",
                        cipherdir, LOCK_NAME)
            return cls(path, None, read_only, False, None)
        try:
            try:
                fcntl.lockf(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    try:
                        held = _conflict(fd, fcntl.F_RDLCK if read_only else fcntl.F_WRLCK)
                    except OSError:
                        held = None
                    raise _busy(cipherdir, _read_record(fd), held) from None
                if e.errno not in _UNLOCKABLE:
                    raise MountError(f"cannot lock {path}: {e.strerror}") from None
                log.warning("%s: the storage does not support locks (%s): only the owner record guards "
                            "against a second mount", cipherdir, e.strerror)
            rec = _read_record(fd)
            recovering, why = _judge(cipherdir, rec, time.time())
            lock = cls(path, fd, read_only, recovering, rec if isinstance(rec, dict) else None)
            if why and not _rekey_marked(cipherdir, rec):
                log.warning("%s: the last read-write mount did not end cleanly: %s%s", cipherdir, why,
                            "" if read_only else "; taking over")
            if not read_only:
                lock._start(os.path.realpath(mountpoint) if mode == "rw" else str(mountpoint), mode)
            return lock
        except BaseException:
            os.close(fd)
            raise

    def _start(self, mountpoint: str, mode: str = "rw") -> None:
        host, boot = _this_host()
        now = time.time()
        self._record = {"version": RECORD_VERSION, "state": "mounted", "mode": mode, "host": host,
                        "boot_id": boot, "pid": os.getpid(), "pid_start": proc_start(os.getpid()),
                        "owner": uuid.uuid4().hex, "mountpoint": mountpoint, "mounted_at": round(now, 3),
                        "heartbeat": round(now, 3), "errors": 0}
        if mode == FSCK_MODE:  # whether a crash is still to be recovered from, if this fsck is killed
            self._record["after_crash"] = self.recovering
        try:
            self._write(truncate=True)
        except OSError as e:
            raise MountError(f"cannot write the mount lock {self.path}: {e.strerror}") from None
        self._thread = threading.Thread(target=self._beat, name="encfs-mountlock", daemon=True)
        self._thread.start()

    def _write(self, *, truncate: bool = False) -> None:
        """Rewrite the record in place, padded to a whole number of 512-byte units, and sync it."""
        assert self._fd is not None
        data = json.dumps(self._record, separators=(",", ":")).encode() + b"\n"
        if truncate:
            self._size = -(-(len(data) + 64) // _RECORD_UNIT) * _RECORD_UNIT
        data = data.ljust(max(self._size, len(data)), b" ")
        pwrite_all(self._fd, data, 0)
        if truncate:
            os.ftruncate(self._fd, len(data))
        os.fdatasync(self._fd)

    def _beat(self) -> None:
        failing = False
        due = time.monotonic() + HEARTBEAT
        while not self._stop.wait(min(1.0, HEARTBEAT)):  # a changed error count is written within 1 s
            errors = self.error_count()
            if time.monotonic() < due and errors == self._record.get("errors"):
                continue
            due = time.monotonic() + HEARTBEAT
            with self._mutex:
                if self._fd is None:
                    return
                rec = _read_record(self._fd)
                if isinstance(rec, dict) and rec.get("owner") != self._record["owner"]:
                    # Only possible where locks are not shared and this host stalled past the lease.
                    log.error("%s: another mount took over this CIPHERDIR (%s): stopping the heartbeat",
                              self.path.parent, _who(rec))
                    return
                self._record["heartbeat"] = round(time.time(), 3)
                self._record["errors"] = errors
                try:
                    self._write()
                    failing = False
                except OSError as e:
                    if not failing:
                        log.warning("%s: cannot write the mount heartbeat: %s", self.path, e.strerror)
                    failing = True

    def release(self, *, clean: bool) -> None:
        """Give the lock up. ``clean``: every backing file is closed after a clean unmount (a
        read-write mount records it, so the next mount is not ``recovering``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT + 5)
        with self._mutex:
            if self._fd is None:
                return
            try:
                if self._record and clean:
                    self._record.update(state="clean", heartbeat=round(time.time(), 3))
                    try:
                        self._write()
                    except OSError as e:
                        log.warning("%s: cannot record the clean unmount: %s", self.path, e.strerror)
            finally:
                os.close(self._fd)  # drops the fcntl lock
                self._fd = None
