"""Mounting: validate, daemonize, serve, unmount cleanly.

``encfs mount`` checks what it can, asks for a PIN if one must be typed,
then starts the daemon through encfs.daemon.spawn and returns once the
kernel mount is usable (or prints the daemon's one-line error). SIGTERM,
SIGINT and `encfs umount` end the FUSE session; the daemon then closes
every backing file and unmounts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from encfs import daemonlog
from encfs.cliargs import open_service
from encfs.daemon import Readiness, keep_secrets_in_memory, spawn
from encfs.diskio import syncfs
from encfs.errors import MountError, MountpointBusy
from encfs.fuse import binding, mountlock, rewrap
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsconfig import add_sparse, open_config, peek_config
from encfs.fuse.mounthelper import is_mount8_option
from encfs.fuse.mountlock import MountLock
from encfs.fuse.openfiles import CHECKPOINT_DELAY
from encfs.fuse.recovery import open_by_recovery_key
from encfs.fuse.server import FsServer
from encfs.fuseproto import uring
from encfs.fuseproto.keepawake import KeepAwake
from encfs.fuseproto.mounting import (
    escape_option,
    mount_fusermount,
    remount_direct,
    topmost_mount,
    unmount_fusermount,
)
from encfs.keys.config import HsmOptions, default_home, prompt_before_fork
from encfs.keys.service import KeyService

if TYPE_CHECKING:
    from encfs.fuse.pyfuse3server import Pyfuse3Server

# Threads for large reads and writes running alongside the next request (FuseServer._loop); with
# the short GIL switch interval (fuseproto.server.GIL_SWITCH_INTERVAL) 4 beat 2, and 4 without it
# lost (benchmarks/HISTORY.md, 481d43a).
SERVER_THREADS = 4
UNMOUNT_WAIT = 30  # seconds `encfs umount` waits for the daemon to finish after the unmount
log = logging.getLogger("encfs.fuse")
# `encfs mount --server`: our own /dev/fuse protocol server (encfs.fuse.server, the default: faster
# on every workload measured, README "Two FUSE servers") or libfuse through pyfuse3 on trio
# (encfs.fuse.pyfuse3server). Both serve the same EncryptedFS behind the same serve().
SERVERS = ("encfs", "pyfuse3")


@dataclass
class MountOptions:
    read_only: bool = False
    allow_other: bool = False
    extra: list[str] = field(default_factory=list)
    log_file: str | None = None
    debug: bool = False  # trace every FUSE request by opcode name (fuseproto.server)
    server: str = "encfs"  # one of SERVERS
    io_uring: bool = False  # offer FUSE over io_uring (encfs.fuseproto.uring); the encfs server only
    keep_cpu_awake: bool = False  # run encfs.fuseproto.keepawake's helper; the encfs server only
    # Mount by the recovery key, without the token (recovery.py): read-only, every file key derived.
    recovery_key: bytes | None = field(default=None, repr=False)
    recovery_key_file: str | None = None


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted at ``path`` (the topmost one), or None if nothing is."""
    entry = topmost_mount(path)
    return None if entry is None else entry.fstype


def is_mounted(path: Path) -> bool:
    return mount_type(path) is not None


