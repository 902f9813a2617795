"""Reads of a regular file's content (content.py's FileContent takes them from ContentReads):
each block's newest version, from the journal if it holds one (the index), else from its place
in the backing file, opened in process or in the sealing worker's arena.

Of content.py's invariants, these are kept here:
- A block that has a journaled version reads that version, never the older one in place.
- A block reads as zeros without being opened only if the holes name it.
- A block that fails authentication, or that a backing file shorter than the size lacks, reads
  EIO (BlockAuthError, reported once through on_auth_error), never zeros.
"""

from __future__ import annotations

import os
from typing import NoReturn

from encfs import daemonlog
from encfs.blocks import (
    OVERHEAD,
    BlockAuthError,
    blocks_touched,
    run_blocks,
    sealed_offset,
    sealed_size,
)
from encfs.fuse.contentfields import ContentFields
from encfs.fuse.fileheader import HEADER_LEN


class ContentReads(ContentFields):
    """The reads of content.FileContent (a mixin: the content's state)."""

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Plaintext [offset, offset+length) clipped to the file's size. A read the sealer
        opens in the worker (Sealer.arena) comes back as a view of this thread's slot of the
        worker's arena, valid until this thread's next job for the worker."""
        size = self.size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        block = self.block
        first, skip = divmod(offset, block)
        if skip + length <= block and not (self.holes and self.holes.overlaps(first, first + 1)):
            # one block (a 4 KiB random read): opened whole, no run to lay out
            one = self._open_block(first, size)
            return one if skip == 0 and len(one) == length else memoryview(one)[skip:skip + length]
        blocks = blocks_touched(offset, length, block)
        if self.holes and self.holes.overlaps(blocks.start, blocks.stop):
            plain: bytes | bytearray | memoryview = self._read_with_holes(blocks, size)
        else:
            plain = self._read_blocks(blocks, size)
        skip = offset - blocks.start * block
        return plain if skip == 0 and len(plain) == length else plain[skip:skip + length]

    def _read_with_holes(self, blocks: range, size: int) -> bytearray:
        """The plaintext of ``blocks``, holes as zeros (never opened)."""
        out = bytearray()
        for a, b, hole in self.holes.segments(blocks.start, blocks.stop):
            if hole:
                out += bytes(min(b * self.block, size) - a * self.block)
            else:
                out += self._read_blocks(range(a, b), size)  # copied at once: the arena is reused
        return out

    def _read_blocks(self, blocks: range, size: int) -> bytes | bytearray | memoryview:
        """The plaintext of ``blocks`` (none of them a hole)."""
        block = self.block
        start, want = self._span(blocks, size)
        if self.index and any(b in self.index for b in blocks):
            plain: bytes | bytearray | memoryview = self._read_journaled(blocks, size)
        else:
            areas = self.sealer.arena(len(blocks) * block, want)
            if areas is None:
                sealed = os.pread(self.fd, want, start)
                if len(sealed) != want:
                    self._failed(blocks.start + (len(sealed) // (block + OVERHEAD)))
                plain = self._open_blocks(blocks.start, sealed)
            else:
                plain = self._open_in_arena(blocks.start, start, want, areas)
        return plain

    def _span(self, blocks: range, size: int) -> tuple[int, int]:
        """Where ``blocks`` start in the backing file and how many sealed bytes they take, for
        a file of ``size`` plaintext bytes (only its last block may be short)."""
        start = sealed_offset(blocks.start, HEADER_LEN, self.block)
        return start, sealed_size(min(blocks.stop * self.block, size), HEADER_LEN, self.block) - start

    def _failed(self, block_no: int) -> NoReturn:
        e = BlockAuthError(block_no)
        if self._on_auth_error:
            self._on_auth_error(block_no)  # the one log line, with the path
            daemonlog.mark_reported(e)
        raise e

    def _sealed_block(self, k: int, size: int) -> bytes:
        """Block ``k``'s sealed bytes, from the journal if it holds the newest version, for a file
        of ``size`` plaintext bytes; a backing file cut short fails as block ``k`` (logged)."""
        if k in self.index:
            offset, length = self.index[k]
            return self.journal.read(offset, length)
        block = self.block
        want = min(block, size - k * block) + OVERHEAD  # only the file's last block may be short
        sealed = os.pread(self.fd, want, sealed_offset(k, HEADER_LEN, block))
        if len(sealed) != want:
            self._failed(k)
        return sealed

    def _open_block(self, k: int, size: int) -> bytes:
        """The plaintext of block ``k`` (not a hole), from the journal if it holds the newest
        version. A short read is reported once, by _sealed_block, outside the decryption's try."""
        sealed = self._sealed_block(k, size)
        try:
            return self.cipher.open(k, sealed)
        except BlockAuthError:
            self._failed(k)

    def _read_journaled(self, blocks: range, size: int) -> bytearray:
        out = bytearray()
        for k in blocks:
            out += self._open_block(k, size)
        return out

    def _open_blocks(self, first: int, sealed: bytes) -> bytearray:
        try:
            return self.cipher.open_run(first, sealed)
        except BlockAuthError as e:
            self._failed(e.block_no)

    def _open_in_arena(self, first: int, start: int, want: int, areas: tuple[memoryview, memoryview]) -> memoryview:
        """Blocks from ``first`` on, ``want`` sealed bytes at ``start``, read into the sealer's
        arena and opened there."""
        plain_area, sealed_area = areas
        sealed = sealed_area[:os.preadv(self.fd, [sealed_area[:want]], start)]
        if len(sealed) != want:
            self._failed(first + len(sealed) // (self.block + OVERHEAD))
        try:
            numbers, plain_len = run_blocks(first, len(sealed), self.block)
            out = plain_area[:plain_len]
            if numbers:
                self.sealer.open_jobs([(numbers, sealed, out)])
        except BlockAuthError as e:
            self._failed(e.block_no)
        return out
