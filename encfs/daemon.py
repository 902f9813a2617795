"""Starting a daemon that reports when it is ready: used by `encfs mount` and
`encfs volume attach`.

The parent forks before touching the token (PKCS#11 sessions do not survive
fork). The child starts a new session, ignores SIGPIPE, sends its stdio to
/dev/null or a log file (a closed terminal must not kill it), sets up
logging (encfs.daemonlog: syslog or a file in the state directory,
rate-limited) and runs ``run(ready)``. It sends the parent one line on a pipe:
"ok" when ``ready.ok()`` is called, or the one-line cause of the failure
(after "E<exit code> " for an EncfsError, so the parent exits as the child's
error would have: a busy CIPHERDIR is 75 either way). The parent waits a
bounded time; on anything but "ok" it reaps (or kills) the child and raises
the caller's error type with that line.

Every process that holds key material (the daemons, a foreground mount, the
sealing worker) calls ``keep_secrets_in_memory`` first: Python cannot wipe the
keys and PINs it held, so they must not reach a core file, and processes of
the same uid must not read them with ptrace or /proc/PID/mem.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import select
import signal
from collections.abc import Callable
from pathlib import Path

from encfs import daemonlog
from encfs.errors import EncfsError

log = logging.getLogger("encfs.daemon")
PR_SET_DUMPABLE = 4


def keep_secrets_in_memory() -> None:
    """No core dumps (RLIMIT_CORE 0, hard limit too) and not dumpable (PR_SET_DUMPABLE 0: no core
    file even if a limit is raised, no ptrace or /proc/PID/mem by same-uid processes, /proc/PID
    files owned by root). Inherited by forked children; a new program (exec) resets dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot mark process %d non-dumpable: %s", os.getpid(), os.strerror(ctypes.get_errno()))


def proc_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running process; None if it is gone or a zombie.

    A daemon is an orphan once the CLI that started it exits, and nothing may reap it
    (a container's PID 1 often does not): a killed daemon then stays a zombie, which
    kill(pid, 0) still reports as existing. Comparing start times also tells a reused
    pid from the daemon.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


class Readiness:
    """The child's end of the status pipe."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (" ".join(line.split()) + "\n").encode())
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def ok(self) -> None:
        self._send("ok")

    def fail(self, message: str) -> None:
        self._send(message)


def _detach_stdio(log_file: str | None, name: str, state_dir: Path, log_id: str) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else devnull
    for fd, target in ((devnull, 0), (out, 1), (out, 2)):
        os.dup2(fd, target)
    daemonlog.configure(log_file, state_dir, log_id, name)


def spawn(run: Callable[[Readiness], None], *, name: str, log_file: str | None,
          error: type[EncfsError], state_dir: Path, log_id: str, timeout: float = 120.0) -> int:
    """Fork a daemon running ``run``; return its pid once it reported ready."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        ready = Readiness(wfd)
        code = 0
        try:
            os.setsid()
            keep_secrets_in_memory()
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            _detach_stdio(log_file, name, state_dir, log_id)
            run(ready)
        except BaseException as e:  # the parent must hear about any failure
            if isinstance(e, EncfsError):
                ready.fail(f"E{e.exit_code} {e.message}")
            elif isinstance(e, OSError) and e.filename is not None:  # as the CLI reports it
                ready.fail(f"{os.fsdecode(e.filename)}: {e.strerror or e}")
            else:
                ready.fail(f"internal error: {type(e).__name__}: {e}")
                log.exception("%s failed", name)
            code = 1
        try:
            daemonlog.flush_pending()  # os._exit skips logging's shutdown
        finally:
            os._exit(code)  # whatever happens, the forked child never returns into the caller
    os.close(wfd)
    try:
        readable, _, _ = select.select([rfd], [], [], timeout)
        status = os.read(rfd, 4096).decode(errors="replace").strip() if readable else None
    finally:
        os.close(rfd)
    if status == "ok":
        return pid
    if status is None:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if status is None:
        raise error(f"{name} did not become ready within {timeout:.0f} s")
    tag, _, message = status.partition(" ") if status.startswith("E") else ("", "", status)
    failure = error(message or f"{name} died before it was ready")
    if tag[1:].isdigit():
        failure.exit_code = int(tag[1:])  # the child's own error's code (errors.EXIT_CODES)
    raise failure
