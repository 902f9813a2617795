"""The contents part of ``encfs fsck CIPHERDIR`` (fsck.py walks the tree): each regular file's
header, wrapped data key, state, journal and block tags, and read_blocks(), which the repair's
lost+found copy reads through too.

Invariants:
- Only reads: FileContent.load(writable=False) scans a journal as a recovery would and changes
  nothing; a block's journaled version, where there is one, is the one checked.
- A block's plaintext reaches nothing but a repair's sink (a lost+found copy); a block that fails
  authentication reaches nothing at all (open_into zeroes its part of the buffer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from encfs.blocks import OVERHEAD, BlockAuthError, BlockCipher
from encfs.errors import ContextMismatch, InvalidCiphertext, KeyNotFound
from encfs.fsckreport import WARNING, Finding, sector_runs
from encfs.fuse import rekeyfile
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import HEADER_LEN, FileHeader, HeaderError
from encfs.fuse.journal import JournalDamaged
from encfs.progress import progress

if TYPE_CHECKING:
    from encfs.fuse.fsck import Action, Walk

CHUNK_BLOCKS = 256  # blocks per read: 8 MiB of 32 KiB blocks
AHEAD = 8  # files the kernel is asked to read ahead of the one being checked


@dataclass
class Link:
    """One backing name of a regular file."""

    path: bytes  # backing path
    plain: str  # plaintext path ("/..."), or the entry under its parent for a name that does not decrypt


@dataclass
class FileCheck:
    """What the walk found about one regular file (one inode)."""

    links: list[Link]
    st: os.stat_result
    size: int = 0  # plaintext size
    bad: list[int] = field(default_factory=list)  # blocks that fail authentication
    name_damaged: bool = False
    rescued: bool = False  # its readable blocks are in lost+found (fsckrepair.rescue)


def check_contents(self: Walk, pending: list[tuple[bytes, FileCheck]]) -> None:
    """Check the contents of every file of ``pending`` (the walk's regular files, each inode once)."""
    total = sum(check.st.st_size for _path, check in pending)
    with ThreadPoolExecutor(1, thread_name_prefix="fsck-read") as pool, \
            progress(total, f"fsck {os.path.basename(self.root).decode(errors='replace')}") as bar:
        ahead: list[Future[None]] = []
        for i, (path, check) in enumerate(pending):
            while len(ahead) < min(len(pending), i + AHEAD):
                p, c = pending[len(ahead)]
                ahead.append(pool.submit(_read_ahead, self.fs.bd, p, c.st.st_size) if self.data else _done())
            ahead[i].result()
            ahead[i] = _DONE  # the futures of files checked are not kept
            _file(self, path, check)
            bar.update(check.st.st_size)


def _file(self: Walk, path: bytes, check: FileCheck) -> None:
    where, rel = check.links[0].plain, _rel(self.root, path)
    size = check.st.st_size
    self.count("bytes_checked", size)
    if size == 0:
        return  # an empty file whose header was never written
    try:
        fd = self.fs.bd.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        self.add(Finding("file", f"{where}: cannot be opened ({e.strerror})", place=rel))
        return
    side = None
    try:
        try:
            header = FileHeader.parse(os.pread(fd, HEADER_LEN, 0))
        except HeaderError as e:
            self.complete = False  # a journal or side file may be this file's
            if size < HEADER_LEN:  # no block: it reads as an empty file that fails (EIO)
                self.add(Finding("header", f"{where}: its header is torn ({size} of {HEADER_LEN} bytes) and it has "
                                           "no blocks (repair: it becomes the empty file it shows as)", place=rel),
                         lambda r: r.empty(path))
                return
            self.add(Finding("header", f"{where}: its header is damaged: {e}; its contents cannot be read",
                             place=rel))
            return
        self.seen_ids.add(header.file_id)
        if header.file_id in self.rekeys:  # an interrupted re-key: the side file is the file now
            side = rekeyfile.open_side_file(self.root, header.file_id)
            header = FileHeader.parse(os.pread(side, HEADER_LEN, 0))
            self.seen_ids.add(header.file_id)
            self.add(Finding("rekey", f"{where}: a re-key of it was interrupted by a crash: the next "
                                      "read-write mount finishes it", WARNING, place=rel))
        assert self.opened is not None
        config = self.opened.config
        try:
            key = self.fs.files.keys.key(header)
        except HeaderError as e:  # a derived key on a filesystem whose keys never are
            self.add(Finding("header", f"{where}: its header is damaged: {e}; its contents cannot be read",
                             place=rel))
            return
        except (InvalidCiphertext, ContextMismatch, KeyNotFound) as e:
            self.add(Finding("wrapped-key", f"{where}: its wrapped data key does not unwrap ({e.message}): "
                                            "its contents cannot be read", place=rel))
            return
        if self.fs.files.keys.recovery_misses(header, key):
            self.add(Finding("recovery", f"{where}: its data key is not derived from the recovery root: the "
                                         "recovery key does not open it (`encfs rekey --full` gives it one that is)",
                             WARNING, place=rel))
        cipher = BlockCipher(key, header.file_id, config.block_size)
        _blocks(self, side if side is not None else fd, header, cipher, check, where, rel, side is not None)
    finally:
        os.close(fd)
        if side is not None:
            os.close(side)


def _blocks(self: Walk, fd: int, header: FileHeader, cipher: BlockCipher, check: FileCheck, where: str,
            rel: str, rekeying: bool = False) -> None:
    c = FileContent(fd, header, cipher, self.root, self.journals,
                    state_in_file=header.file_id in self.states)
    try:
        try:
            notes = c.load(writable=False, after_crash=self.recovering)
        except JournalDamaged as e:
            self.add(Finding("journal", f"{where}: its journal is damaged ({e}): the file reads as I/O errors",
                             place=rel))
            return
        for note in notes:
            if "state fails authentication" in note:
                self.add(Finding("state", f"{where}: {note}", WARNING, place=rel))
            elif "torn" in note or "cut off" in note:
                self.add(Finding("torn", f"{where}: {note} (the next mount does the same)", WARNING,
                                 place=f"{rel}#{note}"))
        check.size = c.size
        if self.data:
            check.bad = list(read_blocks(c, None))
            self.count("blocks_checked", -(-c.size // c.block))
        for first, n in sector_runs(check.bad):
            what = f"block {first}" if n == 1 else f"blocks {first}-{first + n - 1}"
            finding = Finding("block", f"{where}: {what}: tag mismatch", path=where, block=first, count=n,
                              place=f"{rel}#{first}")
            if rekeying:  # read from a re-key's side file: a mount finishes the re-key before anything else
                finding.message += " (repair after a read-write mount has finished its re-key)"
                self.add(finding)
            else:
                self.add(finding, _rescue(check))
    finally:
        c.journal.close()


def _rescue(check: FileCheck) -> Action:
    from encfs.fuse.fsckrepair import rescue

    return lambda r: rescue(r, check)


def read_blocks(c: FileContent, sink: Callable[[int, memoryview], None] | None) -> Iterator[int]:
    """Open every block of ``c`` but its holes (its journaled version where the journal has one); yields the
    numbers of those that fail authentication (or are missing: a cut backing file). ``sink(first,
    plaintext)`` gets the plaintext of every run of blocks that opened."""
    block, step, size = c.block, c.block + OVERHEAD, c.size
    count = -(-size // block)
    # Sized for the file: a fresh 8 MiB buffer per small file cost 0.16 ms each (1.6 s per 10,000).
    out = memoryview(bytearray(min(count, CHUNK_BLOCKS) * block))
    b = 0
    while b < count:
        if b in c.holes:  # named by the authenticated state: nothing to open (it reads zeros)
            b = c.holes.next_data(b)
            continue
        if b in c.index:
            offset, length = c.index[b]
            try:
                plain = c.cipher.open(b, c.journal.read(offset, length))
                if sink is not None:
                    sink(b, memoryview(plain))
            except (BlockAuthError, OSError):
                yield b
            b += 1
            continue
        end = b + 1
        while end < min(count, b + CHUNK_BLOCKS) and end not in c.index and end not in c.holes:
            end += 1
        plain_len = min(size, end * block) - b * block
        data = memoryview(os.pread(c.fd, plain_len + (end - b) * OVERHEAD, HEADER_LEN + b * step))
        at = b
        while at < end:
            stop = end
            sealed_end = plain_len + (end - b) * OVERHEAD  # where the run's sealed bytes end
            if len(data) < sealed_end:  # cut short: the blocks not wholly there fail
                stop = b + len(data) // step
                if stop <= at:
                    yield from range(at, end)
                    break
            lo, hi = (at - b) * step, min((stop - b) * step, sealed_end)
            want = out[:(hi - lo) - (stop - at) * OVERHEAD]
            try:
                c.cipher.open_into(range(at, stop), data[lo:hi], want)
                if sink is not None:
                    sink(at, want)
                at = stop
            except BlockAuthError as e:
                if e.block_no > at and sink is not None:
                    sink(at, out[:(e.block_no - at) * block])
                yield e.block_no
                at = e.block_no + 1
        b = end


def _read_ahead(bd: BackingDirs, path: bytes, size: int) -> None:
    try:
        fd = bd.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _done() -> Future[None]:
    f: Future[None] = Future()
    f.set_result(None)
    return f


_DONE = _done()


def _rel(root: bytes, path: bytes) -> str:
    return os.fsdecode(os.path.relpath(path, root))
