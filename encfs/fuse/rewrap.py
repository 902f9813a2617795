"""``encfs rekey CIPHERDIR``: every wrapped key of a filesystem moves to another CMK (or to
its CMK's newest backing-key version), and no content block is rewritten (``--full``: then
fresh data keys as well, fullrekey.py).

What is wrapped by the CMK: each regular file's data key unless it is derived (filekeys.py:
it moves with the secret), in its 128-byte header
(fileheader.py; context ``config.file_context(file id)``), the same in the header of a
complete re-key side file ``encfs.journal/<id>.rekey`` (a later mount copies it in,
rekeyfile.py), and the filesystem secret (and a recovery root, recoverykeys.py) in both config copies. Names, symlink targets,
xattrs and directory ids are sealed under keys derived from the secret, which stays the
same. Each blob moves by ReEncrypt in the key service: no data key leaves it.

A run, under the mount lock for its whole length (mode "rekey": nothing mounts meanwhile,
and a mounted CIPHERDIR is refused), docs/FORMAT.md §6.9:

1. A marker ``encfs.rekey`` found from an interrupted run: its redo log is replayed first.
2. Scan: every header not under the destination is to move.
3. Per batch of up to BATCH headers: re-wrap them; write the marker (once, before the first
   header changes); write the batch's new headers to ``encfs.rekey.redo``
   (write-fsync-rename); write them in place; syncfs (one flush for the whole batch, not
   an fsync per file: the cost grows with the number of files, not their bytes).
4. The config copies, the backup first, each by write-fsync-rename.
5. ``encfs.rekey.redo`` and then ``encfs.rekey`` are removed (fsync of the directory).

With ``--full`` (operation "full" in the marker), every file then gets a fresh data key,
one file at a time (fullrekey.py); the marker stays until the last one is done.

The marker and the redo log (their formats, their replay, and the refusal of mounts while
the marker exists, which running the command again ends) are rewraplog.py's; this module
decides when they are written and removed.

Invariants:
- Every header on disk is whole and unwraps under the CMK it was under before, or under
  the destination: a header is written in place only once its new version is durable in
  the redo log, and a resumed run replays the log (rewraplog.replay, which completes a torn
  header write) before reading any header.
- A redo log is replaced by the next batch's only after syncfs made its batch durable.
- The config copies change after every header, and only while the marker exists; two
  copies of an interrupted run hold the same secret under two CMKs, and
  ``open_config(rewrap_to=...)`` takes the one under the marker's CMK.
- The marker goes last (with ``--full``, after the last file's fresh key): while it exists, a
  run resumes. A run that fails before changing anything (an unknown or disabled key)
  writes no marker.
- Nothing is written with ``dry_run``. When every blob is under the destination already,
  nothing is written but what a read-write mount would repair too (a damaged or missing
  config copy, a format-1 config's upgrade; leftover temporary files are removed).
- A header that cannot be parsed or unwrapped (damaged: its file was unreadable before) is
  left as it is and reported; the others move and the run ends non-zero.
- The mount lock's record keeps saying "mounted" if the last mount before the first run did
  not end cleanly (the marker remembers it), so that the next mount still runs its crash
  recovery.
"""

from __future__ import annotations

import errno
import os
import re
import stat as stat_m
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from encfs.atomicfile import write_atomic
from encfs.block.rewrap import destination
from encfs.diskio import pwrite_all, syncfs
from encfs.errors import ContextMismatch, EncfsError, InvalidCiphertext, KeyNotFound, UsageError
from encfs.fuse import rekeyfile
from encfs.fuse.backingdirs import BackingDirs, open_under
from encfs.fuse.backingtimes import keep_times, times_of
from encfs.fuse.fileheader import HEADER_LEN, FileHeader, HeaderError
from encfs.fuse.fsconfig import (
    BACKUP_NAME,
    CONFIG_NAME,
    FS_FORMAT,
    FsConfig,
    OpenedConfig,
    open_config,
    peek_config,
    sealed_config_bytes,
)
from encfs.fuse.mountlock import REKEY_MODE, MountLock
from encfs.fuse.names import is_internal
from encfs.fuse.recoverykeys import file_key, key_opens_file
from encfs.fuse.rewraplog import (
    DONE_LOG,
    FULL,
    MARKER,
    MARKER_VERSION,
    PREFIX,
    REDO,
    REDO_MAGIC,
    REDO_VERSION,
    REWRAP,
    RewrapError,
    Times,
    _remove,
    _write_marker,
    pack_redo,
    parse_redo,
    read_marker,
    refuse_if_interrupted,
    replay,
)
from encfs.keys.blob import CiphertextBlob
from encfs.keys.service import KeyService
from encfs.progress import progress

