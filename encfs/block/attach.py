"""Attaching volumes: a daemon serves the plaintext on a private FUSE mount,
and a loop device is attached to it.

Registry: ``/run/encfs/volumes/<volume id>.json`` (root only) records the
image, daemon pid, private mountpoint and loop device of each attached
volume; its daemon keeps ``<volume id>.errors`` beside it, the count of
requests it answered EIO (for `encfs status`), and ``<volume id>.flush-pending`` from
its start to a final flush that worked, ``<volume id>.flush-failed`` (one line, why) when
that flush failed: for detach to report. ``--name NAME`` adds
a stable link ``/dev/encfs/NAME`` (ENCFS_DEV_DIR) to the loop device;
``--read-only`` opens the image O_RDONLY and the loop device read-only.
Invariants:
- attach either ends with a loop device on a running daemon and a registry
  entry, or leaves nothing behind (no mount, no loop device, no entry);
- the daemon (voldaemon.py) never touches the token before it has forked
  (PKCS#11 sessions do not survive fork), and flushes the store when it ends;
- attaches in one registry run one at a time from their check of the entries
  to the saved entry (a POSIX lock beside the registry, which the forked
  daemon does not inherit): so a FUSE mount at the private mountpoint that no
  entry names is a killed daemon's, and attach detaches it (lazily) first;
- detach refuses while the loop device is mounted or open; it removes the
  loop device first, then the FUSE mount (the daemon then flushes and
  exits), then the entry; every wait is bounded; it fails (after all that,
  FlushLost) when the daemon's final flush failed, or when the daemon had to
  be killed before it: writes since the volume's last flush are then lost,
  never silently; the cleanup of a dead daemon's entry warns of a failed one;
- a name link exists only while its attachment's loop device does: it is made
  after the loop device is ready, and removed with the entry (detach, or the
  cleanup of a dead daemon's entry), and only if it still points at that loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.block.fuseserver import RESIZE_XATTR, fuse_unmount
from encfs.block.voldaemon import SideFiles, serve_volume
from encfs.block.volume import (
    FlushLost,
    ShrinkRefused,
    VolumeBusy,
    VolumeError,
    read_volume_header,
)
from encfs.daemon import proc_start, spawn
from encfs.filelock import WriterLock
from encfs.fuseproto.mounting import mount_table
from encfs.fuseproto.wire import MAX_WRITE
from encfs.keys.config import HsmOptions, default_home, prompt_before_fork

REGISTRY = Path(os.environ.get("ENCFS_RUN_DIR", "/run/encfs")) / "volumes"
LINK_DIR = Path(os.environ.get("ENCFS_DEV_DIR", "/dev/encfs"))
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Read-ahead of a volume's loop device. A sequential read keeps about this much in
# flight as 1 MiB requests that the server handles side by side, so the decryption of
# one overlaps the image reads of the next. The kernel would otherwise keep whatever the
# device number was last given (128 KiB over a FUSE file; 2560 KiB if it last served an
# image file on this disk); benchmarks/HISTORY.md, ac84bb2.
LOOP_READ_AHEAD_KIB = 8192
# Largest request the loop device sends: FUSE's largest (fuseproto.MAX_WRITE). A loop
# device allows 1280 KiB, which FUSE cuts into 1 MiB + 256 KiB, and such requests straddle
# the image's 1 MiB slot chunks, doubling requests and image reads (benchmarks/HISTORY.md, a4a3a50).
LOOP_MAX_REQUEST_KIB = MAX_WRITE // 1024
log = logging.getLogger("encfs.block")


@dataclass
class Attachment:
    volume_id: str
    image: str
    pid: int
    mountpoint: str
    loop: str
    started: int = 0  # the daemon's start time: a reused pid is not the daemon
    name: str = ""  # /dev/encfs/<name>, if attached with --name
    read_only: bool = False

    @property
    def entry(self) -> Path:
        return REGISTRY / f"{self.volume_id}.json"

    @property
    def link(self) -> Path | None:
        return LINK_DIR / self.name if self.name else None

    @property
    def side_files(self) -> SideFiles:
        """What its daemon keeps beside the mountpoint (voldaemon.py)."""
        return SideFiles(self.mountpoint)

    def final_flush_failure(self, killed: bool) -> str:
        """Why the daemon's final flush did not happen ("" if it did, or the daemon left no
        record: one of an older encfs); ``killed``: detach had to SIGKILL it."""
        try:
            return self.side_files.flush_failed.read_text().strip() or "see the daemon's log"
        except FileNotFoundError:
            pass
        except OSError as e:
            return f"its record is unreadable: {e.strerror}"
        if killed and self.side_files.flush_pending.exists():
            return "its daemon did not exit and was killed"
        return ""

    def errors(self) -> int | None:
        """Requests the daemon answered EIO since it started (it writes the count at
        most once a second); None if it keeps none (a daemon of an older encfs)."""
        try:
            return int(self.side_files.errors.read_text())
        except (OSError, ValueError):
            return None

    def daemon_alive(self) -> bool:
        start = proc_start(self.pid)
        return start is not None and (not self.started or start == self.started)


def attachments() -> list[Attachment]:
    out = []
    if REGISTRY.is_dir():
        for p in sorted(REGISTRY.glob("*.json")):
            try:
                out.append(Attachment(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue
    return out


def find_attachment(ref: str) -> Attachment | None:
    """By image path, loop device, volume id, name or name link."""
    real = os.path.realpath(ref)
    for a in attachments():
        if ref in (a.volume_id, a.loop) or real == os.path.realpath(a.image) \
                or (a.name and ref in (a.name, str(a.link))):
            return a
    return None


def live_attachment(volume_id: str) -> Attachment | None:
    """The attachment of volume ``volume_id`` if its daemon is alive (a record a killed
    daemon left is not one: the image is free)."""
    a = find_attachment(volume_id)
    return a if a is not None and a.daemon_alive() else None


def refuse_attached(image: Path, volume_id: str) -> None:
    """VolumeError, in one line, if the volume is attached: what needs it detached."""
    a = live_attachment(volume_id)
    if a is not None:
        raise VolumeBusy(f"{image} is attached at {a.loop}: detach it first (`encfs volume detach {a.loop}`)")


def check_name(name: str) -> str:
    """VolumeError unless ``name`` can name a link in /dev/encfs."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise VolumeError(f"bad volume name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ - (no slash)")
    return name


