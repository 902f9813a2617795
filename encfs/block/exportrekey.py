"""``encfs rekey --full DIR`` for a snapshot export directory: a fresh export key, every object
re-encrypted, every manifest rewritten.

An export's objects are named by an HMAC under a key derived from the export key, so a fresh
key renames every object as well as re-sealing it: the directory is rebuilt beside DIR and the
two are swapped. The rebuild is an export (export.export_snapshot): each of DIR's snapshots is
read back from DIR (every object verified: authenticated and hashing to its name) and exported
into ``DIR.rekey.new``, with the same snapshot id, description, creation time and size, under a
new export key generated for the same volume id and wrapped by KEY (default: the CMK of DIR's
key). Then:

1. ``DIR.rekey.swap`` is written (write-fsync-rename): the SHA-256 of the new key file, which tells
   the two directories apart from then on;
2. DIR and ``DIR.rekey.new`` are exchanged by one renameat2(RENAME_EXCHANGE), and the parent
   directory is fsynced: DIR is the new export, whole, from that instant;
3. ``DIR.rekey.new`` (now the old export) is removed, then ``DIR.rekey.swap``.

A run killed at any moment is finished by the same command: with ``DIR.rekey.swap`` present,
whichever directory's key file it names is the new one (if DIR's, only step 3 is left; else
the exchange is). Without it, a ``DIR.rekey.new`` under the requested CMK is carried on, as an
export is (objects already there are kept, a snapshot whose manifest is there is skipped); any
other is removed and the rebuild starts again.

Invariants:
- DIR is never written (it is locked, as exports lock it, and only read) until the exchange,
  which swaps two complete exports at once: DIR is always a whole export, old or new.
- A manifest is in ``DIR.rekey.new`` only once every object it names is durable (export.py), and
  the exchange comes only after every snapshot's manifest is there.
- A failure that is reported (a damaged object, a full disk) leaves DIR as it was and removes
  ``DIR.rekey.new``; nothing unverified is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from encfs.atomicfile import remove_dead_temporaries, write_atomic
from encfs.block.export import export_snapshot, read_manifest, unwrap_key
from encfs.block.exportformat import (
    CHUNK_SECTORS,
    KEY_FILE,
    MANIFESTS,
    OBJECTS,
    SECTOR,
    ExportBusy,
    ExportError,
    ExportKeys,
    KeyFile,
    Manifest,
)
from encfs.diskio import RENAME_EXCHANGE, fsync_dir, renameat2
from encfs.filelock import lock_still_named
from encfs.keys.blob import CiphertextBlob
from encfs.keys.service import KeyService

_AHEAD = 4  # objects read ahead of the one being re-sealed


@dataclass(frozen=True)
class ExportRekeyed:
    key_id: str
    snapshots: list[str]
    objects_written: int
    bytes_read: int  # plaintext bytes read back from DIR's objects
    seconds: float
    resumed: bool


def new_path(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.rekey.new")


def swap_path(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.rekey.swap")


class ExportedSnapshot:
    """export.SnapshotSource over a snapshot in an export directory: each object is verified as
    it is read (ExportDamaged naming it, as import does)."""

    def __init__(self, directory: Path, keys: ExportKeys, manifest: Manifest, key_id: str,
                 pool: ThreadPoolExecutor) -> None:
        self.directory, self.keys, self.manifest, self.key_id = directory, keys, manifest, key_id
        self.volume_id, self.snapshot_id = manifest.volume_id, manifest.snapshot_id
        self.size, self.description, self.created = manifest.size, manifest.description, manifest.created
        self.bytes_read = 0
        self._pool = pool
        self._order = [i for i, name in enumerate(manifest.chunks) if name is not None]
        self._ahead: dict[int, Future[bytes | None]] = {}
        self._next = 0  # the next place in _order to read ahead

    def _read_object(self, index: int) -> bytes | None:
        name = self.manifest.chunks[index]
        assert name is not None
        try:
            return (self.directory / OBJECTS / name[:2] / name).read_bytes()
        except FileNotFoundError:
            return None

    def _sealed(self, index: int) -> bytes | None:
        """Object ``index``'s bytes, read by the pool a few objects ahead (the reads wait for the
        disk while this thread opens, names and seals the one before)."""
        while self._next < len(self._order) and len(self._ahead) < _AHEAD:
            i = self._order[self._next]
            self._ahead[i] = self._pool.submit(self._read_object, i)
            self._next += 1
        future = self._ahead.pop(index, None)
        return future.result() if future is not None else self._read_object(index)

    def written_runs(self) -> Iterator[tuple[int, int]]:
        for index, name in enumerate(self.manifest.chunks):
            if name is not None:
                yield index * CHUNK_SECTORS, self.manifest.chunk_length(index) // SECTOR

    def read_sectors(self, first: int, count: int) -> bytearray:
        index = first // CHUNK_SECTORS  # written_runs() gives whole chunks: export reads them so
        name = self.manifest.chunks[index]
        assert name is not None and first == index * CHUNK_SECTORS
        length = self.manifest.chunk_length(index)
        where = f"object {name} (chunk {index} of snapshot {self.snapshot_id}) in {self.directory}"
        sealed = self._sealed(index)
        if sealed is None:
            raise ExportError(f"{where} is missing; nothing was changed")
        plain = self.keys.open_object(name, sealed, length, where)
        self.bytes_read += len(plain)
        return bytearray(plain[:count * SECTOR])


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _exchange(a: Path, b: Path) -> None:
    """The switch (a seam of its own: the kill tests stop a run just before or after it)."""
    renameat2(a, b, RENAME_EXCHANGE)


def _finish(directory: Path, new: Path, swap: Path) -> None:
    """Step 3: remove the old export (at ``new`` since the exchange), then the marker."""
    if new.exists():
        shutil.rmtree(new)
    fsync_dir(directory.parent)
    swap.unlink(missing_ok=True)
    fsync_dir(directory.parent)


def _manifest_ids(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory / MANIFESTS) if not n.startswith("."))


def _cmk(key_file: Path) -> str:
    return str(CiphertextBlob.parse(KeyFile.parse(key_file.read_bytes(), str(key_file)).wrapped_key).header.key_id)


def rekey_export(directory: Path, ks: KeyService, key: str | None = None, dry_run: bool = False) -> ExportRekeyed:
    """Re-key the export in ``directory`` (see the module docstring)."""
    start = time.monotonic()
    new, swap = new_path(directory), swap_path(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    locked = -1
    try:
        if lock_still_named(fd, directory) is None:  # another run's lock, or its exchange came in between
            raise ExportBusy(f"{directory} is in use by another encfs export")
        if not dry_run:  # a run killed while writing the marker left its temporary: no other run writes one now
            remove_dead_temporaries(swap, locked=True)
        keys = unwrap_key(directory, ks)
        ids = _manifest_ids(directory)
        marked = swap.read_text().strip() if swap.exists() else None
        if marked is not None and marked == _digest(directory / KEY_FILE):  # exchanged: only step 3 is left
            if not dry_run:
                _finish(directory, new, swap)
            return ExportRekeyed(_cmk(directory / KEY_FILE), ids, 0, 0, time.monotonic() - start, True)
        if not ids:
            raise ExportError(f"{directory} holds no complete snapshot export: nothing to re-key")
        manifests = [read_manifest(directory, ks, sid) for sid in ids]  # each verified
        dest = str(ks.describe_key(key)["KeyId"]) if key else _cmk(directory / KEY_FILE)
        if dry_run:
            return ExportRekeyed(dest, ids, len({c for m in manifests for c in m.chunks if c}),
                                 sum(m.chunk_length(i) for m in manifests for i, c in enumerate(m.chunks) if c),
                                 time.monotonic() - start, new.exists())
        ready = marked is not None and marked == _digest(new / KEY_FILE) and _cmk(new / KEY_FILE) == dest
        if not ready:
            swap.unlink(missing_ok=True)  # stale: its exchange never came, and the copy is not as asked
        resumed = ready or _carry_on(new, dest, keys)
        written = read = 0
        try:
            if not ready:
                written, read = _rebuild(directory, new, ks, keys, manifests, dest)
                st = os.stat(directory)
                os.chown(new, st.st_uid, st.st_gid)
                os.chmod(new, st.st_mode & 0o7777)
                write_atomic(swap, (_digest(new / KEY_FILE) or "").encode() + b"\n", sync_dir=True)
            # Locked as DIR is: after the exchange it is DIR, and step 3 is this run's alone.
            locked = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(locked, fcntl.LOCK_EX)
            _exchange(directory, new)  # the switch: DIR is the new export from here on
        except BaseException:
            swap.unlink(missing_ok=True)
            shutil.rmtree(new, ignore_errors=True)
            raise
        try:
            fsync_dir(directory.parent)
            _finish(directory, new, swap)
        except OSError as e:
            raise ExportError(f"{directory} was re-keyed, but the old export at {new} could not be removed "
                              f"({e.strerror or e}): run the same command again") from None
        return ExportRekeyed(dest, ids, written, read, time.monotonic() - start, resumed)
    except OSError as e:
        raise ExportError(f"cannot re-key {directory}: {e.strerror or e}") from None
    finally:
        os.close(fd)
        if locked >= 0:
            os.close(locked)


def _carry_on(new: Path, dest: str, keys: ExportKeys) -> bool:
    """Whether an interrupted run's ``new`` can be carried on; if not, it is removed."""
    if not new.exists():
        return False
    try:
        if _cmk(new / KEY_FILE) == dest and KeyFile.parse((new / KEY_FILE).read_bytes(), "").volume_id \
                == keys.volume_id:
            return True
    except (OSError, ExportError, ValueError):
        pass  # cut before its key file was written, ...
    shutil.rmtree(new)
    return False


