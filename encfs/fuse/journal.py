"""The per-file write-ahead journal that makes block overwrites atomic (docs/FORMAT.md §6.5).

A block that already exists in a backing file is never overwritten in place by a write:
the sealed new version is appended to the file's journal, ``encfs.journal/<file id hex>``
in the CIPHERDIR root, and reads take it from there. A checkpoint later copies the
journaled blocks into place. Layout::

    journal header (32 bytes): b"ENCJ" | u8 version 1 | 3 zero bytes | file id (16) | 8 zero bytes
    records, end to end:
      run:  b"EJRN" | u32 count | u64 first block | u32 sealed length | u32 0 | sealed run
      sync: b"EJSY" | 20 zero bytes

A run is ``count`` consecutive blocks sealed exactly as they go in place (every block full
but the last), so a checkpoint copies bytes and never reseals. The records end where every byte
left in the journal is zero: a journal that must grow is written ahead with zeros (about as much
again as it holds, at most ``AHEAD_MAX``), so that the fdatasyncs after the appends that follow
write data only and do not also commit a new size and new blocks (ext4: 180 against 420-560 us
here; docs/dev/block-layer.md).

Invariants:
- Nothing in the backing file is overwritten before the journal that holds its new version
  is durable: a checkpoint runs fdatasync(journal), then the in-place writes, then
  fdatasync(backing file), and only then removes the journal (unlink, fsync of the journal
  directory). A crash at any point leaves either the old blocks in place, or a journal
  whose replay (idempotent) gives the new ones.
- A journal is removed durably before any new one for the same file is created, so a
  journal found on disk is never older than the data in place.
- Bytes from ``length`` to ``size`` (the file's size) are zero; the next record goes at
  ``length``. A zero tail is never taken for records, and a zero record header with anything
  nonzero after it is torn like any other.
- After a failed fdatasync of the journal (or of its directory) what reached the disk is
  unknown, and Linux reports the failure once: a retry would succeed over lost pages. So
  every later sync fails (EIO) while this Journal lives (its content stays loaded, and a
  checkpoint, which syncs first, never copies such records into place); the next load of
  the file recovers from what is on disk.
- A sync record is appended after every fdatasync of the journal: records before the last
  sync record were durable, so one of them failing authentication is damage
  (JournalDamaged, never ignored); a failure after it is a write torn by a crash that was
  never acknowledged, and the journal is cut there.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass

from encfs.blocks import BlockAuthError, BlockCipher, run_blocks
from encfs.diskio import fsync_dir, pwritev_all
from encfs.errors import IntegrityError
from encfs.fuse.fileheader import FILE_ID_LEN, JOURNAL_DIR, journal_dir_entry

log = logging.getLogger("encfs.fuse")

_HEAD = struct.Struct(">4sB3s16s8s")
_RECORD = struct.Struct(">4sIQII")
RUN, SYNC = b"EJRN", b"EJSY"
SYNC_RECORD = _RECORD.pack(SYNC, 0, 0, 0, 0)
HEAD_LEN = _HEAD.size
# A journal that must grow is written ahead to the next page past its records, room for a sync
# record and as many bytes again as it holds, up to AHEAD_MAX: a 16 MiB journal grows about 20
# times (the fdatasync after each growth also commits the new size), and the zeros are at most
# what it holds plus a page.
PAGE = 4096
AHEAD_MAX = 1 << 20


def not_durable(why: str) -> OSError:
    """The EIO a file refuses changes with once a sync of it or its journal failed (see the
    invariants; FileContent.check_durable)."""
    return OSError(errno.EIO, f"the file cannot be made durable until it is loaded again: {why}")


class JournalDamaged(IntegrityError):
    """A journal record that was durable does not authenticate (or cannot be parsed)."""


@dataclass(frozen=True)
class Run:
    first: int  # first block number
    count: int
    offset: int  # where its sealed bytes start in the journal
    length: int  # sealed bytes


def file_ids(root: bytes, suffix: bytes = b"") -> set[bytes]:
    """The file ids named by entries ``<file id hex><suffix>`` of the journal directory (journals,
    re-key side files, state files: each names its file by id)."""
    try:
        names = os.listdir(os.path.join(root, JOURNAL_DIR))
    except FileNotFoundError:
        return set()
    found = set()
    for name in names:
        stem = name[:len(name) - len(suffix)]
        if name.endswith(suffix) and len(stem) == 2 * FILE_ID_LEN:
            try:
                found.add(bytes.fromhex(stem.decode()))
            except ValueError:
                pass
    return found


def journal_path(root: bytes, file_id: bytes) -> bytes:
    return journal_dir_entry(root, file_id)


class Journal:
    """One file's journal: appends runs, syncs, is scanned on recovery and removed after a
    checkpoint. Not thread-safe (its FileContent serialises writes)."""

    def __init__(self, root: bytes, file_id: bytes) -> None:
        self.path = journal_path(root, file_id)
        self.file_id = file_id
        self.fd: int | None = None
        self.length = 0  # where the records end: the next one goes here
        self.size = 0  # the file's size: zeros from length on
        self.unsynced = False  # records appended since the last sync
        self.new = False  # created since the journal directory was last synced
        self.failed: str | None = None  # why a sync failed: none succeeds after it (EIO)

    def open_existing(self) -> bool:
        """Open the journal if one is on disk; False if none is. A read-only CIPHERDIR's
        journal is opened read-only (it is then only read, never changed)."""
        for mode in (os.O_RDWR, os.O_RDONLY):
            try:
                fd = os.open(self.path, mode | os.O_CLOEXEC | os.O_NOFOLLOW)
                break
            except FileNotFoundError:
                return False
            except OSError as e:
                if e.errno not in (errno.EROFS, errno.EACCES) or mode == os.O_RDONLY:
                    raise
        self.fd = fd
        self.length = self.size = os.fstat(fd).st_size  # scan() finds where the records end
        return True

    def _create(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:  # the directory is there but on a new filesystem's first overwrite: one call, not four
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            fd = self._take_empty_leftover()
        try:
            pwritev_all(fd, [_HEAD.pack(b"ENCJ", 1, bytes(3), self.file_id, bytes(8))], 0)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)  # if this fails too, the next creation takes the file (above)
            raise
        self.fd, self.length, self.size, self.new = fd, HEAD_LEN, HEAD_LEN, True

    def _take_empty_leftover(self) -> int:
        """The journal's name exists while this Journal has none: a creation whose header write
        failed and whose unlink failed too left it, shorter than a header (it holds nothing:
        taken, cut to empty). Anything longer is a journal of another file with this id (a copy
        of a backing file): FileExistsError, as before."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        if os.fstat(fd).st_size >= HEAD_LEN:
            os.close(fd)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.path)
        os.ftruncate(fd, 0)
        return fd

    def append(self, first: int, count: int, sealed: bytes | bytearray | memoryview) -> int:
        """Append a run; returns where its sealed bytes start. On failure (ENOSPC) the journal
        is cut back to what it was, so a failed write leaves no record behind."""
        if self.fd is None:
            self._create()
        start = self.length
        self._put([_RECORD.pack(RUN, count, first, len(sealed), 0), sealed])
        self.unsynced = True
        return start + _RECORD.size

    def _put(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write ``parts`` at the end of the records, with zeros ahead of them if the journal
        must grow (see AHEAD_MAX). A disk too full for the zeros takes the record alone; any
        failure cuts the journal back to where the records ended."""
        assert self.fd is not None
        start = self.length
        end = start + sum(len(p) for p in parts)
        ahead = 0
        if end + len(SYNC_RECORD) > self.size:  # a sync record after it must not grow it either
            ahead = -(-(end + len(SYNC_RECORD) + min(end, AHEAD_MAX)) // PAGE) * PAGE - end
        try:
            try:
                pwritev_all(self.fd, [*parts, bytes(ahead)] if ahead else parts, start)
            except OSError as e:
                if not ahead or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(self.fd, max(start, self.size))
                ahead = 0
                pwritev_all(self.fd, parts, start)
        except BaseException:
            self.cut(start)
            raise
        self.length = end
        self.size = max(self.size, end + ahead)

    def read(self, offset: int, length: int) -> bytes:
        assert self.fd is not None
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "journal shorter than its index")
        return data

    def sync(self) -> None:
        """Make every record appended so far durable (and the journal's name, if new). Once a
        sync failed, every later one fails too (EIO; see the invariants)."""
        if self.failed is not None:
            raise not_durable(self.failed)
        if self.fd is None or not (self.unsynced or self.new):
            return
        try:
            os.fdatasync(self.fd)
            if self.new:
                fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            self.mark_failed(e)
            raise
        self.new = False
        if self.unsynced:
            # Not synced itself: if a crash loses it, the records before it are only
            # treated as unsynced (cut off if they fail, which a durable record cannot).
            self._put([SYNC_RECORD])
            self.unsynced = False

    def remove(self, durable: bool = True) -> None:
        """Delete the journal: durably after a checkpoint (its records are in place and durable:
        one that came back after a crash would be replayed over later writes). The journal of a
        file with no name left need not be: after a crash it is an orphan the recovery removes.
        An unlink that fails leaves the journal as it was, open (a later checkpoint tries again);
        a directory sync that fails leaves it removed, and every later sync failing (EIO): a
        crash may bring it back, and nothing may be acknowledged that its replay would undo."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        else:
            if durable:
                try:
                    fsync_dir(os.path.dirname(self.path))
                except OSError as e:
                    self.mark_failed(e)
                    self.close()
                    raise
        self.close()
        self.length, self.size, self.unsynced, self.new = 0, 0, False, False

    def mark_failed(self, e: OSError, what: str = "a sync") -> None:
        """A sync failed, or a cut that puts the journal back: none may succeed after it (see
        the invariants)."""
        self.failed = f"{what} failed: {e.strerror or e}"
        log.error("journal %r: %s: its file takes no more changes until the next mount", self.path, self.failed)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def cut(self, length: int, sync: bool = False) -> None:
        """Drop everything from ``length`` on (a torn tail that scan() ignored, a failed append,
        a failed write's records), never the header, before appending; with ``sync``, durably
        (what replaces the cut records must not meet a stale sync record). If the cut or its
        sync fails, what follows ``length`` is unknown, maybe records durable already that the
        content no longer indexes: counted as a failed sync (no more changes; the next load
        reads the journal as it is)."""
        assert self.fd is not None
        length = max(length, HEAD_LEN)  # a journal a failed write made keeps its header
        try:
            os.ftruncate(self.fd, length)
        except OSError as e:
            self.mark_failed(e, "a cut of the journal")
            raise
        self.length = self.size = length
        if sync:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                self.mark_failed(e)
                raise

    def scan(self, cipher: BlockCipher) -> tuple[list[Run], int, list[str]]:
        """The journal's valid runs in order (each block checked), where its valid part ends
        (where the next record goes, if no tail is torn), and a note for a torn tail after it.
        JournalDamaged if a durable record is bad."""
        assert self.fd is not None
        data = os.pread(self.fd, self.size, 0)
        if len(data) < HEAD_LEN:
            return self._torn(0, data, [], "journal header torn")
        magic, version, zeros, file_id, zeros2 = _HEAD.unpack_from(data)
        if magic != b"ENCJ" or version != 1 or any(zeros) or any(zeros2) or file_id != self.file_id:
            raise JournalDamaged(f"journal {self.path!r} has a bad header")
        runs: list[Run] = []
        pos = HEAD_LEN
        block = cipher.block_size
        while pos < len(data):
            if not data[pos] and data.count(0, pos) == len(data) - pos:
                break  # the zeros written ahead: the records end here
            if pos + _RECORD.size > len(data):
                return self._torn(pos, data, runs, "record header torn")
            kind, count, first, length, zero = _RECORD.unpack_from(data, pos)
            body = pos + _RECORD.size
            if kind == SYNC and not (count or first or length or zero):
                pos = body
                continue
            if kind != RUN or zero or not count or body + length > len(data):
                return self._torn(pos, data, runs, "record torn or unreadable")
            try:
                numbers, _plain = run_blocks(first, length, block)
                if len(numbers) != count:
                    raise BlockAuthError(first)
                cipher.open_run(first, memoryview(data)[body:body + length])
            except BlockAuthError:
                return self._torn(pos, data, runs, f"run of blocks {first}-{first + count - 1} fails authentication")
            runs.append(Run(first, count, body, length))
            pos = body + length
        self.length = pos
        return runs, pos, []

    def _torn(self, pos: int, data: bytes, runs: list[Run], why: str) -> tuple[list[Run], int, list[str]]:
        """The journal stops being valid at ``pos``: a write torn by a crash (ignore the rest),
        unless a sync record follows, which makes it damage to something that was durable."""
        if data.find(SYNC_RECORD, pos + 1) >= 0:
            raise JournalDamaged(f"journal {self.path!r}: {why} at byte {pos}, before a durable record")
        return runs, pos, [(f"journal {self.path!r}: {why} at byte {pos}: a write torn by a crash "
                            f"(never acknowledged by fsync) was dropped")]