def _make_link(a: Attachment) -> None:
    """Point /dev/encfs/<name> at the loop device (atomically: a stale link is replaced)."""
    if a.link is None:
        return
    LINK_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = LINK_DIR / f".{a.name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(a.loop, tmp)
    tmp.replace(a.link)


def _remove_link(a: Attachment) -> None:
    if a.link is not None and a.loop:
        try:
            if os.readlink(a.link) == a.loop:  # not a link a later attachment made
                a.link.unlink()
        except OSError:
            pass


def _registry() -> Path:
    """The registry directory, created root-only (it also holds the private mountpoints)."""
    REGISTRY.mkdir(parents=True, exist_ok=True, mode=0o700)
    if REGISTRY.stat().st_mode & 0o077:
        REGISTRY.chmod(0o700)
    return REGISTRY


def _save(a: Attachment) -> None:
    _registry()
    write_atomic(a.entry, json.dumps(asdict(a)).encode(), 0o644)


def _is_mounted(path: str) -> bool:
    return any(m.mountpoint == path for m in mount_table())


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "unknown error"


def tune_loop(loop: str) -> bool:
    """Give block device ``loop`` (/dev/loopN) encfs's read-ahead (LOOP_READ_AHEAD_KIB) and
    largest request (LOOP_MAX_REQUEST_KIB, or the device's own limit if lower); False if
    sysfs refuses either (the device then works as it is, only slower)."""
    queue = f"/sys/block/{os.path.basename(loop)}/queue"
    try:
        with open(f"{queue}/max_hw_sectors_kb", encoding="ascii") as f:
            max_kib = min(LOOP_MAX_REQUEST_KIB, int(f.read()))
        for name, kib in (("read_ahead_kb", LOOP_READ_AHEAD_KIB), ("max_sectors_kb", max_kib)):
            with open(f"{queue}/{name}", "w", encoding="ascii") as f:
                f.write(f"{kib}\n")
        return True
    except (OSError, ValueError) as e:
        log.warning("queue settings of %s left as they are: %s", loop, getattr(e, "strerror", None) or e)
        return False


