"""Giving a file a fresh data key when its key's nonce budget is spent (docs/FORMAT.md §6.4).

A file's blocks draw random GCM nonces under its data key, so the key may seal only so
many blocks (fileheader.REKEY_AT). The file then gets a new file id and data key, and
every block is re-sealed under them, in place, so its inode, hard links and xattrs stay:

1. A complete image of the re-keyed backing file (new header, every block re-sealed, the
   new state as its xattr) is written to ``encfs.journal/<old file id hex>.rekey.tmp``,
   fsync'd, and renamed to ``<old file id hex>.rekey`` (then the directory is fsync'd):
   from here on the side file is what the file holds.
2. Its blocks are copied over the backing file, which is cut to its length, and its state;
   fsync; then its header (the file id and key switch); fsync.
3. The side file is removed (unlink, fsync of the directory).

Invariants:
- After a crash at any moment the file reads back whole, under its old key (no complete
  side file: the backing file was not touched) or its new one: a complete side file
  names the file by its old id, whose header stays in place until every block and the
  state under the new key are durable (a new header over the old state would lose the
  state, and with it the file's holes, for good), and loading such a file first
  finishes step 2 from the side file (complete()); a read-only mount reads the side
  file instead.
- A block that fails authentication under the old key is copied as it is: it stays
  damaged (EIO) under the new key, and nothing that opened before fails after.
- A ``.rekey.tmp`` file is never read: it is removed when found.
"""

from __future__ import annotations

import errno
import logging
import os

from encfs.blocks import OVERHEAD, BlockAuthError, BlockCipher
from encfs.diskio import fsync_dir, pwrite_all
from encfs.fuse.backingtimes import keep_times, open_quiet, times_of
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import (
    HEADER_LEN,
    NO_XATTRS,
    REKEY_AT,
    STATE_XATTR,
    FileHeader,
    FileState,
    journal_dir_entry,
    read_state,
    remove_state,
    state_file,
    write_state,
)
from encfs.fuse.journal import Journal, file_ids

log = logging.getLogger("encfs.fuse")
SUFFIX = b".rekey"
TMP_SUFFIX = SUFFIX + b".tmp"
_CHUNK_BLOCKS = 32  # blocks re-sealed per pass (128 KiB of 4 KiB blocks, 1 MiB of 32 KiB ones)
_COPY = 1 << 20


class SideFilePending(OSError):
    """The side file is complete but copying it in failed: the file is read from the side file
    (read-only) until a load finishes the re-key."""


def side_file(root: bytes, file_id: bytes, suffix: bytes = SUFFIX) -> bytes:
    return journal_dir_entry(root, file_id, suffix)


def pending(root: bytes, read_only: bool) -> set[bytes]:
    """File ids with a complete side file (a re-key a crash interrupted); unfinished
    ``.rekey.tmp`` files are removed (unless ``read_only``)."""
    if not read_only:
        for file_id in file_ids(root, TMP_SUFFIX):
            os.unlink(side_file(root, file_id, TMP_SUFFIX))
    return file_ids(root, SUFFIX)


