"""The daemon of an attached volume (attach.py forks it): it unlocks the volume, serves its
plaintext as one file on a private FUSE mount, and flushes the store when it ends.

Invariants:
- It touches the token only after the fork (PKCS#11 sessions do not survive fork), and marks
  itself PR_SET_IO_FLUSHER: it serves the writeback of the loop device on its file.
- Beside the mountpoint it keeps (SideFiles names them) ``.errors`` (the count of requests
  answered EIO, for `encfs status`, replaced whole: atomicfile), ``.flush-pending`` from its
  start until a final flush that worked, and ``.flush-failed`` (one line, why) when that flush
  failed: `volume detach` reports them.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.block.fuseserver import VolumeFile, VolumeServer, fuse_mount
from encfs.block.volume import open_volume
from encfs.cliargs import open_service
from encfs.daemon import Readiness, keep_secrets_in_memory
from encfs.keys.config import HsmOptions

log = logging.getLogger("encfs.block")

PR_SET_IO_FLUSHER = 57


@dataclass(frozen=True)
class SideFiles:
    """The files the daemon keeps beside its mountpoint (see the Invariants); attach.py reads
    and removes them."""

    mountpoint: str

    @property
    def errors(self) -> Path:
        return Path(f"{self.mountpoint}.errors")

    @property
    def flush_pending(self) -> Path:
        return Path(f"{self.mountpoint}.flush-pending")

    @property
    def flush_failed(self) -> Path:
        return Path(f"{self.mountpoint}.flush-failed")


def serve_volume(image: Path, mountpoint: str, home: Path | None, hsm: HsmOptions, ready: Readiness,
                 accept_rollback: bool = False, expected_key: str | None = None, read_only: bool = False,
                 recovery_key: bytes | None = None) -> None:
    """The daemon: unlock the volume, mount its FUSE file, serve until unmounted or SIGTERM."""
    keep_secrets_in_memory()
    ctypes.CDLL(None).prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    if recovery_key is not None:  # no token, no PKCS#11 module: the recovery record holds the key
        vol = open_volume(image, None, seal_worker=not read_only, accept_rollback=accept_rollback,
                          read_only=read_only, recovery_key=recovery_key)
    else:
        with open_service(home, hsm) as ks:
            vol = open_volume(image, ks, seal_worker=not read_only, accept_rollback=accept_rollback,
                              expected_key=expected_key, read_only=read_only)
    server: VolumeServer | None = None
    side = SideFiles(mountpoint)
    try:
        server = VolumeServer(fuse_mount(mountpoint, f"encfs:{image}"), vol, name=str(image))
        signal.signal(signal.SIGTERM, lambda *_: server.stop() if server is not None else None)
        stop = threading.Event()
        threading.Thread(target=_publish_errors, args=(server, side.errors, stop), daemon=True,
                         name="encfs-errors").start()
        side.flush_pending.touch()
        ready.ok()
        try:
            server.serve()
        finally:
            stop.set()
    finally:
        _final_flush(vol, server, side)
        vol.close()


def _final_flush(vol: VolumeFile, server: VolumeServer | None, side: SideFiles) -> None:
    """The daemon's last flush; its outcome left beside the mountpoint for detach."""
    try:
        if server is not None:
            server.final_flush()
        else:
            vol.flush()
    except Exception as e:  # noqa: BLE001 - whatever it was, detach must learn that it failed
        why = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        log.error("final flush failed (%s): writes since the last flush are lost", why)
        try:
            side.flush_failed.write_text(f"{why}\n")
        except OSError as e2:  # the pending record stays: detach still learns of a failure
            log.error("cannot leave the flush failure for detach: %s", e2.strerror)
        return
    side.flush_pending.unlink(missing_ok=True)


def _publish_errors(server: VolumeServer, path: Path, stop: threading.Event) -> None:
    """Keep ``path`` holding the server's error count, rewritten at most once a second."""
    written = None
    while True:
        if server.io_errors != written:
            written = server.io_errors
            try:
                write_atomic(path, f"{written}\n".encode(), 0o644)
            except OSError as e:
                log.warning("cannot publish the error count in %s: %s", path, e.strerror)
        if stop.wait(1):
            return