def attach(image: Path, home: Path | None, hsm: HsmOptions, log_file: str | None = None,
           accept_rollback: bool = False, expected_key: str | None = None, name: str = "",
           read_only: bool = False, recovery_key: bytes | None = None) -> Attachment:
    """``recovery_key``: the daemon opens the volume with it, without the token (recovery.py)."""
    if os.geteuid() != 0:
        raise VolumeError("attaching a volume needs root (loop devices)")
    if name:
        check_name(name)
    image = image.absolute()
    header, _warnings = read_volume_header(image)  # fail fast on a bad image, before forking
    vid = header.volume_id.hex()
    _claim(vid, image, name, clean=False)  # refused before a PIN is asked for
    if recovery_key is None:  # no PIN to ask for: the token is not used
        hsm = prompt_before_fork(home or default_home(), hsm)
    with _attach_lock().held():
        _claim(vid, image, name, clean=True)
        return _attach_claimed(image, vid, home, hsm, log_file, accept_rollback, expected_key, name, read_only,
                               recovery_key)


def _claim(vid: str, image: Path, name: str, clean: bool) -> None:
    """Refuse a volume (or name) attached to a live daemon; with ``clean``, remove what a dead
    daemon left (its entry, loop device and mount)."""
    existing = find_attachment(vid)
    if existing is not None:
        if existing.daemon_alive():
            raise VolumeError(f"volume {image} is already attached as {existing.loop}")
        if clean:
            _cleanup(existing)  # a crashed daemon left its entry behind
    for other in attachments() if name else []:
        if other.name == name:
            if other.daemon_alive():
                raise VolumeBusy(f"volume name {name} is in use by {other.image} ({other.loop})")
            if clean:
                _cleanup(other)


def _attach_lock() -> WriterLock:
    """One attach at a time per registry, from its check of the entries to its saved entry: a second
    attach of a volume then finds the first one's entry, never its mount not yet registered (which it
    would take for a dead daemon's). A POSIX lock: the forked daemon does not inherit it."""
    return WriterLock(_registry().parent / "volumes.lock", "the volume registry", posix=True)


def _attach_claimed(image: Path, vid: str, home: Path | None, hsm: HsmOptions, log_file: str | None,
                    accept_rollback: bool, expected_key: str | None, name: str, read_only: bool,
                    recovery_key: bytes | None) -> Attachment:
    mountpoint = str(_registry() / vid)
    if _is_mounted(mountpoint):  # a daemon killed before its entry was saved: its dead mount fails stat()
        _unmount_lazily(mountpoint)
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    side = SideFiles(mountpoint)
    for stale in (side.flush_failed, side.flush_pending):
        stale.unlink(missing_ok=True)
    try:
        pid = spawn(lambda ready: serve_volume(image, mountpoint, home, hsm, ready, accept_rollback,
                                               expected_key, read_only, recovery_key),
                    name="encfs-volume", log_file=log_file, error=VolumeError,
                    state_dir=home or default_home(), log_id=f"volume-{vid}")
    except VolumeError:
        if _is_mounted(mountpoint):  # the daemon mounted, then died (spawn has reaped it)
            with contextlib.suppress(VolumeError):  # its own error is the one to report
                _unmount_lazily(mountpoint)
        _forget(Attachment(vid, str(image), 0, mountpoint, ""))
        raise
    a = Attachment(vid, str(image), pid, mountpoint, "", proc_start(pid) or 0, name, read_only)
    # Direct I/O: the loop device keeps several requests in flight (the server reads them in
    # parallel), and the volume's plaintext is cached once, above the loop device.
    proc = _run(["losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on",
                 *(["--read-only"] if read_only else []), f"{mountpoint}/volume"])
    if proc.returncode != 0:
        _stop_daemon(a)
        _forget(a)
        raise VolumeError(f"no loop device could be attached: {_last_line(proc.stderr)}")
    a.loop = proc.stdout.strip()
    tune_loop(a.loop)
    try:
        _make_link(a)
    except OSError as e:
        _cleanup(a)
        raise VolumeError(f"cannot make {a.link}: {e.strerror}") from None
    _save(a)
    return a


def _unmount_lazily(mountpoint: str) -> None:
    try:
        fuse_unmount(mountpoint, lazy=True)
    except OSError as e:
        raise VolumeError(f"cannot detach the mount a dead daemon left at {mountpoint}: {e.strerror}") from None


