"""``encfs rekey --full CIPHERDIR``: every file gets a fresh file id and data key, and every
block is re-sealed under it (docs/FORMAT.md §6.9, "--full").

It runs after the re-wrap of rewrap.py, under the same mount lock and marker (``operation``
"full"): by then every header and the config are under the destination CMK, so each file is
loaded exactly as a mount loads it (openfiles.OpenFiles: its journal replayed, an interrupted
re-key finished) and re-keyed by rekeyfile.rekey, the crash-safe per-file re-key a mount uses
when a key's nonce budget is spent, with a new data key generated under the destination CMK.

Each file re-keyed is recorded by its new file id in ``encfs.rekey.done`` (appended, not
synced: a record a power cut loses only means that file is re-keyed again), so a run killed
part way and run again skips the files already done.

Invariants:
- A file is never without a whole, readable version: rekeyfile.rekey's side file guarantees
  that for one file, and only one file is re-keyed at a time.
- A file id in the done log names a file whose re-key was durable before the record was
  written: it is appended only after rekeyfile.rekey returned (its fsyncs done, its side file
  removed).
- The filesystem secret stays: names, symlinks, xattrs and directory ids are sealed under
  keys derived from it, and re-sealing them would mean renaming every entry.
- Mounts are refused until the marker goes, which is only after every file is done.
"""

from __future__ import annotations

import os
import stat as stat_m
from pathlib import Path

from encfs.blocks import BlockCipher
from encfs.diskio import fsync_dir
from encfs.fuse import rekeyfile
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.backingtimes import open_quiet
from encfs.fuse.fileheader import FILE_ID_LEN, HEADER_LEN, FileHeader
from encfs.fuse.fsconfig import open_config
from encfs.fuse.openfiles import OpenFile, OpenFiles
from encfs.keys.service import KeyService
from encfs.progress import progress
from encfs.sealing import Sealers

DONE = "encfs.rekey.done"


def done_ids(cipherdir: Path) -> set[bytes]:
    """The new file ids of files already re-keyed by an interrupted run (a torn last record,
    never fdatasync'd, is ignored)."""
    try:
        data = (cipherdir / DONE).read_bytes()
    except FileNotFoundError:
        return set()
    return {data[i:i + FILE_ID_LEN] for i in range(0, len(data) - FILE_ID_LEN + 1, FILE_ID_LEN)}


def fresh_keys(cipherdir: Path, ks: KeyService, recovering: bool, files: list[bytes]) -> tuple[int, int]:
    """Re-key every file of ``files`` (paths relative to CIPHERDIR, each inode once) not in the
    done log; returns (files re-keyed, backing bytes re-sealed). OSError or EncfsError if one
    fails (the files before it are done and recorded)."""
    root = os.fsencode(cipherdir)
    loaded = open_config(cipherdir, ks, writable=False)  # under the destination by now
    config = loaded.config
    done = done_ids(cipherdir)
    # With a recovery root, the fresh keys are derived from it (recoverykeys.py): this is how
    # `encfs recovery-key add` makes every file recoverable.
    opened = OpenFiles(root, config, ks, BlockCipher, read_only=False,
                       sealers=Sealers(config.block_size), recovering=recovering, recovery_root=loaded.root,
                       fs_keys=loaded.keys)
    log_fd = os.open(cipherdir / DONE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    count = size = 0
    try:
        fsync_dir(root)
        with BackingDirs(root) as bd:  # by directory fds: backing paths past PATH_MAX
            total = sum(bd.lstat(os.path.join(root, rel)).st_size for rel in files)
            with progress(total, f"rekey --full {cipherdir.name}") as bar:
                for rel in files:
                    path = os.path.join(root, rel)
                    n = _one(bd, opened, path, done)
                    if n is not None:
                        new_id = FileHeader.parse(_head(bd, path)).file_id
                        os.write(log_fd, new_id)  # no fdatasync: a record lost to a power cut costs a re-key
                        count, size = count + 1, size + n
                    bar.update(bd.lstat(path).st_size)
    finally:
        os.close(log_fd)
        opened.close_all()
    return count, size


def _head(bd: BackingDirs, path: bytes) -> bytes:
    fd = open_quiet(lambda f: bd.open(path, f), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.pread(fd, HEADER_LEN, 0)
    finally:
        os.close(fd)


def _one(bd: BackingDirs, opened: OpenFiles, path: bytes, done: set[bytes]) -> int | None:
    """Re-key one file unless it is done; its backing size, or None if it was skipped."""
    # Its reads (the load, the re-seal) leave its atime alone, and rekeyfile.rekey keeps its times.
    fd = open_quiet(lambda f: bd.open(path, f), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if not stat_m.S_ISREG(st.st_mode) or FileHeader.parse(os.pread(fd, HEADER_LEN, 0)).file_id in done:
        os.close(fd)
        return None
    fh = opened.add(OpenFile(st.st_ino, fd, True, path))  # closed by release (or close_all)
    c = opened.content(opened[fh])  # loaded as a mount loads it: journal, interrupted re-key
    if c is None:
        opened.release(fh)
        return None
    c.check_key()  # its key opens its last block (header poisoning, as before any write)
    fresh, key = opened.keys.new(c.header.version)
    rekeyfile.rekey(c, fresh, BlockCipher(key, fresh.file_id, opened.block_size))
    opened.release(fh)
    if st.st_ino in opened.contents:  # its checkpoint failed: the content stayed pinned
        raise OSError(5, "cannot checkpoint it after the re-key", os.fsdecode(path))
    return st.st_size
