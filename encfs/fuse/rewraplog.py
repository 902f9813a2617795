"""The bookkeeping files of ``encfs rekey CIPHERDIR`` (rewrap.py, the run itself): the marker
``encfs.rekey`` of a run under way and its redo log ``encfs.rekey.redo``, docs/FORMAT.md §6.9.

The marker (JSON: version, operation "rewrap" or "full", the destination CMK, whether a crash
recovery is due at the next mount, and ``"adding"`` for an `encfs recovery-key add`, recovery.py)
is written before the first header changes and removed last; the redo log holds one batch's new
128-byte headers (backing path relative to CIPHERDIR, header, the file's atime and mtime from before
the run), with a SHA-256 digest of the whole.
Both are written by write-fsync-rename. This module packs, parses, writes, replays and removes
them; when they are written, and in what order against the headers and config copies, is
rewrap.py's.

A mount that finds the marker refuses, in one line that says to run ``encfs rekey
CIPHERDIR`` again (refuse_if_interrupted, also for read-only mounts): the filesystem is
not served while its headers may be under two CMKs. A mount by the recovery key is the
exception (recovery.py): it asks no CMK, and ``--recovery-key`` runs take any marker over. Running the command again (with or
without ``--key``: without, it goes on to the CMK the marker names; ``--full`` if the marker
says "full") finishes the job.

Invariants:
- A redo log is used whole or not at all: parse_redo refuses one whose digest or records do
  not add up (it is written by rename, so that is damage, not a torn write).
- replay completes a header only if the file's first PREFIX bytes (magic, version, key source,
  file id) are the logged header's: a header and its re-wrapped version share them, so a torn
  128-byte write is recognised by them and completed; a file whose header no longer starts that
  way (gone, or replaced) is left alone. The log goes only after a syncfs made its headers durable.
- Every file replay completes gets the times its record kept, also one whose header the killed run
  wrote but had not yet given its times back: a re-wrap changes no contents (backingtimes.py).
- A damaged marker stands for a run to the CMK given (which must then be given); a marker of
  another version or operation is refused, never taken for one of this version.
- Removing bookkeeping files ends with an fsync of CIPHERDIR: once _remove returns, they stay gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from encfs.atomicfile import write_atomic
from encfs.diskio import fsync_dir, pwrite_all, syncfs
from encfs.errors import EncfsError, MountError
from encfs.fuse.backingdirs import open_under
from encfs.fuse.backingtimes import keep_times, times_of
from encfs.fuse.fileheader import HEADER_LEN
from encfs.fuse.fsconfig import REKEY_MARKER

MARKER = REKEY_MARKER  # "encfs.rekey"
REDO = "encfs.rekey.redo"
DONE_LOG = "encfs.rekey.done"  # fullrekey.DONE
MARKER_VERSION = 1
REWRAP, FULL = "rewrap", "full"  # the marker's ``operation``
REDO_MAGIC, REDO_VERSION = b"ENCW", 2  # version 1 (no times) is still read: a run of an older encfs
_REDO_HEAD = struct.Struct(">4sB3xI")  # magic, version, 3 zero bytes, record count
_PATH_LEN = struct.Struct(">H")
_TIMES = struct.Struct(">qq")  # version 2: atime and mtime in ns (signed: before 1970 too)
Times = tuple[int, int]  # backingtimes.times_of
_DIGEST = 32  # SHA-256 of everything before it
PREFIX = 22  # magic, version, reserved, file id: the same before and after a re-wrap


class RewrapError(EncfsError):
    """A filesystem re-wrap failed or left damaged headers as they were."""


def refuse_if_interrupted(cipherdir: Path) -> None:
    """MountError in one line if a re-key of ``cipherdir`` was interrupted (its marker exists)."""
    if os.path.lexists(cipherdir / MARKER):
        try:
            full = json.loads((cipherdir / MARKER).read_bytes()).get("operation") == FULL
        except (OSError, ValueError, AttributeError):
            full = False
        command = f"encfs rekey{' --full' if full else ''} {cipherdir}"
        raise MountError(f"{cipherdir}: a re-key (`encfs rekey`) was interrupted and its headers may be under two "
                         f"CMKs: run `{command}` again to finish it, then mount")


# -- the redo log and the marker (FORMAT.md §6.9) -----------------------------------------------------

def pack_redo(entries: list[tuple[bytes, bytes, Times]]) -> bytes:
    """The redo log of ``entries`` (backing path relative to CIPHERDIR, new 128-byte header, the
    file's (atime, mtime) before its header changes)."""
    parts = [_REDO_HEAD.pack(REDO_MAGIC, REDO_VERSION, len(entries))]
    for rel, header, times in entries:
        assert len(header) == HEADER_LEN and not os.path.isabs(rel)
        parts += [_PATH_LEN.pack(len(rel)), rel, header, _TIMES.pack(*times)]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def parse_redo(data: bytes, where: str) -> list[tuple[bytes, bytes, Times | None]]:
    """Its records (the times None in a version-1 log); RewrapError if the log is not whole (it is
    written by rename: damage, not a torn write)."""
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if len(data) < _REDO_HEAD.size + _DIGEST or hashlib.sha256(body).digest() != digest:
        raise RewrapError(f"{where} is damaged (its digest does not match): restore it from a backup")
    magic, version, count = _REDO_HEAD.unpack_from(body)
    if magic != REDO_MAGIC or version not in (1, REDO_VERSION):
        raise RewrapError(f"{where} is not an encfs re-key redo log of version {REDO_VERSION}: upgrade encfs")
    entries: list[tuple[bytes, bytes, Times | None]] = []
    pos = _REDO_HEAD.size
    for _ in range(count):
        (n,) = _PATH_LEN.unpack_from(body, pos)
        rel, header = body[pos + 2:pos + 2 + n], body[pos + 2 + n:pos + 2 + n + HEADER_LEN]
        pos += 2 + n + HEADER_LEN
        times = None
        if version > 1:
            if pos + _TIMES.size > len(body):
                raise RewrapError(f"{where} is damaged (its records do not add up)")
            times = _TIMES.unpack_from(body, pos)
            pos += _TIMES.size
        entries.append((rel, header, times))
    if pos != len(body) or any(len(h) != HEADER_LEN or os.path.isabs(r) or b".." in r.split(b"/")
                               for r, h, _t in entries):
        raise RewrapError(f"{where} is damaged (its records do not add up)")
    return entries


def read_marker(cipherdir: Path, dest_key: str | None, operation: str) -> dict[str, Any] | None:
    """The marker of an interrupted run, if any. A damaged one stands for a run to ``dest_key``
    (which must then be given: the CMK the interrupted run moved to)."""
    try:
        raw = (cipherdir / MARKER).read_bytes()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("key_id"), str):
        if dest_key is None:
            raise RewrapError(f"{cipherdir / MARKER} (an interrupted re-key's marker) is damaged: run `encfs rekey "
                              f"--key KEY {cipherdir}` with the CMK that re-key moved to")
        return {"version": MARKER_VERSION, "operation": operation, "key_id": dest_key, "recovering": True}
    if marker.get("version") != MARKER_VERSION or marker.get("operation") not in (REWRAP, FULL):
        raise RewrapError(f"{cipherdir / MARKER} is of version {marker.get('version')!r}, unknown here: upgrade encfs")
    return marker


