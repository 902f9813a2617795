"""The directory requests of the filesystem's FUSE server: OPENDIR, READDIR, READDIRPLUS,
RELEASEDIR and FSYNCDIR, decoded into EncryptedFS calls. A mixin of FsServer (server.py, whose
invariants hold for these too: they are registered in its handler table and run under its
locks like the others).

Invariants:
- READDIRPLUS counts an entry as looked up only if it went into the reply.
- Directory offsets 1 and 2 are "." and ".."; offset n > 2 is EncryptedFS's n - 2.
"""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

from encfs.fuse.fuseerrors import failures_as_errno
from encfs.fuseproto.wire import (
    FSYNC_FDATASYNC,
    FSYNC_IN,
    OPEN_OUT,
    READ_IN,
    RELEASE_IN,
    EntryAttributes,
    RequestContext,
    pack_dirent,
)

if TYPE_CHECKING:
    from encfs.fuse.fs import EncryptedFS


class DirRequests:
    """OPENDIR, READDIR, READDIRPLUS, RELEASEDIR and FSYNCDIR of FsServer."""

    if TYPE_CHECKING:  # defined by FsServer (server.py) and its base, FuseServer
        fs: EncryptedFS

        def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> None: ...

    def _opendir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.reply(unique, OPEN_OUT.pack(self.fs.opendir(node, ctx), 0, 0))

    def _readdir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self._list(unique, node, body, plus=False)

    def _readdirplus(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self._list(unique, node, body, plus=True)

    def _list(self, unique: int, node: int, body: memoryview, plus: bool) -> None:
        fh, offset, size, _flags = READ_IN.unpack_from(body)
        out = bytearray()
        # "." and "..": the kernel does not instantiate them from READDIRPLUS (node id 0 here).
        for i, name in enumerate((b".", b".."), start=1):
            if offset < i:
                rec = pack_dirent(node, i, name, stat.S_IFDIR)
                out += EntryAttributes().pack_entry() + rec if plus else rec
        with failures_as_errno("readdir"):
            entries = self.fs.readdir(fh, max(offset - 2, 0), plus)
            try:
                for name, attrs, next_offset in entries:
                    rec = pack_dirent(attrs.st_ino, next_offset + 2, name, attrs.st_mode)
                    if plus:
                        rec = attrs.pack_entry() + rec
                    if len(out) + len(rec) > size:
                        break
                    out += rec
            finally:
                entries.close()  # entries that did not fit are not counted as looked up
        self.reply(unique, bytes(out))

    def _releasedir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, _flags, _rflags, _owner = RELEASE_IN.unpack_from(body)
        self.fs.releasedir(fh)
        self.reply(unique)

    def _fsyncdir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, flags, _pad = FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(fh, bool(flags & FSYNC_FDATASYNC))
        self.reply(unique)
