"""Regular-file contents: a fixed-size header, then sealed blocks of the filesystem's block size.

Header (HEADER_LEN = 128 bytes)::

    0   4   magic b"ENCF"
    4   1   content format version (1)
    5   1   reserved (0)
    6   16  file id (random)
    22  2   u16 length n of the wrapped data key blob
    24  n   wrapped data key (key-service ciphertext blob; context
            {"encfs:fs": <fs id hex>, "encfs:file": <file id hex>})
    24+n    zero padding to 128 bytes

Blocks follow at offset 128 in encfs.blocks' framing with scope = file id,
so blocks cannot move between positions or files. A zero-length backing file
is an empty file whose header has not been written yet (a crash between
create and first write leaves exactly that).

Holes are never left in the backing file: extending a file writes sealed
zero blocks, so an attacker who zeroes or punches a range of ciphertext gets
EIO rather than plausible zeros.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from encfs.blocks import (
    OVERHEAD,
    BlockAuthError,
    BlockCipher,
    blocks_touched,
    plain_size,
    run_blocks,
    sealed_offset,
    sealed_size,
)
from encfs.sealworker import SealWorker, worth_the_worker

MAGIC = b"ENCF"
CONTENT_VERSION = 1
HEADER_LEN = 128
FILE_ID_LEN = 16
_FIXED = struct.Struct(">4sBB16sH")
_ZERO_CHUNK = 1 << 20  # fill gaps 1 MiB at a time (at least one block)


class HeaderError(Exception):
    """The file header is missing, truncated or malformed."""


@dataclass(frozen=True)
class FileHeader:
    file_id: bytes
    wrapped_key: bytes

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, CONTENT_VERSION, 0, self.file_id, len(self.wrapped_key))
        body = fixed + self.wrapped_key
        if len(body) > HEADER_LEN:
            raise ValueError("wrapped data key does not fit the file header")
        return body.ljust(HEADER_LEN, b"\0")

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        if len(data) < HEADER_LEN:
            raise HeaderError(f"file header truncated ({len(data)} of {HEADER_LEN} bytes)")
        magic, version, _res, file_id, n = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise HeaderError("not an encfs file (bad magic)")
        if version != CONTENT_VERSION:
            raise HeaderError(f"unsupported file content version {version}")
        if _FIXED.size + n > HEADER_LEN:
            raise HeaderError("file header names an oversized key blob")
        return cls(file_id, bytes(data[_FIXED.size:_FIXED.size + n]))


def whole_blocks(offset: int, length: int, block: int) -> range | None:
    """The blocks a write of [offset, offset+length) replaces entirely, if it keeps no old byte
    of any block it touches (aligned at both ends); None otherwise. Such a write can be sealed
    before the file's state is known: nothing it seals depends on what the file holds."""
    if length <= 0 or offset % block or length % block:
        return None
    return range(offset // block, (offset + length) // block)


def plain_file_size(backing_size: int, block: int) -> int:
    """Plaintext size of a backing file of ``backing_size`` bytes (0 if no header yet)."""
    if backing_size <= HEADER_LEN:
        return 0
    try:
        return plain_size(backing_size, HEADER_LEN, block)
    except ValueError:
        # A torn last block: report what the intact blocks hold; reading it gives EIO.
        whole = backing_size - (backing_size - HEADER_LEN) % (block + OVERHEAD)
        return plain_size(whole, HEADER_LEN, block) + 1


class FileContent:
    """Plaintext read/write/truncate over one backing file descriptor.

    Not thread-safe: the caller serialises operations on one file.
    ``on_auth_error(block_no)`` is called before BlockAuthError propagates.
    """

    def __init__(self, fd: int, cipher: BlockCipher,
                 on_auth_error: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.cipher = cipher
        self.block = cipher.block_size
        self._on_auth_error = on_auth_error

    def size(self) -> int:
        return plain_file_size(os.fstat(self.fd).st_size, self.block)

    def _open_blocks(self, first: int, sealed: bytes) -> bytearray:
        try:
            return self.cipher.open_run(first, sealed)
        except BlockAuthError as e:
            if self._on_auth_error:
                self._on_auth_error(e.block_no)
            raise

    def read(self, offset: int, length: int, worker: SealWorker | None = None,
             worker_key: Callable[[], int | None] | None = None) -> bytes | bytearray | memoryview:
        """Plaintext [offset, offset+length) clipped to the file's size. With a sealing worker, a
        read worth_the_worker() is read into this thread's slot of the worker's arena and
        opened there under the key id that ``worker_key()`` gives (asked only for such a read, so
        a file read in small pieces never sends its key to the worker); the view stays valid
        until this thread's next job for the worker."""
        size = self.size()
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        block = self.block
        blocks = blocks_touched(offset, length, block)
        start = sealed_offset(blocks.start, HEADER_LEN, block)
        want = sealed_offset(blocks.stop, HEADER_LEN, block) - start
        key_id = areas = None
        if worker is not None and worker_key is not None and worth_the_worker(len(blocks) * block, want):
            key_id = worker_key()
            areas = None if key_id is None else worker.areas()
        if areas is None:
            plain: bytes | bytearray | memoryview = self._open_blocks(blocks.start, os.pread(self.fd, want, start))
        else:
            assert worker is not None and key_id is not None
            plain = self._open_in_worker(worker, key_id, blocks.start, start, want, areas)
        skip = offset - blocks.start * block
        out = plain if skip == 0 and len(plain) == length else plain[skip:skip + length]
        if len(out) != length:  # the backing file is shorter than its size says: torn block
            if self._on_auth_error:
                self._on_auth_error(blocks.stop - 1)
            raise BlockAuthError(blocks.stop - 1)
        return out

    def _open_in_worker(self, worker: SealWorker, key_id: int, first: int, start: int, want: int,
                        areas: tuple[memoryview, memoryview]) -> memoryview:
        """Blocks from ``first`` on, ``want`` sealed bytes at ``start``, opened by the worker."""
        plain_area, sealed_area = areas
        sealed = sealed_area[:os.preadv(self.fd, [sealed_area[:want]], start)]
        try:
            numbers, plain_len = run_blocks(first, len(sealed), self.block)
            out = plain_area[:plain_len]
            if numbers and not worker.open(key_id, [(numbers, sealed, out)]):  # the worker is gone: open here
                self.cipher.open_into(numbers, sealed, out)
        except BlockAuthError as e:
            if self._on_auth_error:
                self._on_auth_error(e.block_no)
            raise
        return out

    def write(self, offset: int, data: bytes | memoryview) -> int:
        size = self.size()
        if offset > size:
            self._extend(size, offset)
            size = offset
        if not data:
            return 0
        block = self.block
        blocks = blocks_touched(offset, len(data), block)
        first_start = blocks.start * block
        # Existing plaintext that the first and last touched blocks keep.
        end = offset + len(data)
        last_end = min(blocks.stop * block, size)
        if offset > first_start and last_end > end and len(blocks) == 1:
            old = self.read(first_start, last_end - first_start)  # open the one block once, not twice
            head, tail = old[:offset - first_start], old[end - first_start:]
        else:
            head = self.read(first_start, offset - first_start) if offset > first_start else b""
            tail = self.read(end, last_end - end) if last_end > end else b""
        # Whole-block writes (all of a sequential stream) are sealed straight from the request
        # buffer: a copy of each 1 MiB WRITE cost 32 us, a quarter of its sealing.
        plain = b"".join((head, data, tail)) if head or tail else data
        sealed = self.cipher.seal_run(blocks.start, plain)
        os.pwrite(self.fd, sealed, sealed_offset(blocks.start, HEADER_LEN, block))
        return len(data)

    def write_sealed(self, offset: int, length: int, sealed: bytes | memoryview) -> int:
        """Write ``sealed``: the whole_blocks(offset, length) sealed under this file's cipher
        (by a sealing worker, before the caller serialised this write)."""
        size = self.size()
        if offset > size:
            self._extend(size, offset)
        os.pwrite(self.fd, sealed, sealed_offset(offset // self.block, HEADER_LEN, self.block))
        return length

    def _extend(self, size: int, new_size: int) -> None:
        """Write sealed zeros from ``size`` to ``new_size``, at most 1 MiB at a time."""
        pos, block = size, self.block
        chunk = max(_ZERO_CHUNK, block)
        while pos < new_size:
            # Align chunks to block boundaries after the first partial block.
            stop = min(new_size, (pos // block) * block + chunk)
            self.write(pos, bytes(stop - pos))
            pos = stop

    def truncate(self, new_size: int) -> None:
        size = self.size()
        if new_size > size:
            self._extend(size, new_size)
            return
        if new_size == size:
            return
        block = self.block
        last, rest = divmod(new_size, block)
        if rest:
            keep = self.read(last * block, rest)
            os.pwrite(self.fd, self.cipher.seal(last, keep), sealed_offset(last, HEADER_LEN, block))
        os.ftruncate(self.fd, sealed_size(new_size, HEADER_LEN, block))