def _write_marker(cipherdir: Path, operation: str, key_id: str, recovering: bool, adding: bool = False) -> None:
    """``adding``: the marker of an `encfs recovery-key add` (FORMAT.md §6.10): files may still have
    random keys, and of two config copies differing only by the recovery key the one with it wins."""
    body: dict[str, Any] = {"version": MARKER_VERSION, "operation": operation, "key_id": key_id,
                            "recovering": recovering}
    if adding:
        body["adding"] = True
    write_atomic(cipherdir / MARKER, (json.dumps(body) + "\n").encode(), 0o644, sync_dir=True)


def replay(cipherdir: Path) -> set[bytes]:
    """Complete the headers of the redo log left by an interrupted run (then drop the log);
    returns the paths (relative to CIPHERDIR) of those it (re)wrote."""
    root = os.fsencode(cipherdir)
    try:
        data = (cipherdir / REDO).read_bytes()
    except FileNotFoundError:
        return set()
    written = set()
    for rel, new, times in parse_redo(data, str(cipherdir / REDO)):
        try:
            fd = open_under(root, os.path.join(root, rel), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            now = os.pread(fd, HEADER_LEN, 0)
            if now[:PREFIX] != new[:PREFIX]:
                continue
            if times is None:  # a version-1 log kept none: the file's own, as it is
                times = times_of(fd)
            if now != new:
                pwrite_all(fd, new, 0)
                written.add(rel)
            keep_times(fd, times, rel)  # the killed run may have written the header, not its times
        finally:
            os.close(fd)
    syncfs(root)
    os.unlink(cipherdir / REDO)
    fsync_dir(root)
    return written


def _remove(cipherdir: Path, root: str | bytes, names: tuple[str, ...]) -> None:
    """Remove these bookkeeping files (those that exist), then make that durable."""
    for name in names:
        try:
            os.unlink(cipherdir / name)
        except FileNotFoundError:
            pass
    fsync_dir(root)