BATCH = 2048  # headers per redo log (one write-fsync-rename and one syncfs each)
_LEFTOVER = re.compile(rb"(encfs\.rekey(\.redo)?|encfs\.conf(\.bak)?)\.tmp\.[0-9]+")  # write_atomic's


@dataclass
class FsRewrapped:
    """What a re-wrap of a filesystem did (or, with dry_run, would do)."""

    target: Path
    from_key: str
    from_version: int
    to_key: str
    to_version: int
    files: int = 0  # file headers moved (or that would move), a resumed run's replay included
    config: bool = False  # the filesystem secret moved (both copies)
    resumed: bool = False  # an interrupted run was found (and, unless dry_run, finished)
    damaged: list[str] = field(default_factory=list)  # headers left as they were
    seconds: float = 0.0
    full: bool = False  # --full: fresh data keys (fullrekey.py)
    fs_id: str = ""
    fresh: int = 0  # files given a fresh data key (or that would be)
    resealed: int = 0  # their backing bytes

    @property
    def changed(self) -> bool:
        return bool(self.files or self.config or self.resumed)

    @property
    def wrapped_keys(self) -> int:
        return self.files + int(self.config)


# -- the scan ------------------------------------------------------------------------------------------

def backing_files(root: bytes) -> Iterator[bytes]:
    """Paths (relative to ``root``) of every regular backing file with a header, each inode once,
    then the complete re-key side files."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root):  # by dir fds: paths past PATH_MAX
        dirnames[:] = [d for d in dirnames if not is_internal(d)]
        for name in filenames:
            if is_internal(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if stat_m.S_ISREG(st.st_mode) and st.st_size and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                yield os.path.relpath(path, root)


def _read_header(root: bytes, rel: bytes) -> FileHeader:
    """HeaderError if it is not a header (or too short to be one)."""
    return _header_and_times(root, rel)[0]


def _header_and_times(root: bytes, rel: bytes) -> tuple[FileHeader, Times]:
    """The file's header and its (atime, mtime); HeaderError if it is not a header."""
    fd = open_under(root, os.path.join(root, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return FileHeader.parse(os.pread(fd, HEADER_LEN, 0)), times_of(fd)
    finally:
        os.close(fd)


def where(blob: bytes) -> tuple[str, int]:
    """The CMK and backing-key version a blob is under (ValueError if it is not a blob)."""
    header = CiphertextBlob.parse(blob).header
    return str(header.key_id), header.key_version


def _to_move(root: bytes, dest: tuple[str, int], read_only: bool,
             damaged: list[str]) -> list[bytes]:
    side_files = [os.path.relpath(rekeyfile.side_file(root, i), root) for i in rekeyfile.pending(root, read_only)]
    moving = []
    for rel in [*backing_files(root), *side_files]:
        try:
            header = _read_header(root, rel)
            if not header.derived and where(header.wrapped_key) != dest:  # a derived key moves with the secret
                moving.append(rel)
        except (HeaderError, ValueError, EncfsError):
            damaged.append(os.fsdecode(rel))
    return moving


# -- the run -------------------------------------------------------------------------------------------

def rewrap_filesystem(cipherdir: Path, ks: KeyService, dest_key: str | None, dry_run: bool = False,
                      full: bool = False, recovery_key: tuple[bytes, str] | None = None,
                      held: MountLock | None = None) -> FsRewrapped:
    """Move every wrapped key of ``cipherdir`` under ``dest_key`` (None: the CMK of the config,
    or of an interrupted run's marker, at its newest version); see the module docstring.
    ``full``: then give every file a fresh data key (fullrekey.py). ``recovery_key`` (the key
    and its file's name): the old CMK is not asked at all; the secret and recovery root come
    from the recovery wrapping and every file key is derived (recoverykeys.py), then encrypted
    under ``dest_key``, which must be given (recovery.py). ``held``: the caller's read-write
    lock (``encfs recovery-key add``), kept across its own change and this run, and released by
    the caller: taking it again would find its own record "mounted" by a live pid."""
    if recovery_key is not None and (dest_key is None or full):
        raise UsageError("--recovery-key moves the filesystem to the CMK of --key, without --full")
    start = time.monotonic()
    peek_config(cipherdir)  # an encfs filesystem: only then may its lock file be created
    lock = held if held is not None else MountLock.acquire(cipherdir, "-", read_only=dry_run, mode=REKEY_MODE)
    recovering = lock.recovering  # for a read-write lock: a crash recovery is due at the next mount
    try:
        wanted = str(ks.describe_key(dest_key)["KeyId"]) if dest_key is not None else None  # not an alias
        marker = read_marker(cipherdir, wanted, FULL if full else REWRAP)
        if marker is not None:  # this run's own kill made the lock say "recovering": the marker knows
            recovering = bool(marker.get("recovering", True))
            if marker["operation"] == FULL and not full and recovery_key is None:  # by the recovery key: see _run
                raise RewrapError(f"{cipherdir}: an interrupted `encfs rekey --full` is finished by running "
                                  f"`encfs rekey --full {cipherdir}` again")
        done = _run(cipherdir, ks, dest_key, marker, recovering, dry_run, FULL if full else REWRAP, recovery_key)
        if full:
            _full(cipherdir, ks, done, recovering, dry_run)
        if not dry_run and not done.damaged:  # every blob of the filesystem is under the destination
            ks.usage.forget(f"fs:{done.fs_id}", (done.to_key, done.to_version))
    finally:
        if held is None:
            lock.release(clean=not recovering)
    done.seconds = time.monotonic() - start
    return done


def _full(cipherdir: Path, ks: KeyService, done: FsRewrapped, recovering: bool, dry_run: bool) -> None:
    from encfs.fuse.fullrekey import DONE, fresh_keys

    root = os.fsencode(cipherdir)
    files = list(backing_files(root))
    done.full = True
    if dry_run:
        done.fresh = len(files)
        with BackingDirs(root) as bd:
            done.resealed = sum(bd.lstat(os.path.join(root, rel)).st_size for rel in files)
        return
    try:
        done.fresh, done.resealed = fresh_keys(cipherdir, ks, recovering, files)
        _remove(cipherdir, root, (DONE, REDO, MARKER))
    except (EncfsError, OSError) as e:
        cause = e.message if isinstance(e, EncfsError) else f"{cipherdir}: {_what(e)}"
        raise RewrapError(cause + _AGAIN.format("--full " + str(cipherdir))) from None


def _run(cipherdir: Path, ks: KeyService, dest_key: str | None, marker: dict[str, Any] | None,
         recovering: bool, dry_run: bool, operation: str = REWRAP,
         recovery_key: tuple[bytes, str] | None = None) -> FsRewrapped:
    from encfs.fuse.recovery import open_by_recovery_key

    root = os.fsencode(cipherdir)
    resumed = marker is not None
    replayed: set[bytes] = set()  # headers the replay wrote: moved by this run too
    again = ("--full " if operation == FULL else "") + str(cipherdir)  # the command that finishes the job
    if recovery_key is not None:
        again = f"--key {dest_key} --recovery-key {recovery_key[1]} {cipherdir}"
    try:
        if not dry_run:
            for name in os.listdir(root):
                if _LEFTOVER.fullmatch(name):  # of a write-fsync-rename a crash interrupted
                    os.unlink(os.path.join(root, name))
            if resumed:
                replayed = replay(cipherdir)
        opened = open_by_recovery_key(cipherdir, *recovery_key) if recovery_key is not None else \
            open_config(cipherdir, ks, writable=not dry_run, rewrap_to=marker["key_id"] if marker is not None else None)
        by_recovery = opened if recovery_key is not None else None
        config = opened.config
        if config.format < FS_FORMAT and not dry_run:
            raise RewrapError(f"{cipherdir}: its config is still format {config.format}: mount it read-write once "
                              f"(which upgrades it), then re-key it")
        dest = destination(ks, config.wrapped_secret,
                           dest_key if dest_key is not None else marker["key_id"] if marker else None)
        done = FsRewrapped(cipherdir, *where(config.wrapped_secret), *dest, resumed=resumed, fs_id=config.fs_id)
        moving = _to_move(root, dest, dry_run, done.damaged)
        done.config = where(config.wrapped_secret) != dest or config.key_id != dest[0] or \
            (config.wrapped_root is not None and where(config.wrapped_root) != dest)
        if dry_run or (operation == REWRAP and not (moving or done.config or resumed)):
            done.files = len(moving)
            return done
    except OSError as e:
        raise RewrapError(f"{cipherdir}: {_what(e)}" + (_AGAIN.format(again) if resumed else "")) from None
    state = {"marked": marker is not None and marker["key_id"] == dest[0] and marker["operation"] == operation,
             "adding": marker is not None and marker.get("adding") is True}  # kept by a marker written anew
    try:
        moved = _move_headers(cipherdir, ks, config, dest, moving, recovering, state, done.damaged, operation,
                              by_recovery)
        done.files = len(replayed | moved)  # a file replayed to one CMK and moved on to another: once
        if done.config:
            _move_config(cipherdir, ks, opened, dest, recovering, state, operation, by_recovery is not None)
        if operation == FULL:  # before the first file gets a fresh key (fullrekey.py)
            _mark(cipherdir, operation, dest, recovering, state)
        if state["marked"] or marker is not None:
            # --full: the marker stays. By the recovery key, an interrupted --full or add is ended here
            # (its done log with it): every file whose key is derived is under the new CMK, the others
            # are reported damaged (their CMK is lost).
            _remove(cipherdir, root, (REDO, DONE_LOG, MARKER) if operation == REWRAP else (REDO,))
    except (EncfsError, OSError) as e:
        cause = e.message if isinstance(e, EncfsError) else f"{cipherdir}: {_what(e)}"
        if state["marked"]:
            raise RewrapError(cause + _AGAIN.format(again)) from None
        if isinstance(e, OSError):  # before its marker (a full disk): nothing was changed yet
            raise RewrapError(cause) from None
        raise
    check = open_config(cipherdir, ks, writable=False)
    if where(check.config.wrapped_secret) != dest or check.config.key_id != dest[0]:
        raise RewrapError(f"{cipherdir}: the re-wrapped config did not read back under key {dest[0]}")
    return done


_AGAIN = ("; the re-key stopped part way (mounts are refused until it is finished): "
          "fix that and run `encfs rekey {}` again")


def _what(e: OSError) -> str:
    name = f"{os.fsdecode(e.filename)}: " if e.filename else ""
    return f"{name}{e.strerror or errno.errorcode.get(e.errno or 0, str(e))}"


def _mark(cipherdir: Path, operation: str, dest: tuple[str, int], recovering: bool, state: dict[str, bool]) -> None:
    """The marker, before the first change (an unusable destination fails before it)."""
    if not state["marked"]:
        _write_marker(cipherdir, operation, dest[0], recovering, state.get("adding", False))
        state["marked"] = True


def _move_headers(cipherdir: Path, ks: KeyService, config: FsConfig, dest: tuple[str, int], moving: list[bytes],
                  recovering: bool, state: dict[str, bool], damaged: list[str], operation: str,
                  by_recovery: OpenedConfig | None = None) -> set[bytes]:
    """The paths (relative to CIPHERDIR) of the headers moved."""
    root = os.fsencode(cipherdir)
    moved: set[bytes] = set()
    with progress(len(moving), f"rekey {cipherdir.name}", unit="files") as bar:
        for at in range(0, len(moving), BATCH):
            batch = []
            for rel in moving[at:at + BATCH]:
                header, times = _header_and_times(root, rel)
                try:
                    if by_recovery is not None:
                        blob = _derived_blob(ks, root, rel, header, by_recovery, dest)
                    else:
                        blob = ks.re_encrypt(header.wrapped_key, config.file_context(header.file_id), dest[0],
                                             encfs_internal=True)
                except (InvalidCiphertext, ContextMismatch, KeyNotFound):
                    damaged.append(os.fsdecode(rel))  # a damaged blob (or one of another key store)
                    continue
                batch.append((rel, FileHeader(header.file_id, blob, header.version).pack(), times))
            if batch:
                _mark(cipherdir, operation, dest, recovering, state)
                write_atomic(cipherdir / REDO, pack_redo(batch), 0o600, sync_dir=True)
                for rel, new, times in batch:
                    fd = open_under(root, os.path.join(root, rel), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                    try:
                        pwrite_all(fd, new, 0)
                        # A re-wrap changes no contents: the file keeps its times (the plaintext's),
                        # which its redo record holds for a replay after a kill before this line.
                        keep_times(fd, times, rel)
                    finally:
                        os.close(fd)
                syncfs(root)  # this batch is durable: the next redo log may replace its own
                moved.update(rel for rel, _new, _times in batch)
            bar.update(len(moving[at:at + BATCH]))
    return moved


def _derived_blob(ks: KeyService, root: bytes, rel: bytes, header: FileHeader, by_recovery: OpenedConfig,
                  dest: tuple[str, int]) -> bytes:
    """The file's key derived from the recovery root, encrypted under ``dest`` (InvalidCiphertext
    if it is not the file's key: a random key from before the recovery key, left as it is)."""
    config = by_recovery.config
    assert by_recovery.root is not None
    key = file_key(by_recovery.root, config.fs_id, header.file_id)
    fd = open_under(root, os.path.join(root, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if not key_opens_file(fd, root, header, key, config.block_size):
            raise InvalidCiphertext("its key is not derived from the recovery root")
    finally:
        os.close(fd)
    return ks.encrypt(dest[0], key, config.file_context(header.file_id), encfs_internal=True)


def _move_config(cipherdir: Path, ks: KeyService, opened: OpenedConfig, dest: tuple[str, int],
                 recovering: bool, state: dict[str, bool], operation: str, by_recovery: bool) -> None:
    """Both copies under ``dest``, the backup first (an interrupted pair: open_config(rewrap_to)).
    ``by_recovery``: the old CMK is not asked; the secret and root are encrypted anew."""
    config, secret = opened.config, opened.secret
    blob, root = config.wrapped_secret, config.wrapped_root
    if by_recovery:
        assert opened.root is not None
        blob = ks.encrypt(dest[0], secret, config.fs_context(), encfs_internal=True)
        root = ks.encrypt(dest[0], opened.root, config.root_context(), encfs_internal=True)
    if where(blob) != dest:
        blob = ks.re_encrypt(blob, config.fs_context(), dest[0], encfs_internal=True)
    if root is not None and where(root) != dest:  # the recovery root (recoverykeys.py) moves with it
        root = ks.re_encrypt(root, config.root_context(), dest[0], encfs_internal=True)
    _mark(cipherdir, operation, dest, recovering, state)
    data = sealed_config_bytes(replace(config, key_id=dest[0], wrapped_secret=blob, wrapped_root=root), secret)
    for name in (BACKUP_NAME, CONFIG_NAME):
        write_atomic(cipherdir / name, data, 0o644, sync_dir=True)


# with rewraplog.py's names, which mount.py, fsck.py, recovery.py and the tests take from here
__all__ = ["BATCH", "DONE_LOG", "FULL", "MARKER", "MARKER_VERSION", "PREFIX", "REDO", "REDO_MAGIC", "REDO_VERSION",
           "REWRAP", "FsRewrapped", "RewrapError", "_remove", "_write_marker", "pack_redo", "parse_redo",
           "read_marker", "refuse_if_interrupted", "replay", "rewrap_filesystem"]