def _wait_gone(a: Attachment, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(a.pid, os.WNOHANG)  # reap it if it is our own child
        except ChildProcessError:
            pass
        if not a.daemon_alive():
            return True
        time.sleep(0.05)
    return False


def _stop_daemon(a: Attachment) -> bool:
    """Unmount the private FUSE mount; the daemon flushes and exits. Escalate if it does not;
    False if it had to be killed (SIGKILL: no final flush)."""
    if _is_mounted(a.mountpoint):
        for _ in range(50):
            try:
                fuse_unmount(a.mountpoint)
                break
            except OSError:
                time.sleep(0.1)  # the loop device may still be releasing its file
        else:
            fuse_unmount(a.mountpoint, lazy=True)
    for sig, timeout in ((None, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if sig is not None:
            if not a.daemon_alive():
                return True
            try:
                os.kill(a.pid, sig)
            except ProcessLookupError:
                return True
        if _wait_gone(a, timeout):
            return sig != signal.SIGKILL
    return False


def _cleanup(a: Attachment) -> None:
    if a.side_files.flush_failed.exists():  # the entry goes: its record with it, so say it now
        log.warning("the last daemon of %s could not flush at its end: writes before that were lost", a.image)
    if a.loop and _loop_backing(a.loop) == f"{a.mountpoint}/volume":
        _run(["losetup", "-d", a.loop])
    if a.daemon_alive():
        _stop_daemon(a)
    elif _is_mounted(a.mountpoint):
        fuse_unmount(a.mountpoint, lazy=True)
    _forget(a)


def _forget(a: Attachment) -> None:
    """Remove the name link, the registry entry and the (unmounted) private mountpoint."""
    _remove_link(a)
    side = a.side_files
    for record in (side.errors, side.flush_failed, side.flush_pending):
        record.unlink(missing_ok=True)
    a.entry.unlink(missing_ok=True)
    if not _is_mounted(a.mountpoint):
        try:
            os.rmdir(a.mountpoint)
        except OSError:
            pass


def mounts_of(device: str) -> list[str]:
    """Where ``device`` is mounted (paths as the kernel names them, escapes undone)."""
    return [m.mountpoint for m in mount_table() if m.source == device]


def _openers(device: str) -> list[str]:
    """Who else has ``device`` open: stacked block devices and processes (by /proc/*/fd links,
    read with readlink only: stat() of a file on a hung FUSE mount would hang)."""
    name = os.path.basename(device)
    try:
        out = [f"block device {h}" for h in sorted(os.listdir(f"/sys/class/block/{name}/holders"))]
    except OSError:
        out = []
    real, me = os.path.realpath(device), str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target == real:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                out.append(f"pid {pid} ({comm})")
                break
    return out


def _loop_backing(loop: str) -> str:
    proc = _run(["losetup", "-n", "-O", "BACK-FILE", loop])
    return proc.stdout.strip() if proc.returncode == 0 else ""


def detach(ref: str) -> Attachment:
    a = find_attachment(ref)
    if a is None:
        raise VolumeError(f"{ref} is not an attached encfs volume")
    users = mounts_of(a.loop)
    if users:
        raise VolumeBusy(f"{a.loop} is in use (mounted on {users[0]}): unmount it first")
    holders = _openers(a.loop) if a.loop else []
    deadline = time.monotonic() + 2
    while holders and time.monotonic() < deadline:  # e.g. udev probing the device for a moment
        time.sleep(0.1)
        holders = _openers(a.loop)
    if holders:
        raise VolumeBusy(f"{a.loop} is in use (open by {holders[0]}): close it first")
    if _loop_backing(a.loop) == f"{a.mountpoint}/volume":
        proc = _run(["losetup", "-d", a.loop])
        if proc.returncode != 0:
            raise VolumeError(f"cannot detach {a.loop}: {_last_line(proc.stderr)}")
        for _ in range(100):  # the loop device lets go of its file asynchronously
            if _loop_backing(a.loop) != f"{a.mountpoint}/volume":
                break
            time.sleep(0.05)
    failure = a.final_flush_failure(killed=not _stop_daemon(a))
    _forget(a)
    if failure:
        raise FlushLost(f"{a.loop} is detached, but the volume's final flush failed ({failure}): "
                        "writes since its last flush are lost")
    return a


def grow_attached(a: Attachment, new_size: int) -> None:
    """Online grow: the daemon grows the image and header, then the loop device learns the size."""
    header, _w = read_volume_header(Path(a.image))
    if new_size < header.size:
        raise ShrinkRefused()
    try:
        os.setxattr(f"{a.mountpoint}/volume", RESIZE_XATTR, str(new_size).encode())
    except OSError as e:
        raise VolumeError(f"online resize of {a.image} failed: {e.strerror} (see the daemon log)") from None
    proc = _run(["losetup", "--set-capacity", a.loop])
    if proc.returncode != 0:
        raise VolumeError(f"{a.loop} did not take the new size: {_last_line(proc.stderr)}")
