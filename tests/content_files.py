"""One backing file's FileContent without a mount, for the kernel-free content tests."""

from __future__ import annotations

import os
from pathlib import Path

from encfs.blocks import BlockCipher
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import V2, FileHeader

KEY, FILE_ID = bytes(range(32)), bytes(range(16))


class BackingFile:
    """``tmp/f`` as a file of ``block_size`` blocks under KEY and FILE_ID (``sparse``: holes allowed)."""

    def __init__(self, tmp: Path, block_size: int, sparse: bool = False) -> None:
        self.root = os.fsencode(tmp)
        self.path = tmp / "f"
        self.journals: set[bytes] = set()
        self.block_size, self.sparse = block_size, sparse

    def cipher(self, key: bytes = KEY, file_id: bytes = FILE_ID) -> BlockCipher:
        return BlockCipher(key, file_id, self.block_size)

    def create(self, version: int = V2) -> FileContent:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        c = FileContent.create(fd, FileHeader(FILE_ID, bytes(93), version), self.cipher(), self.root, self.journals)
        c.sparse = self.sparse
        return c

    def open(self, key: bytes = KEY, after_crash: bool = True, writable: bool = True) -> tuple[FileContent, list[str]]:
        """The file as a daemon loads it (the header's file id, ``key``): the content and load's notes."""
        fd = os.open(self.path, os.O_RDWR)
        header = FileHeader.parse(os.pread(fd, 128, 0))
        c = FileContent(fd, header, self.cipher(key, header.file_id), self.root, self.journals)
        notes = c.load(writable, after_crash=after_crash)
        c.sparse = self.sparse
        return c, notes

    def allocated(self) -> int:
        return os.stat(self.path).st_blocks * 512