def rekey(c: FileContent, header: FileHeader, cipher: BlockCipher) -> None:
    """Re-seal ``c``'s file under ``cipher`` with ``header`` (a new file id and data key), as
    the module docstring says; ``c`` then serves the file under them. OSError if the side file
    cannot be written (the file is then untouched and ``c`` unchanged); SideFilePending if copying
    the complete side file in fails (``c`` then reads from it, read-only, under the new key)."""
    c.write_pending_state()  # under the old key, as everything of the file so far
    c.checkpoint()
    times = times_of(c.fd)  # a re-key changes no contents: the file keeps them (backingtimes.py)
    old_id = c.header.file_id
    root = c.root
    final = side_file(root, old_id)
    new_state = state_file(root, header.file_id) if c.state_in_file else None
    tmp = side_file(root, old_id, TMP_SUFFIX)
    os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
    fd = open_quiet(lambda f: os.open(tmp, f, 0o600), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        try:
            pwrite_all(fd, header.pack(), 0)
            sealed = _reseal(c, cipher, fd)
            if not c.v1:  # with the side file (its xattr, or the new id's state file beside it)
                write_state(fd, cipher, FileState(c.size, sealed + 1, c.holes.extents()), new_state)
            # The side file carries the file's times, durable with it: whoever copies it in (below,
            # or complete() after a crash, whose rerun sees only the side file) gives them back.
            keep_times(fd, times, tmp)
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            if new_state is not None:
                remove_state(fd, new_state)
            raise
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
        try:
            _copy_back(fd, c.fd)
        except OSError as e:
            _serve_side_file(c, old_id, header, cipher)
            raise SideFilePending(e.errno, e.strerror) from None
    finally:
        os.close(fd)
    # The backing file is under the new key from here on: ``c`` follows it before anything else.
    c._journals.discard(old_id)
    old_state = c.state_file
    c.header, c.cipher = header, cipher
    c.journal = Journal(c.root, header.file_id)
    c.state = (read_state(c.fd, cipher, c.state_file) or FileState()) if not c.v1 else FileState()
    c.seals = c.state.seals
    c.fresh = c.verified = True
    c.dirty = False
    c.rekey_at = REKEY_AT
    try:
        if old_state is not None:
            remove_state(c.fd, old_state)
        os.unlink(final)
        fsync_dir(os.path.dirname(final))
    except OSError as e:  # its old id is in no header now: a recovery scan removes it as an orphan
        log.warning("%r: re-keyed, but its side file stays (%s)", final, e.strerror)


def complete(root: bytes, file_id: bytes, fd: int) -> None:
    """Finish the re-key of the file open (writable) as ``fd`` whose header names ``file_id``
    and whose side file is complete: copy it in, then remove it."""
    final = side_file(root, file_id)
    src = open_side_file(root, file_id)
    try:
        _copy_back(src, fd)
    finally:
        os.close(src)
    os.unlink(final)
    fsync_dir(os.path.dirname(final))


def open_side_file(root: bytes, file_id: bytes) -> int:
    """A read-only fd of the complete side file of ``file_id`` (its copy-in, a read-only mount, fsck).
    Its reads leave its atime, which the copy-in gives the file (open_quiet)."""
    path = side_file(root, file_id)
    return open_quiet(lambda flags: os.open(path, flags), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


def _reseal(c: FileContent, cipher: BlockCipher, out: int) -> int:
    """Every block of ``c``'s backing file, re-sealed under ``cipher`` into ``out`` at the same
    offsets (blocks that fail authentication are copied as they are; holes stay holes: the side
    file is sparse there, and its state names them). Returns the seals made."""
    length = os.fstat(c.fd).st_size
    made = 0
    for begin, stop in _data_ranges(c, length):
        made += _reseal_range(c, cipher, out, begin, stop)
    os.ftruncate(out, length)
    return made


def _data_ranges(c: FileContent, length: int) -> list[tuple[int, int]]:
    """The backing byte ranges of ``c``'s blocks that are not holes."""
    step = c.block + OVERHEAD
    count = -(-(length - HEADER_LEN) // step)
    return [(HEADER_LEN + a * step, min(length, HEADER_LEN + b * step))
            for a, b, hole in c.holes.segments(0, count) if not hole]


def _reseal_range(c: FileContent, cipher: BlockCipher, out: int, begin: int, length: int) -> int:
    step = c.block + OVERHEAD
    made = 0
    for start in range(begin, length, _CHUNK_BLOCKS * step):
        raw = os.pread(c.fd, min(_CHUNK_BLOCKS * step, length - start), start)
        first = (start - HEADER_LEN) // step
        try:
            new = cipher.seal_run(first, c.cipher.open_run(first, raw))
            made += -(-len(raw) // step)
        except BlockAuthError:
            parts: list[bytes] = []
            for i in range(0, len(raw), step):
                one = raw[i:i + step]
                try:
                    parts.append(bytes(cipher.seal(first + i // step, bytes(c.cipher.open(first + i // step, one)))))
                    made += 1
                except BlockAuthError:
                    parts.append(bytes(one))
            new = bytearray(b"".join(parts))
        pwrite_all(out, new, start)
    return made


def _copy_back(src: int, dst: int) -> None:
    """Steps 2 of the module docstring: blocks, length, state, fsync, then header and the side
    file's times (the file's before its re-key), fsync. Only the side file's data is copied: its holes are the file's holes (the old state
    names them too), whatever ``dst`` holds there is never opened. The header goes last: until
    it is durable the file still has its old id, so a crash anywhere here leaves the side file
    pending and the next load copies it back again."""
    times = times_of(src)
    length = os.fstat(src).st_size
    for begin, end in _backing_data(src, length):
        for at in range(begin, end, _COPY):
            pwrite_all(dst, os.pread(src, min(_COPY, end - at), at), at)
    os.ftruncate(dst, length)
    _copy_state(src, dst)
    os.fsync(dst)  # blocks and state: under the old header neither is read (the side file is)
    pwrite_all(dst, os.pread(src, HEADER_LEN, 0), 0)
    keep_times(dst, times, b"a re-keyed file")
    os.fsync(dst)


def _copy_state(src: int, dst: int) -> None:
    """The side file's state xattr onto ``dst`` (removed there if the side file has none)."""
    try:
        state = os.getxattr(src, STATE_XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, *NO_XATTRS):
            raise
        state = None
    if state is not None:
        os.setxattr(dst, STATE_XATTR, state)
    else:
        try:
            os.removexattr(dst, STATE_XATTR)
        except OSError as e:
            if e.errno not in (errno.ENODATA, *NO_XATTRS):
                raise


def _serve_side_file(c: FileContent, old_id: bytes, header: FileHeader, cipher: BlockCipher) -> None:
    """After a failed copy-back: ``c`` reads the complete side file of ``old_id``, read-only (the
    next load finishes the job)."""
    fd = open_side_file(c.root, old_id)
    os.close(c.fd)
    c.use_fd(fd, False)
    c.read_only = True
    c.header, c.cipher = header, cipher


def _backing_data(fd: int, length: int) -> list[tuple[int, int]]:
    """The data ranges of a (sparse) file past its header, by SEEK_DATA/SEEK_HOLE (all of it
    where the store cannot tell)."""
    out, pos = [], HEADER_LEN
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return [(pos, length)]
        out.append((start, min(end, length)))
        pos = end
    return out