def _rebuild(directory: Path, new: Path, ks: KeyService, keys: ExportKeys, manifests: list[Manifest],
             dest: str) -> tuple[int, int]:
    """Export every snapshot of ``directory`` into ``new``; (objects written, plaintext bytes read)."""
    written = read = 0
    new_keys = unwrap_key(new, ks) if (new / KEY_FILE).exists() else None
    for m in manifests:
        if new_keys is not None:
            try:
                new_keys.open_manifest(m.snapshot_id, (new / MANIFESTS / m.snapshot_id).read_bytes())
                continue  # exported by the interrupted run: its objects are durable
            except (FileNotFoundError, ExportError):
                pass
        with ThreadPoolExecutor(2, thread_name_prefix="encfs-rekey-read") as pool:
            src = ExportedSnapshot(directory, keys, m, dest, pool)
            stats = export_snapshot(src, new, ks)  # ExportDamaged from src for an object that fails
        written += stats.objects_written
        read += src.bytes_read
        new_keys = new_keys or unwrap_key(new, ks)
    for extra in set(_manifest_ids(new)) - {m.snapshot_id for m in manifests}:
        (new / MANIFESTS / extra).unlink()  # DIR lost it since (it holds no other): the copy neither
    fsync_dir(new / MANIFESTS)
    return written, read
