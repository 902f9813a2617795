"""The backing store reached through directory fds and the ``*at()`` calls (as gocryptfs does).

A plaintext path of up to PATH_MAX - 1 (4,095) bytes made of 255-byte components can have
a backing path far longer than that: a 159-byte name has a 235-byte backing name (longer
ones are hashed, names.py). The kernel refuses a path of PATH_MAX bytes or more in any one call
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
  absolute path, opened once (its length is the user's choice).
- Directory fds are cached by backing path (as gocryptfs's dirCache): at most ``CACHE_SIZE``
  of them, each for at most ``CACHE_TTL`` seconds (fs.ATTR_TIMEOUT), so a rename behind
  encfs's back (a read-only mount beside another host's) is seen within it. A rename or rmdir
  made here drops every cached fd at or under the paths it changed before it returns, and a
  fd opened while such a change ran is used for its one call but not cached. A cached fd is
  closed only once no call is using it (RLIMIT_NOFILE: CACHE_SIZE + 1 fds, plus one for each
  call in flight).
- The walk follows no symlink and never leaves the CIPHERDIR (openat2 RESOLVE_NO_SYMLINKS |
  RESOLVE_BENEATH; O_NOFOLLOW per component on kernels before 5.6): a backing directory
  replaced by a symlink is refused, not followed.
- A target given as an int is the open backing fd of a file that may have lost every name
  (fs.py's _target): attribute and xattr calls go to it directly, or, for an O_PATH fd (which
  the f*() calls refuse with EBADF), through its /proc/self/fd link, which leads to the file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Self, TypeVar

from encfs.atomicfile import write_atomic
from encfs.diskio import pwrite_all, renameat2
from encfs.fuse.backingtimes import open_quiet

T = TypeVar("T")

# The longest path handed to one openat() while walking: below PATH_MAX (4,096 with its NUL)
# with room to spare, and cut at a '/', so every chunk is whole components.
CHUNK = 4000
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)
# Without the cache every call opened its directory: getattr 8 levels down ran at 0.62 of its
# former rate in the daemon, 0.89 with it (benchmarks/HISTORY.md). 1 s is fs.py's ATTR_TIMEOUT.
CACHE_SIZE = 64
CACHE_TTL = 1.0

Target = bytes | int

# openat2(2): RESOLVE_NO_SYMLINKS refuses a symlink anywhere in the walk (ELOOP), RESOLVE_BENEATH
# any ".." or absolute path out of the directory. A backing store the attacker can write to
# (FORMAT.md §6.6) must not steer the daemon, which may run as root, out of the CIPHERDIR by
# turning a backing directory into a symlink, as gocryptfs's audit found (CVE-2020-26222 class).
_SYS_OPENAT2 = 437  # x86-64 and aarch64 alike (the unified syscall table)
_RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x04, 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW = _OpenHow(_DIR_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH)
_openat2_works = True


def _open_beneath(dir_fd: int, rel: bytes) -> int:
    """An O_PATH fd of the directory ``rel`` below ``dir_fd``, following no symlink on the way
    (ELOOP if one is met, ENOTDIR if the last component is not a directory)."""
    global _openat2_works
    if _openat2_works:
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), ctypes.c_char_p(rel),
                           ctypes.byref(_HOW), ctypes.c_long(ctypes.sizeof(_HOW)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), rel)
        _openat2_works = False  # a kernel before 5.6: one component at a time, each O_NOFOLLOW
    fd = dir_fd
    try:
        for part in rel.split(b"/"):
            if part in (b"", b".", b".."):
                raise OSError(errno.EXDEV, "not a plain relative backing path", rel)
            next_fd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = next_fd
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def open_under(root: bytes, path: bytes, flags: int, mode: int = 0o777) -> int:
    """open(2) of the backing entry ``path`` under ``root`` through directory fds, for the tools
    that open files one at a time by path (rekey): O_NOATIME where allowed, as their reads are
    not the user's (backingtimes.py)."""
    with BackingDirs(root) as bd:
        return open_quiet(lambda f: bd.open(path, f, mode), flags)


class _Cached:
    __slots__ = ("born", "fd", "retired", "users")

    def __init__(self, fd: int, born: float) -> None:
        self.fd, self.born, self.users, self.retired = fd, born, 1, False


