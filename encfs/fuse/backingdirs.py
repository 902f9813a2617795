"""The backing store reached through directory fds and the ``*at()`` calls (as gocryptfs does).

A plaintext path of up to PATH_MAX - 1 (4,095) bytes made of 255-byte components can have
a backing path far longer than that: an encrypted name is up to 255 bytes for a 160-byte
plaintext one. The kernel refuses a path of PATH_MAX bytes or more in any one call
(ENAMETOOLONG), so no call here is given a full backing path: each one opens the backing
directory that holds its entry, walking down from the CIPHERDIR's root fd with
openat(O_PATH | O_DIRECTORY) a chunk of at most ``CHUNK`` bytes of whole components at a
time, and then makes the ``*at()`` call with the entry's own name. Calls that have no
``*at()`` form (the xattr calls) go through ``/proc/self/fd/<directory fd>/<name>``.

Backing paths stay the currency of the rest of encfs.fuse (inomap.py keeps them for the
inode numbers the kernel holds): they are plain bytes, of any length, and this module is
the one place that turns them into calls.

Invariants:
- No os call here is given more than ``CHUNK`` bytes of path, except the CIPHERDIR's own
  absolute path (its length is the user's choice, checked at mount like any path).
- A directory fd lives for one call only, so a rename or rmdir of the directory, by encfs
  or behind its back, is seen by the next call exactly as a path lookup would see it; the
  CIPHERDIR's root fd lives as long as the filesystem (RLIMIT_NOFILE: one fd, plus one for
  each call in flight).
- A target given as an int is the open backing fd of a file that may have lost every name
  (fs.py's _target): attribute and xattr calls go to it directly.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from typing import Any, Self, TypeVar

from encfs.diskio import pwrite_all

T = TypeVar("T")

# The longest path handed to one openat() while walking: below PATH_MAX (4,096 with its NUL)
# with room to spare, and cut at a '/', so every chunk is whole components.
CHUNK = 4000
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)

Target = bytes | int


class BackingDirs:
    """Calls on backing entries named by full backing paths (under ``root``), made through
    directory fds; see the module docstring."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._prefix = root.rstrip(b"/") + b"/"
        self.root_fd = os.open(root, _DIR_FLAGS)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1  # a later call fails with EBADF, never on a reused number

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking ------------------------------------------------------------------------

    def _open_dir(self, rel: bytes) -> int:
        """An O_PATH fd of the backing directory ``rel`` (relative to the root, non-empty)."""
        fd = self.root_fd
        try:
            while rel:
                if len(rel) <= CHUNK:
                    chunk, rel = rel, b""
                else:
                    cut = rel.rfind(b"/", 0, CHUNK + 1)
                    chunk, rel = rel[:cut], rel[cut + 1:]
                next_fd = os.open(chunk, _DIR_FLAGS, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the directory holding ``path``, ``path``'s name in it). The root itself is
        (root fd, its absolute path), which the ``*at()`` calls take as is."""
        if not path.startswith(self._prefix):
            if path.rstrip(b"/") + b"/" == self._prefix:
                return self.root_fd, self.root
            raise ValueError(f"{path!r} is not under the backing root")
        head, _, name = path[len(self._prefix):].rpartition(b"/")
        return (self._open_dir(head) if head else self.root_fd), name

    def at(self, path: bytes, call: Callable[[int, bytes], T]) -> T:
        """``call(directory fd, name)`` for the backing entry ``path``."""
        fd, name = self._parent(path)
        try:
            return call(fd, name)
        finally:
            if fd != self.root_fd:
                os.close(fd)

    def open_dir(self, path: bytes) -> int:
        """An O_PATH fd of the backing directory ``path``; the caller closes it."""
        return self.at(path, lambda d, n: os.open(n, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=d))

    @staticmethod
    def _proc(fd: int, name: bytes) -> bytes:
        return name if name.startswith(b"/") else b"/proc/self/fd/%d/%s" % (fd, name)

    # -- entries ------------------------------------------------------------------------

    def lstat(self, target: Target) -> os.stat_result:
        if isinstance(target, int):
            return os.fstat(target)
        return self.at(target, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False))

    def lexists(self, path: bytes) -> bool:
        try:
            self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def isdir(self, path: bytes) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def open(self, target: Target, flags: int, mode: int = 0o777) -> int:
        """open(2) of a backing entry, or a new open of the file behind an fd (one with no name left)."""
        if isinstance(target, int):
            return os.open(f"/proc/self/fd/{target}", flags, mode)
        return self.at(target, lambda d, n: os.open(n, flags, mode, dir_fd=d))

    def read_file(self, path: bytes, limit: int = -1) -> bytes:
        fd = self.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with open(fd, "rb") as f:
            return f.read(limit)

    def mkdir(self, path: bytes, mode: int) -> None:
        self.at(path, lambda d, n: os.mkdir(n, mode, dir_fd=d))

    def rmdir(self, path: bytes) -> None:
        self.at(path, lambda d, n: os.rmdir(n, dir_fd=d))

    def unlink(self, path: bytes) -> None:
        self.at(path, lambda d, n: os.unlink(n, dir_fd=d))

    def symlink(self, stored: bytes, path: bytes) -> None:
        self.at(path, lambda d, n: os.symlink(stored, n, dir_fd=d))

    def readlink(self, path: bytes) -> bytes:
        return self.at(path, lambda d, n: os.readlink(n, dir_fd=d))

    def mknod(self, path: bytes, mode: int, device: int = 0) -> None:
        self.at(path, lambda d, n: os.mknod(n, mode, device, dir_fd=d))

    def chmod(self, target: Target, mode: int) -> None:
        """chmod of a file or directory (Linux cannot chmod a symlink itself)."""
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            self.at(target, lambda d, n: os.chmod(n, mode, dir_fd=d))

    def chown(self, target: Target, uid: int, gid: int) -> None:
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            self.at(target, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))

    def utime(self, target: Target, ns: tuple[int, int]) -> None:
        if isinstance(target, int):
            os.utime(target, ns=ns)
        else:
            self.at(target, lambda d, n: os.utime(n, ns=ns, dir_fd=d, follow_symlinks=False))

    def access(self, path: bytes, mode: int) -> bool:
        return self.at(path, lambda d, n: os.access(n, mode, dir_fd=d, effective_ids=True,
                                                    follow_symlinks=False))

    def listdir(self, path: bytes) -> list[bytes]:
        fd = self.at(path, lambda d, n: os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d))
        try:
            return [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)

    def fsync_dir(self, path: bytes) -> None:
        fd = self.at(path, lambda d, n: os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        """renameat2(2) of ``old`` to ``new``: RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT."""
        def src(d_old: int, n_old: bytes) -> None:
            def dst(d_new: int, n_new: bytes) -> None:
                if not flags:
                    os.rename(n_old, n_new, src_dir_fd=d_old, dst_dir_fd=d_new)
                elif _libc.renameat2(d_old, n_old, d_new, n_new, ctypes.c_uint(flags)) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            self.at(new, dst)
        self.at(old, src)

    def link(self, src: bytes, path: bytes) -> None:
        def outer(d_src: int, n_src: bytes) -> None:
            self.at(path, lambda d, n: os.link(n_src, n, src_dir_fd=d_src, dst_dir_fd=d, follow_symlinks=False))
        self.at(src, outer)

    def write_atomic(self, path: bytes, data: bytes, mode: int) -> None:
        """atomicfile.write_atomic, in the backing directory of ``path``."""
        def write(d: int, n: bytes) -> None:
            tmp = n + b".tmp.%d" % os.getpid()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode, dir_fd=d)
            try:
                try:
                    pwrite_all(fd, data, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, n, src_dir_fd=d, dst_dir_fd=d)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=d)
                except FileNotFoundError:
                    pass
                raise
        self.at(path, write)

    # -- xattrs (no *at() form: through /proc/self/fd/<dir fd>/<name>, not following a symlink) --

    def _xattr(self, func: Callable[..., Any], target: Target, *args: Any) -> Any:
        if isinstance(target, int):
            return func(target, *args)
        return self.at(target, lambda d, n: func(self._proc(d, n), *args, follow_symlinks=False))

    def getxattr(self, target: Target, name: bytes | str) -> bytes:
        return self._xattr(os.getxattr, target, name)  # type: ignore[no-any-return]

    def setxattr(self, target: Target, name: bytes | str, value: bytes, flags: int = 0) -> None:
        self._xattr(os.setxattr, target, name, value, flags)

    def removexattr(self, target: Target, name: bytes | str) -> None:
        self._xattr(os.removexattr, target, name)

    def listxattr(self, target: Target) -> list[str]:
        return self._xattr(os.listxattr, target)  # type: ignore[no-any-return]