def check_fuse_device() -> None:
    """fusermount3 opens /dev/fuse with the caller's permissions, so it must be usable."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist: load the fuse kernel module (modprobe fuse)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = os.stat("/dev/fuse").st_mode & 0o777
        raise MountError(f"/dev/fuse (mode {mode:04o}) is not accessible to uid {os.getuid()}: unprivileged "
                         f"FUSE mounts need it world read-write (chmod 0666 /dev/fuse, the Debian default)")


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise MountpointBusy(f"mountpoint {mountpoint} is busy: something is already mounted there")
    if any(mountpoint.iterdir()):
        raise MountError(f"mountpoint {mountpoint} is not empty")


# Options that let processes of other users than the mounting one into the mount.
_OTHERS_ALLOWED = ("allow_other", "allow_root")


def _fuse_options(cipherdir: Path, opts: MountOptions) -> list[str]:
    """fusermount3's -o list.

    default_permissions (the kernel checks modes against the plaintext attributes) is
    set when other users can reach the mount (allow_other, allow_root), whose
    requests the daemon would otherwise carry out with its own credentials.
    Without it, only the mounting user's processes get in (FUSE refuses all others),
    and the daemon, running as that user, meets the same mode checks on the backing
    store, where every entry has its plaintext entry's mode and owner (as gocryptfs
    does). This spares the kernel a GETATTR of the directory before every create and
    unlink: it invalidates a directory's attributes whenever an entry changes.
    """
    options = [f"fsname={escape_option(str(cipherdir))}", "subtype=encfs"]
    if opts.allow_other:
        options.append("allow_other")
    if opts.read_only:
        options.append("ro")
    for o in opts.extra:
        options.extend(x for x in o.split(",") if x and x not in options and not is_mount8_option(x))
    if any(o in options for o in _OTHERS_ALLOWED) and "default_permissions" not in options:
        options.insert(0, "default_permissions")
    return options


def serve(cipherdir: Path, mountpoint: Path, home: Path | None, hsm: HsmOptions, opts: MountOptions,
          ready: Readiness | None = None) -> None:
    """Mount and serve until unmounted or signalled; ``ready.ok()`` once the mount is usable.

    The mount lock (mountlock.py) is taken before the config is verified or repaired, and held
    until every backing file is closed.
    """
    keep_secrets_in_memory()  # also a foreground mount, which is the CLI process
    check_mountpoint(mountpoint)
    server_class = _server_class(opts.server)
    peek_config(cipherdir)  # an encfs filesystem: only then may its lock file be created
    lock = MountLock.acquire(cipherdir, mountpoint, read_only=opts.read_only)
    fs: EncryptedFS | None = None
    ks: KeyService | None = None
    awake: KeepAwake | None = None
    try:
        if opts.recovery_key is not None:  # no token, no PKCS#11 module: read-only (cmd_mount)
            # Whatever re-key was interrupted: every key is derived from a file id (recovery.py).
            opened = open_by_recovery_key(cipherdir, opts.recovery_key, opts.recovery_key_file or "the recovery key")
            if os.path.lexists(cipherdir / rewrap.MARKER):
                log.warning("%s: a re-key was interrupted: files it had not yet given a derived key (an "
                            "interrupted `encfs recovery-key add`) answer EIO", cipherdir)
        else:
            rewrap.refuse_if_interrupted(cipherdir)
            ks = open_service(home, hsm)  # a fresh token cannot hold the filesystem's key
            opened = open_config(cipherdir, ks, writable=not opts.read_only)
        if not opts.read_only:
            binding.upgrade(cipherdir, opened)
            add_sparse(cipherdir, opened)
        for w in opened.warnings:
            log.warning("%s: %s", cipherdir, w)
        fs = EncryptedFS(os.fsencode(cipherdir), opened.config, opened.keys, ks, read_only=opts.read_only,
                         recovering=lock.recovering, recovery_root=opened.root)
        where = os.path.realpath(mountpoint)  # as mountinfo names it; never resolved once mounted
        if not fs.read_only:
            # Before the server (its threads' request buffers live in the worker's arena), and before
            # the mount: a worker that cannot start leaves nothing mounted.
            fs.sealing.start()
        if opts.keep_cpu_awake:  # before the mount too: a helper that cannot start fails it in one line
            try:
                awake = KeepAwake.start()
            except OSError as e:
                raise MountError(f"--keep-cpu-awake: its helper process did not start: {e.strerror}") from None
        try:
            fd = mount_fusermount(str(mountpoint), _fuse_options(cipherdir, opts))
        except OSError as e:
            raise MountError(f"FUSE refused to mount {mountpoint}: {e.strerror}") from None
    except BaseException:
        try:
            if awake is not None:
                awake.stop()
            if fs is not None:
                fs.sealing.stop()
            if ks is not None:
                ks.close()
        finally:
            lock.release(clean=not lock.recovering)  # nothing was mounted: the record stays as it was found
        raise
    server = server_class(fd, fs, where, trace=opts.debug, io_uring=opts.io_uring, awake=awake)
    # In the owner record (`encfs status`); pyfuse3's server keeps no count: unknown (null).
    lock.error_count = (lambda: server.io_errors) if isinstance(server, FsServer) else (lambda: None)
    if opts.debug:
        logging.getLogger("encfs.fuse.trace").setLevel(logging.DEBUG)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: server.stop())
    served = durable = False
    recovered = threading.Event()
    stopping = threading.Event()
    # A side file of an unfinished re-key (rekeyfile.py) is finished, or removed with its gone
    # file, by the same scan as a crash's leftovers.
    if not (lock.recovering or fs.files.rekeys) or opts.read_only:
        recovered.set()
    try:
        if ready is not None:
            ready.ok()
        if not recovered.is_set():
            threading.Thread(target=_recover_all, args=(fs, server, recovered), daemon=True,
                             name="crash-recovery").start()
        if not fs.read_only:
            fs.files.defer_checkpoints = True
            threading.Thread(target=_run_deferred, args=(fs, server, stopping), daemon=True,
                             name="deferred-writes").start()
        server.serve(threads=SERVER_THREADS)
        # Not if io_uring queues were still answering when serve() gave up waiting for them.
        served = server.stopped_cleanly
    finally:
        stopping.set()
        with server.lock.exclusive():  # a worker may still be inside an operation
            durable = fs.close_all()
        fs.sealing.stop()
        if not server.unmounted:
            try:
                unmount_fusermount(str(mountpoint), lazy=True)
            except OSError as e:
                log.warning("%s: %s", mountpoint, e.strerror)
        os.close(fd)
        if awake is not None:  # after the device: a worker may note one last request until then
            awake.stop()
        if ks is not None:
            ks.close()
        # After every backing file is closed; a crash recovery that did not finish leaves the
        # record "mounted", so that the next mount recovers too.
        clean = served and recovered.is_set() and durable
        if clean:  # the record says "clean" only once what it vouches for is on disk
            syncfs(os.fsencode(cipherdir))
        lock.release(clean=clean)


def _run_deferred(fs: EncryptedFS, server: FsServer | Pyfuse3Server, stopping: threading.Event) -> None:
    """Write pending synced sizes and checkpoint closed files when their delay is over
    (openfiles.py) until unmount, which closes (and so writes and checkpoints) the rest."""
    while not stopping.is_set():
        try:
            due = fs.run_deferred(server.file_lock)
        except Exception:  # a content that failed stays pinned: the unmount tries again
            log.exception("a deferred checkpoint or state write failed")
            due = None
        stopping.wait(CHECKPOINT_DELAY if due is None else max(due - time.monotonic(), 0.01))


def _recover_all(fs: EncryptedFS, server: FsServer | Pyfuse3Server, done: threading.Event) -> None:
    """The last mount did not end cleanly: check every file now (each one also recovers at its
    first lookup), then let the lock record say so."""
    try:
        count, failed = fs.recover_all(server.lock.exclusive)
    except Exception:  # the next mount recovers again
        log.exception("crash recovery scan failed; the next mount runs it again")
        return
    if failed:
        log.error("crash recovery: %d of %d files could not be recovered on disk (first: %r); the next "
                  "mount tries again", len(failed), count, failed[0])
        return
    log.warning("crash recovery finished: %d files checked", count)
    done.set()


_NEEDS_PACKAGES = ("--server pyfuse3 needs the pyfuse3 and trio packages ({}); pyfuse3 builds against "
                   "libfuse3-dev (apt install libfuse3-dev pkg-config)")


def check_server(name: str) -> None:
    """The server ``name`` exists and, for pyfuse3, its packages are installed (found, not
    imported: the CLI process loads no libfuse; the daemon imports them in _server_class)."""
    if name not in SERVERS:
        raise MountError(f"unknown server {name!r} (one of: {', '.join(SERVERS)})")
    if name == "pyfuse3":
        missing = [p for p in ("pyfuse3", "trio") if importlib.util.find_spec(p) is None]
        if missing:
            raise MountError(_NEEDS_PACKAGES.format("missing: " + ", ".join(missing)))


def _server_class(name: str) -> type[FsServer | Pyfuse3Server]:
    check_server(name)
    if name == "pyfuse3":
        try:
            from encfs.fuse.pyfuse3server import Pyfuse3Server
        except ImportError as e:
            raise MountError(_NEEDS_PACKAGES.format(e.msg)) from None
        return Pyfuse3Server
    return FsServer


def mount(cipherdir: Path, mountpoint: Path, home: Path | None, hsm: HsmOptions, opts: MountOptions,
          foreground: bool, fake: bool = False) -> int:
    """`encfs mount`: returns once the mount is ready (daemonized unless foreground). ``fake``
    (mount(8)'s -f): every check below, then return without mounting."""
    cipherdir, mountpoint = cipherdir.absolute(), mountpoint.absolute()
    peek_config(cipherdir)  # fail early, before forking, on an obvious mistake
    check_mountpoint(mountpoint)
    mountlock.check(cipherdir, read_only=opts.read_only)  # the daemon takes the lock itself
    if opts.recovery_key is not None:  # a wrong key is told here, in one line (exit 77), not by the daemon
        open_by_recovery_key(cipherdir, opts.recovery_key, opts.recovery_key_file or "the recovery key")
    else:
        rewrap.refuse_if_interrupted(cipherdir)  # and checks again under it
    check_fuse_device()
    check_server(opts.server)
    for wanted, flag, why in ((opts.keep_cpu_awake, "--keep-cpu-awake", "libfuse's loop does not tell its helper of requests"),
                              (opts.io_uring, "--io-uring", "pyfuse3's libfuse 3.14 has no FUSE over io_uring")):
        if wanted and opts.server != "encfs":
            raise MountError(f"{flag} needs the encfs server: {why}")
    if opts.io_uring and not uring.supported():
        log.warning("FUSE over io_uring is off here (%s is not Y, or not x86-64): serving through /dev/fuse",
                    uring.ENABLE_PARAMETER)
    if fake:
        return 0
    if foreground:  # the log's destination, and stderr (the CLI's handler: warnings and errors)
        stderr = logging.getLogger().handlers[:]
        daemonlog.configure(opts.log_file, home or default_home(), daemonlog.log_id(mountpoint), "encfs",
                            keep=stderr, debug=opts.debug)  # --debug -f: the trace on stderr, as --help says
        try:
            serve(cipherdir, mountpoint, home, hsm, opts)
        finally:
            daemonlog.flush_pending()
        return 0
    if opts.recovery_key is None:  # by the recovery key no PIN is needed
        hsm = prompt_before_fork(home or default_home(), hsm)
    spawn(lambda ready: serve(cipherdir, mountpoint, home, hsm, opts, ready=ready), name="encfs",
          log_file=opts.log_file, error=MountError, state_dir=home or default_home(),
          log_id=daemonlog.log_id(mountpoint))
    return 0


def remount(cipherdir: Path, mountpoint: Path, read_only: bool, fake: bool = False) -> int:
    """``mount -o remount,ro|rw`` (mount.fuse3 runs ``encfs CIPHERDIR MOUNTPOINT -o remount,...``):
    the kernel flips the mount's read-only flag and the daemon goes on as it is. A daemon that
    serves read-only never writes, so remount,rw of it is refused. Root only (mount(2))."""
    cipherdir, mountpoint = cipherdir.absolute(), mountpoint.absolute()
    if mount_type(mountpoint) != "fuse.encfs":
        raise MountError(f"{mountpoint} is not an encfs mount: nothing to remount")
    if not read_only and not mountlock.serves_read_write(cipherdir, str(mountpoint)):
        raise MountError(f"{mountpoint} was mounted read-only: unmount it and mount it again to write")
    if fake:
        return 0
    try:
        remount_direct(str(mountpoint), read_only)
    except OSError as e:
        raise MountError(f"cannot remount {mountpoint}: {e.strerror}") from None
    return 0


def umount(mountpoint: Path) -> None:
    mountpoint = mountpoint.absolute()
    entry = topmost_mount(mountpoint)
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    source, fstype = entry.source, entry.fstype  # source: the CIPHERDIR (fsname)
    if fstype != "fuse.encfs":  # as root, fusermount3 -u would unmount anything
        raise MountError(f"{mountpoint} is a {fstype} mount, not an encfs one")
    proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise MountError(f"cannot unmount {mountpoint}: {last}")
    # The daemon still closes its files and marks the lock clean: return once it has, so that
    # a mount right after this (or a shutdown) finds the CIPHERDIR free and consistent.
    deadline = time.monotonic() + UNMOUNT_WAIT
    while source and mountlock.serves_read_write(Path(source), str(mountpoint)):
        if time.monotonic() > deadline:
            log.warning("%s is unmounted, but its daemon is still finishing after %d s", mountpoint, UNMOUNT_WAIT)
            break
        time.sleep(0.02)