class BackingDirs:
    """Calls on backing entries named by full backing paths (under ``root``), made through
    directory fds; see the module docstring."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._prefix = root.rstrip(b"/") + b"/"
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()  # relative directory path -> its fd
        self._changes = 0  # renames and rmdirs begun: a fd opened across one is not cached

    def close(self) -> None:
        with self._lock:
            for entry in self._cache.values():
                self._retire(entry)
            self._cache.clear()
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
                next_fd = _open_beneath(fd, chunk)
                if fd != self.root_fd:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        return fd

    def _borrow(self, head: bytes) -> _Cached:
        """The fd of the backing directory ``head`` (relative, non-empty), cached; _give_back it."""
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(head)
            if entry is not None and now - entry.born < CACHE_TTL:
                entry.users += 1
                self._cache.move_to_end(head)
                return entry
            changes = self._changes
        entry = _Cached(self._open_dir(head), now)
        with self._lock:
            if changes != self._changes:  # a rename or rmdir ran meanwhile: this fd may be stale
                entry.retired = True
                return entry
            old = self._cache.pop(head, None)
            if old is not None:
                self._retire(old)
            self._cache[head] = entry
            while len(self._cache) > CACHE_SIZE:
                self._retire(self._cache.popitem(last=False)[1])
        return entry

    def _give_back(self, entry: _Cached) -> None:
        with self._lock:
            entry.users -= 1
            if entry.retired and entry.users == 0:
                os.close(entry.fd)

    def _retire(self, entry: _Cached) -> None:
        """(under the lock) Out of the cache: closed now, or by the last call that uses it."""
        entry.retired = True
        if entry.users == 0:
            os.close(entry.fd)

    def _changed(self, *paths: bytes) -> None:
        """Drop the cached fds at or under ``paths`` (a rename or rmdir of them is under way)."""
        rels = [p[len(self._prefix):] for p in paths if p.startswith(self._prefix)]
        with self._lock:
            self._changes += 1
            for key in [k for k in self._cache if any(k == r or k.startswith(r + b"/") for r in rels)]:
                self._retire(self._cache.pop(key))

    def at(self, path: bytes, call: Callable[[int, bytes], T]) -> T:
        """``call(directory fd, name)`` for the backing entry ``path``; the root itself is
        (root fd, its absolute path), which the ``*at()`` calls take as is."""
        if not path.startswith(self._prefix):
            if path.rstrip(b"/") + b"/" == self._prefix:
                return call(self.root_fd, self.root)
            raise ValueError(f"{path!r} is not under the backing root")
        head, _, name = path[len(self._prefix):].rpartition(b"/")
        if not head:
            return call(self.root_fd, name)
        entry = self._borrow(head)
        try:
            return call(entry.fd, name)
        finally:
            self._give_back(entry)

    def open_dir(self, path: bytes) -> int:
        """An O_PATH fd of the backing directory ``path``; the caller closes it."""
        return self.at(path, lambda d, n: os.open(n, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=d))

    @staticmethod
    def _proc(fd: int, name: bytes) -> bytes:
        return name if name.startswith(b"/") else b"/proc/self/fd/%d/%s" % (fd, name)

    @staticmethod
    def _on_fd(fd: int, by_fd: Callable[[int], T], by_path: Callable[[str], T]) -> T:
        """A call on the file behind ``fd``: an O_PATH fd (inomap.py's held fds) is refused by
        the f*() calls (EBADF), its /proc/self/fd link is not."""
        try:
            return by_fd(fd)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
        return by_path(f"/proc/self/fd/{fd}")

    # -- entries ------------------------------------------------------------------------

    def lstat(self, target: Target) -> os.stat_result:
        if isinstance(target, int):
            return os.fstat(target)
        if target == self.root:  # the parent of every top-level entry: no walk of the absolute path
            return os.fstat(self.root_fd)
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
        self._changed(path)
        try:
            self.at(path, lambda d, n: os.rmdir(n, dir_fd=d))
        finally:
            self._changed(path)

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
            self._on_fd(target, lambda fd: os.fchmod(fd, mode), lambda p: os.chmod(p, mode))
        else:
            self.at(target, lambda d, n: os.chmod(n, mode, dir_fd=d))

    def chown(self, target: Target, uid: int, gid: int) -> None:
        if isinstance(target, int):
            self._on_fd(target, lambda fd: os.fchown(fd, uid, gid), lambda p: os.chown(p, uid, gid))
        else:
            self.at(target, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))

    def utime(self, target: Target, ns: tuple[int, int]) -> None:
        if isinstance(target, int):
            self._on_fd(target, lambda fd: os.utime(fd, ns=ns), lambda p: os.utime(p, ns=ns))
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

    def fsync_dir(self, target: Target) -> None:
        fd = self.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
                else:
                    renameat2(n_old, n_new, flags, d_old, d_new)
            self.at(new, dst)
        self._changed(old, new)  # before and after: a call running alongside may cache an fd meanwhile
        try:
            self.at(old, src)
        finally:
            self._changed(old, new)

    def link(self, src: bytes, path: bytes) -> None:
        def outer(d_src: int, n_src: bytes) -> None:
            self.at(path, lambda d, n: os.link(n_src, n, src_dir_fd=d_src, dst_dir_fd=d, follow_symlinks=False))
        self.at(src, outer)

    def write_atomic(self, path: bytes, data: bytes, mode: int) -> None:
        """atomicfile.write_atomic, in the backing directory of ``path``."""
        self.at(path, lambda d, n: write_atomic(n, data, mode, dir_fd=d))

    def write_new(self, path: bytes, data: bytes, mode: int) -> None:
        """A new file ``path`` (FileExistsError if there is one) holding ``data``, not synced: for
        a file whose loss or tear a crash may cause because another copy covers it."""
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)

    # -- xattrs (no *at() form: through /proc/self/fd/<dir fd>/<name>, not following a symlink) --

    def _xattr(self, func: Callable[..., Any], target: Target, *args: Any) -> Any:
        if isinstance(target, int):
            return self._on_fd(target, lambda fd: func(fd, *args), lambda p: func(p, *args))
        return self.at(target, lambda d, n: func(self._proc(d, n), *args, follow_symlinks=False))

    def getxattr(self, target: Target, name: bytes | str) -> bytes:
        return self._xattr(os.getxattr, target, name)  # type: ignore[no-any-return]

    def setxattr(self, target: Target, name: bytes | str, value: bytes, flags: int = 0) -> None:
        self._xattr(os.setxattr, target, name, value, flags)

    def removexattr(self, target: Target, name: bytes | str) -> None:
        self._xattr(os.removexattr, target, name)

    def listxattr(self, target: Target) -> list[str]:
        return self._xattr(os.listxattr, target)  # type: ignore[no-any-return]
