"""The filesystem operations: a plaintext view of a CIPHERDIR.

encfs.fuse.server (the default) or encfs.fuse.pyfuse3server (``--server pyfuse3``) turns kernel
requests into calls of these methods.

Design:
- FUSE inode numbers are the backing inode numbers (the backing root's
  number and 1 are swapped, since 1 is FUSE's root). Each known inode maps
  to its backing paths; hard links give one inode several paths. The
  backing filesystem reuses the number of an inode we free (last unlink,
  rmdir, rename over it) while the kernel may still hold the old one (an
  open fd, a cwd), so each freed number gets a new FUSE generation.
- Calls that change or walk the tree run alone; calls on one inode's data or
  attributes (server.DATA_OPS: read, write, fsync, setattr, getattr, getxattr,
  open, release, fallocate, lseek) may run alongside calls on other inodes, and reads (reader +
  read_open) alongside reads of the same inode; never alongside a change to
  their own inode (FsServer's locks; pyfuse3's server runs one call at a time).
  So what such calls share across inodes is locked (OpenFiles' handle table,
  BackingDirs' fd cache, each Sealer, the sealing worker) or a single dict/set
  update per inode (_sizes, _no_capability).
- Backing paths (inomap.py) are never given to an os call: backingdirs.BackingDirs makes every
  call through the fd of the entry's backing directory, as gocryptfs does, since a plaintext path
  of up to PATH_MAX has a backing path far past it.
- A file that is open but has lost every name (unlinked while open) is
  reached through the backing fd of an open handle (_target), so fstat,
  ftruncate, fchmod, f*xattr and reopening via /proc/self/fd keep working.
  A FIFO, socket, device or directory has no such handle (the kernel opens a FIFO
  itself; a directory may be a cwd): it is reached through the O_PATH fd its removal
  kept while the kernel holds its number (inomap.py, ``held``), and a removed
  directory lists empty, as on a local filesystem.
- Contents go through content.FileContent, one per open inode (openfiles.OpenFiles:
  per-file data key, sealed blocks of the config's block size, journaled overwrites);
  names, symlink targets and xattrs through names.NameCipher.
- The size the kernel may cache for a regular file is remembered (_sizes): a backing
  file found shorter than that when it is next loaded reads EIO past its end, never
  zeros (it was cut behind encfs's back).
- Anything that fails authentication is logged with its path and answered
  with EIO; wrong bytes are never returned.
- Directory ids (dirids.py) and symlink targets (symlinks.py) are bound to
  their place once the filesystem has the features (FORMAT.md §6.3): a rename
  reseals them. A renamed symlink is a new backing inode; the kernel keeps the
  old number for it until its next lookup (an alias, inomap.py).
- Contents seal and open through a sealing.Sealer each (in process, or in the
  sealing worker once ``sealing`` started it): writes of whole blocks are sealed
  before the server takes the file's lock (seal_ahead; large ones in the worker), and
  large reads are opened in the worker; a file's data key goes there at its first
  large read or write and is dropped when its content closes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_m
import time
from collections.abc import Callable, Generator

from encfs.blocks import BlockCipher
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.dirhandles import DirHandles
from encfs.fuse.dirids import DirIds
from encfs.fuse.fileops import FileOps
from encfs.fuse.fsconfig import BINDING_UPGRADE, FsConfig, FsKeys
from encfs.fuse.fuseerrors import fuse_op
from encfs.fuse.inomap import InodeMap
from encfs.fuse.names import (
    DIRID_LEN,
    NAME_MAX,
    NameAuthError,
    NameCipher,
    is_internal,
    is_longname_entry,
    longname_side_file,
)
from encfs.fuse.namespaceops import NamespaceOps
from encfs.fuse.openfiles import OpenFiles
from encfs.fuse.stalenames import StaleNames
from encfs.fuse.symlinks import Symlinks
from encfs.fuse.xattrops import XattrOps
from encfs.fuseproto.wire import ROOT_ID, EntryAttributes, FuseError, RequestContext, SetattrFields
from encfs.keys.service import KeyService
from encfs.sealing import Sealers

log = logging.getLogger("encfs.fuse")

ATTR_TIMEOUT = 1.0
# A read-write mount holds the mount lock, which keeps every other writer (a second mount,
# `encfs rekey`, `fsck --repair`) out of the backing directory, and the kernel updates its
# dentries for each change made through the mount: so the kernel may keep a name for long
# (S3QL keeps them 300 s), and an unlink skips its LOOKUP (benchmarks/HISTORY.md). A change
# that fails part way has the kernel forget the names (stalenames.py). A read-only mount may
# run beside another host's read-write one (mountlock.py): it keeps names ATTR_TIMEOUT.
ENTRY_TIMEOUT = 3600.0




class EncryptedFS(FileOps, XattrOps, NamespaceOps):
    """The operations of an encfs mount over its CIPHERDIR.

    The server opens every file with keep_cache and negotiates the kernel's
    writeback cache: every change goes through this daemon, so the page cache
    is coherent, and fsync still reaches the backing file before it returns.
    """

    # The content cipher's class. Benchmark hook only (benchmarks/null_mount.py swaps in a
    # null cipher to measure what encryption costs); no command or mount option reaches it.
    cipher_class: type[BlockCipher] = BlockCipher

    def __init__(self, cipherdir: bytes, config: FsConfig, keys: FsKeys, ks: KeyService | None,
                 read_only: bool = False, recovering: bool = False, recovery_root: bytes | None = None) -> None:
        # Resolved: the root's own lstat goes through its fd (backingdirs.py), which follows a
        # symlinked CIPHERDIR, and every other call must name the same directory.
        self.root = os.path.realpath(cipherdir)
        self.config = config
        self.block_size = config.block_size
        self.names = NameCipher(keys.name_key, keys.meta_key)
        self.bd = BackingDirs(self.root)  # every backing call goes through it: paths past PATH_MAX
        # Bound metadata (FORMAT.md §6.3): legacy forms are read until the filesystem has the flags;
        # the upgrade (binding.py) writes bound forms while BINDING_UPGRADE is set.
        upgrading = BINDING_UPGRADE in config.features
        self.dirids = DirIds(self.names, accept_legacy="bound-dirids" not in config.features,
                             write_sealed=upgrading or "bound-dirids" in config.features, read_only=read_only,
                             backing=self.bd)
        self.links = Symlinks(self.names, self.bd, long_targets="long-symlinks" in config.features,
                              accept_legacy="bound-symlinks" not in config.features,
                              write_bound=upgrading or "bound-symlinks" in config.features)
        self.padded_xattrs = "padded-xattr-names" in config.features
        self.ks = ks
        self.read_only = read_only
        # With a sealing worker (sealing.start(): a serving daemon, read-write), large writes of whole
        # blocks are sealed ahead of the file's lock (seal_ahead) and large reads opened there.
        self.sealing = Sealers(self.block_size, self.cipher_class)
        self.files = OpenFiles(self.root, config, ks, self.cipher_class, read_only, self.sealing, recovering,
                               open_path=self.bd.open, recovery_root=recovery_root, fs_keys=keys,
                               check_derived=ks is not None and recovery_root is not None)
        self.files.describe = self.plain_path  # log lines name the plaintext path
        self.inodes = InodeMap(self.root)
        self._dirids: dict[int, bytes] = {ROOT_ID: bytes.fromhex(config.fs_id)[:DIRID_LEN]}
        self._no_capability: set[int] = set()  # inodes known to lack CAPABILITY_XATTR
        # FIFOs, sockets and devices among the inodes the kernel holds (their xattrs' form: xattrops.py),
        # noted from their attributes: the kernel learns every number from an attribute reply first.
        self._special_inodes: set[int] = set()
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._sizes: dict[int, int] = {}  # regular files' sizes as last reported to the kernel
        self._dirs = DirHandles()
        self.entry_timeout = ATTR_TIMEOUT if read_only else ENTRY_TIMEOUT
        # A LOOKUP of a name that does not exist is answered as a negative entry (node 0) that the
        # kernel keeps for as long as a positive one: SQLite stats its absent -journal and -wal
        # files before every transaction. The kernel drops it when the name is made through the mount.
        self.negative_entry = EntryAttributes(entry_timeout=self.entry_timeout)
        self.stale_names = StaleNames()  # names to make the kernel forget (the servers drain it)

    # -- inode and path bookkeeping ---------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        return self.inodes.ino(st)

    def _path(self, inode: int) -> bytes:
        return self.inodes.path(inode)

    def unreachable(self, inode: int) -> bool:
        """Whether ``inode`` has no name, no open handle and no held fd left: _target's ENOENT.
        Each is one atomic lookup; without the namespace lock, see server.py for when the three
        make one view."""
        return not self.inodes.paths.get(inode) and not self.files.is_open(inode) and inode not in self.inodes.held

    def _target(self, inode: int) -> bytes | int:
        """A backing path of ``inode`` or, once it has no name left, an open handle's backing fd
        (a regular file) or the O_PATH fd its removal kept (anything else)."""
        path = self.inodes.any_path(inode)
        if path is not None:
            return path
        fd = self.files.fd_of(inode)
        if fd is None:
            fd = self.inodes.held_fd(inode)
        if fd is None:
            raise FuseError(errno.ENOENT)
        return fd

    def _check_writable(self) -> None:
        if self.read_only:
            raise FuseError(errno.EROFS)

    # -- names --------------------------------------------------------------------

    def _dirid(self, inode: int) -> bytes:
        dirid = self._dirids.get(inode)
        if dirid is None:
            dirid = self._dirids[inode] = self._dirid_at(self._path(inode))
        return dirid

    def _dirid_at(self, path: bytes) -> bytes:
        """The id of the backing directory ``path``, checked against its place (dirids.py)."""
        if path == self.root:
            return self._dirids[ROOT_ID]
        ino = self._ino(self.bd.lstat(path))
        dirid = self._dirids.get(ino)
        if dirid is not None:
            return dirid
        dirid = self.dirids.read(path, self._dirid_at(os.path.dirname(path)))
        if self.inodes.known(ino):  # known to the kernel: forgotten (and dropped) with it
            self._dirids[ino] = dirid
        return dirid

    def _child(self, parent: int, name: bytes) -> tuple[bytes, bytes | None]:
        """(backing path, long-name side-file content or None) of ``name`` in ``parent``."""
        if len(name) > NAME_MAX:
            raise FuseError(errno.ENAMETOOLONG)
        if name in (b".", b"..") or not name:
            raise FuseError(errno.EINVAL)
        encoded = self.names.encrypt_name(name, self._dirid(parent))
        entry, side = self.names.backing_entry(encoded)
        return os.path.join(self._path(parent), entry), side

    def _write_side(self, path: bytes, side: bytes | None) -> None:
        if side is not None:
            self.bd.write_atomic(longname_side_file(path), side, 0o444)

    def _remove_side(self, path: bytes, side: bytes | None) -> None:
        if side is not None:
            try:
                self.bd.unlink(longname_side_file(path))
            except FileNotFoundError:
                pass

    def plain_path(self, backing: bytes) -> str:
        """The plaintext path of a backing path, for log lines. Best effort: if a name cannot
        be read (damage, a racing rename) the backing path, relative to the cipherdir."""
        rel = os.path.relpath(backing, self.root)
        if not backing.startswith(self.root) or rel.startswith(b".."):
            return os.fsdecode(backing)  # "<unlinked fd N>"
        try:
            cur, plain = self.root, []
            for entry in [] if rel == b"." else rel.split(b"/"):
                plain.append(self._plain_name(cur, self._dirid_at(cur), entry))
                cur = os.path.join(cur, entry)
            return os.fsdecode(b"/" + b"/".join(plain))
        except Exception:  # noqa: BLE001 - a log line must not fail the operation it reports
            return f"<cipherdir>/{os.fsdecode(rel)}"

    def _plain_name(self, dir_path: bytes, dirid: bytes, entry: bytes) -> bytes:
        encoded = entry
        if is_longname_entry(entry):
            encoded = self.bd.read_file(longname_side_file(os.path.join(dir_path, entry)))
            if self.names.backing_entry(encoded)[0] != entry:
                raise NameAuthError("its long-name side file does not match the entry's hash")
        return self.names.decrypt_name(encoded, dirid)

    # -- attributes -----------------------------------------------------------------

    def _attrs(self, st: os.stat_result, inode: int | None = None,
               path: bytes | None = None) -> EntryAttributes:
        """Plaintext attributes; symlinks need their backing ``path`` for the target length."""
        e = EntryAttributes()
        e.st_ino = inode if inode is not None else self._ino(st)
        e.generation = self.inodes.generation(e.st_ino)
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        # The FIFO/socket/device set follows every attribute reply (also a number another host's
        # writer reused for another kind of file).
        if stat_m.S_ISREG(st.st_mode):
            e.st_size = self.files.size_for_lookup(e.st_ino, path, st.st_size)
            self._sizes[e.st_ino] = e.st_size
            self._special_inodes.discard(e.st_ino)
        elif stat_m.S_ISLNK(st.st_mode):
            e.st_size = self.names.symlink_size(self.bd.readlink(path)) if path is not None else 0
            self._special_inodes.discard(e.st_ino)
        else:
            e.st_size = st.st_size
            if stat_m.S_ISDIR(st.st_mode):
                self._special_inodes.discard(e.st_ino)
            else:
                self._special_inodes.add(e.st_ino)
        e.st_blksize = 4096  # FUSE makes this the inode's i_blkbits: above the page size, writes got slower here
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _entry(self, path: bytes, count: bool = True, st: os.stat_result | None = None) -> EntryAttributes:
        """The entry ``path`` (``st``: its stat, when the caller holds it open), remembered for
        the kernel's lookup count."""
        if st is None:
            st = self.bd.lstat(path)
        inode = self._ino(st)
        self.inodes.remember(inode, path, count)
        return self._attrs(st, inode, path)

    # -- lookups and attributes ---------------------------------------------------------

    @fuse_op
    def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        attrs: EntryAttributes = self.lookup_or_absent(parent_inode, name, ctx)
        if attrs is self.negative_entry:
            raise FuseError(errno.ENOENT)
        return attrs

    @fuse_op
    def lookup_or_absent(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        """What the servers answer a LOOKUP with: the entry, or negative_entry for an absent name."""
        path, _side = self._child(parent_inode, name)
        try:
            return self._entry(path)
        except FileNotFoundError:
            return self.negative_entry

    @fuse_op
    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            if not self.inodes.forget(inode, nlookup):
                continue
            self._no_capability.discard(inode)
            self._special_inodes.discard(inode)
            self._sizes.pop(inode, None)
            self.inodes.release_held(inode)
            if not self.files.is_open(inode):
                self.inodes.drop_paths(inode)
                self._dirids.pop(inode, None)

    @fuse_op
    def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        target = self._target(inode)
        return self._attrs(self.bd.lstat(target), inode, target if isinstance(target, bytes) else None)

    @fuse_op
    def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields,
                fh: int | None, ctx: RequestContext) -> EntryAttributes:
        self._check_writable()
        target = self._target(inode)  # a path is not followed (it may be a symlink); an fd is the file
        if fields.update_size:
            self._truncate(inode, target, attr.st_size, self.files.get(fh) if fh is not None else None)
        if fields.update_mode and not stat_m.S_ISLNK(self.bd.lstat(target).st_mode):
            self.bd.chmod(target, stat_m.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            self.bd.chown(target, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
        if fields.update_size or fields.update_uid or fields.update_gid:  # as the VFS does (xattrops.py)
            if fields.kill_suidgid:
                self._kill_suidgid(target)
            if inode not in self._no_capability and stat_m.S_ISREG(self.bd.lstat(target).st_mode):
                self.drop_capability(inode)
        if fields.update_atime and fields.update_mtime:
            self.bd.utime(target, (attr.st_atime_ns, attr.st_mtime_ns))
        elif fields.update_atime or fields.update_mtime:
            st = self.bd.lstat(target)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            self.bd.utime(target, (atime, mtime))
        return self._attrs(self.bd.lstat(target), inode, target if isinstance(target, bytes) else None)

    @fuse_op
    def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        path = self._path(inode)
        return self.links.read(path, self._dirid_at(os.path.dirname(path)))

    @fuse_op
    def access(self, inode: int, mask: int, ctx: RequestContext) -> None:
        """access(2) for the mounting user (the only one let in without default_permissions):
        the daemon runs as that user and the backing entry has the plaintext mode and owner."""
        target, mode = self._target(inode), mask & (os.R_OK | os.W_OK | os.X_OK)
        # a file with no name left: through its open handle's fd
        if not (os.access(f"/proc/self/fd/{target}", mode, effective_ids=True) if isinstance(target, int)
                else self.bd.access(target, mode)):
            raise FuseError(errno.EACCES)

    @fuse_op
    def statfs(self, ctx: RequestContext) -> os.statvfs_result:
        """The backing filesystem's figures; the server reports NAME_MAX as the name limit."""
        return os.statvfs(self.root)

    # -- directories ------------------------------------------------------------------------

    @fuse_op
    def opendir(self, inode: int, ctx: RequestContext) -> int:
        if isinstance(self._target(inode), bytes):  # else removed (a cwd): it lists empty
            self._dirid(inode)
        return self._dirs.open(inode)

    def readdir(self, fh: int, start_id: int, plus: bool) -> Generator[tuple[bytes, EntryAttributes, int]]:
        """(name, attributes, offset of the next entry) from offset ``start_id`` on.

        The consumer stops iterating once its reply is full. An entry counts as
        looked up (``plus``: the kernel instantiates it) only once the consumer
        asks for the one after it, so entries that did not fit are not counted.
        """
        d = self._dirs[fh]
        path = self.inodes.any_path(d.inode)  # the directory may have been renamed since opendir
        if path is None:
            self._target(d.inode)  # ENOENT unless removed while the kernel holds it: then empty
            return
        dirid = self._dirid(d.inode)
        entries = d.listing(start_id, lambda: self.bd.listdir(path))  # see dirhandles.py
        for i in range(start_id, len(entries)):
            entry = entries[i]
            child = os.path.join(path, entry)
            try:
                name = self._plain_name(path, dirid, entry)
                st = self.bd.lstat(child)
            except FileNotFoundError:
                continue  # removed since opendir
            except (NameAuthError, OSError) as e:
                log.error("%r: skipping undecryptable entry: %s", child, e)
                continue
            inode = self._ino(st)
            yield name, self._attrs(st, inode, child), i + 1
            self.inodes.remember(inode, child, count=plus)

    @fuse_op
    def releasedir(self, fh: int) -> None:
        self._dirs.release(fh)

    @fuse_op
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.bd.fsync_dir(self._target(self._dirs[fh].inode))

    # -- files (their operations: fileops.py) -----------------------------------------------

    def run_deferred(self, locked: Callable[[int], contextlib.AbstractContextManager[object]]) -> float | None:
        """Write the pending synced sizes and run the deferred checkpoints that are due
        (openfiles.py), each under ``locked(inode)`` (the server's lock of that inode); returns
        when the next one is due (time.monotonic)."""
        now = time.monotonic()
        states, states_later = self.files.states_due(now)
        for inode in states:
            with locked(inode):
                self.files.write_pending_state(inode)
        due, later = self.files.closed_due(now)
        for inode in due:
            with locked(inode):
                self.files.checkpoint_closed(inode)
        return min((t for t in (later, states_later) if t is not None), default=None)

    def recover_all(self, exclusive: Callable[[], contextlib.AbstractContextManager[object]]) -> tuple[int, list[bytes]]:
        """After an unclean shutdown: check every regular file for crash recovery now, each one
        under ``exclusive()`` (the server's lock), so that a file nobody looks up during this
        mount is not left for a later one; then remove the journals of files that are gone.
        Returns the number of files checked and those whose recovery failed or could only be
        made in memory (the next mount tries them again)."""
        checked = 0

        def unlisted(e: OSError) -> None:  # its files are not met: their journals must stay
            log.error("crash recovery cannot list %r: %s", e.filename, e.strerror)
            self.files.scan_incomplete = True
        for dirpath, dirnames, filenames, dir_fd in os.fwalk(self.root, onerror=unlisted):  # by fds: past PATH_MAX
            dirnames[:] = [d for d in dirnames if not is_internal(d)]
            for name in filenames:
                if is_internal(name):
                    continue
                path = os.path.join(dirpath, name)
                with exclusive():
                    try:
                        st = os.lstat(name, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue
                    if stat_m.S_ISREG(st.st_mode):
                        self.files.size_for_lookup(self._ino(st), path, st.st_size)
                        checked += 1
        with exclusive():
            for file_id in self.files.remove_orphan_journals():
                log.warning("removed the journal of a file that no longer exists (%s)", file_id.hex())
            self.files.recovering = False
        if self.files.scan_incomplete and not self.files.unrecovered:
            self.files.unrecovered.append(self.root)  # the next mount scans again
        return checked, self.files.unrecovered

    def close_all(self) -> bool:
        """Close every open file (unmount): journals are checkpointed. False if a file's sync
        had failed (OpenFiles.close_all): the mount did not end cleanly."""
        durable = self.files.close_all()
        self.inodes.close()
        self.files.keys.clear()
        self.bd.close()
        return durable
