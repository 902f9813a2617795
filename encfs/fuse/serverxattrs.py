"""The xattr requests of the filesystem's FUSE server: SETXATTR, GETXATTR, LISTXATTR and
REMOVEXATTR, decoded into EncryptedFS calls. A mixin of FsServer (server.py, whose invariants hold
for these too: they are registered in its handler table and run under its locks like the others).

Invariants:
- A GETXATTR of security.capability for an inode known to lack it (the kernel's question before
  a file's first write after each attribute reply) is answered ENODATA from that set before any
  lock (``_capability_known``): the set changes under the inode's lock, and an answer read beside
  such a change is one ordered before it.
- GETXATTR and LISTXATTR with size 0 answer the length; with a size too small, ERANGE.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from encfs.fuse.xattrops import CAPABILITY_XATTR
from encfs.fuseproto.server import Handler
from encfs.fuseproto.wire import GETXATTR_IN, Request, RequestContext, request_names, setxattr_request, xattr_reply

if TYPE_CHECKING:
    from encfs.fuse.fs import EncryptedFS


class XattrRequests:
    """SETXATTR, GETXATTR, LISTXATTR and REMOVEXATTR of FsServer."""

    if TYPE_CHECKING:  # defined by FsServer (server.py) and its base, FuseServer
        fs: EncryptedFS

        def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> None: ...

        def reply_error(self, unique: int, error: int, drain: bool = True) -> None: ...

    def _setxattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        name, value, flags = setxattr_request(body)
        self.fs.setxattr(node, name, value, ctx, flags)
        self.reply(unique)

    def _capability_known(self, locked: Handler) -> Handler:
        """GETXATTR: security.capability of an inode known to lack it is answered without the
        locks (see the invariants); anything else goes to ``locked``."""
        lacks = self.fs.lacks_capability
        asked = CAPABILITY_XATTR + b"\0"
        start, end = GETXATTR_IN.size, GETXATTR_IN.size + len(asked)

        def run(req: Request) -> bool | None:
            if lacks(req.node) and req.body[start:end] == asked:
                self.reply_error(req.unique, errno.ENODATA, drain=False)  # see server.py's invariants
                return None
            return locked(req)
        return run

    def _getxattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        size, _pad = GETXATTR_IN.unpack_from(body)
        (name,) = request_names(body[GETXATTR_IN.size:], 1)
        self._xattr_data(unique, self.fs.getxattr(node, name, ctx), size)

    def _listxattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        size, _pad = GETXATTR_IN.unpack_from(body)
        self._xattr_data(unique, b"".join(n + b"\0" for n in self.fs.listxattr(node, ctx)), size)

    def _xattr_data(self, unique: int, data: bytes, size: int) -> None:
        payload, error = xattr_reply(data, size)
        if error:
            self.reply_error(unique, error)
        else:
            self.reply(unique, payload)

    def _removexattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.fs.removexattr(node, request_names(body, 1)[0], ctx)
        self.reply(unique)
