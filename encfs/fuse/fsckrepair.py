"""``encfs fsck --repair CIPHERDIR``: the repairs of the findings fsck.py made, each through the
filesystem core's own writers (open_config, DirIds, EncryptedFS), under the mount lock.

- A missing, damaged or stale config copy: rewritten from the good one (open_config, writable).
- A directory id copy that is missing or does not authenticate: rewritten with the bytes of the
  copy that does (DirIds.read, writable); an empty directory without an id gets a new one.
- Orphaned bookkeeping (fsck.py says when it is provably not needed): removed.
- A file whose torn header is all it has (1 to 127 bytes: it shows as empty, and reads fail): emptied.
- A regular file with blocks that fail authentication: a new file ``lost+found/<name>`` (the
  directory is made at the root by EncryptedFS.mkdir, so it is encrypted like any other) gets
  every block that opens, and zeros for each damaged block, and every xattr that decrypts;
  ``lost+found/<name>.fsck`` lists the file's old paths, its size and the damaged byte ranges; then
  every backing name of the old file is removed, with its journal and state file. The copy and
  the report are written as ``<name>.fsck-partial`` and ``<name>.fsck.fsck-partial`` and renamed
  once both are fsync'd (the report first): a repair killed (or failing, a full disk) mid-copy
  leaves no file under a name of lost+found that looks recovered; the next fsck drops the partial
  files. The report ends with the file's id, backing inode and change time: a repair killed after
  renaming it finds it again, and makes the copy under its name (killed before the copy's rename) or
  only removes the file (killed after it, the copy a regular file of the file's size), so one copy
  and one report stay; a file restored or changed since (another inode or change time) gets a copy
  and report of its own, and so does a hard-linked file whose removal was killed after its first
  name went (that changed its change time): two whole copies then. A file whose name
  does not decrypt (its contents do not depend on its name) is renamed, as its backing file, to
  ``lost+found/#<inode>``.

Invariants:
- Nothing readable is lost: a damaged file is removed only after its copy in lost+found and
  the report beside it were written and fsync'd; a block that fails is never written anywhere
  as anything but zeros listed in the report.
- A repair that fails is a finding of kind "repair" (exit 4), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_m
from collections.abc import Callable
from pathlib import Path

from encfs.errors import EncfsError
from encfs.fsckreport import Finding
from encfs.fuse import fsck
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.fileheader import HEADER_LEN, FileHeader, HeaderError, state_file
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsckcontent import FileCheck, read_blocks
from encfs.fuse.fsconfig import open_config
from encfs.fuse.journal import journal_path
from encfs.fuse.names import NameAuthError, longname_side_file
from encfs.fuseproto.wire import ROOT_ID, FuseError, RequestContext


class Repairer:
    """The writable side of a repair: one EncryptedFS over the CIPHERDIR, made on first use."""

    def __init__(self, cipherdir: Path, walk: fsck.Walk) -> None:
        self.cipherdir = cipherdir
        self.walk = walk
        self.root = walk.root
        self._fs: EncryptedFS | None = None
        self._lost: int | None = None
        self._reports: dict[bytes, bytes] | None = None

    @property
    def fs(self) -> EncryptedFS:
        if self._fs is None:
            opened = self.walk.opened
            assert opened is not None
            self._fs = EncryptedFS(self.root, opened.config, opened.keys, self.walk.ks, read_only=False,
                                   recovering=self.walk.recovering, recovery_root=opened.root)
        return self._fs

    def close(self) -> None:
        if self._fs is not None:
            self._fs.close_all()

    def config(self) -> None:
        open_config(self.cipherdir, self.walk.ks, writable=True)  # rewrites a bad copy from the good one

    def dirid(self, path: bytes, parent_dirid: bytes) -> None:
        self.fs.dirids.read(path, parent_dirid)  # writable: rewrites the copies that do not authenticate

    def empty(self, path: bytes) -> None:
        """A file whose torn header is all it has (plaintext size 0) becomes an empty file."""
        fd = self.walk.fs.bd.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size < HEADER_LEN:
                os.ftruncate(fd, 0)
                os.fsync(fd)
        finally:
            os.close(fd)

    def drop(self, path: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.walk.fs.bd.unlink(path)

    def lost_found(self, ctx: RequestContext) -> int:
        """The inode of ``lost+found`` at the root, made now if missing."""
        if self._lost is None:
            try:
                self._lost = self.fs.lookup(ROOT_ID, fsck.LOST_FOUND, ctx).st_ino
            except FuseError:
                self._lost = self.fs.mkdir(ROOT_ID, fsck.LOST_FOUND, 0o700, ctx).st_ino
        return self._lost

    def reported(self, lost: int, ctx: RequestContext) -> dict[bytes, bytes]:
        """{mark: name} of the rescues whose reports lost+found holds (read once per run)."""
        if self._reports is None:
            self._reports = _read_reports(self, lost, ctx)
        return self._reports

    def free_name(self, parent: int, want: bytes, ctx: RequestContext) -> bytes:
        name, n = want[:200], 1
        while True:
            for candidate in (name, name + b".fsck"):
                try:
                    self.fs.lookup(parent, candidate, ctx)
                    break
                except FuseError:
                    continue
            else:
                return name
            n += 1
            name = want[:200] + b"~%d" % n


def _ctx(st: os.stat_result) -> RequestContext:
    return RequestContext(uid=st.st_uid, gid=st.st_gid, pid=os.getpid())


Writer = Callable[[int, bytes], object]  # write(offset, data)


def _write_new(r: Repairer, parent: int, name: bytes, mode: int, ctx: RequestContext,
               fill: Callable[[Writer], object]) -> int:
    """A new file ``name`` in ``parent``, written by ``fill(write)`` and fsync'd; its inode. O_EXCL:
    a file left under that name (one the walk did not reach) is an error, never reused as it is."""
    fh, attrs = r.fs.create(parent, name, mode, os.O_WRONLY | os.O_EXCL, ctx)
    try:
        fill(lambda off, data: r.fs.write(fh, off, data))
        r.fs.fsync(fh, False)
    finally:
        r.fs.release(fh)
    inode: int = attrs.st_ino
    return inode


def _copy_xattrs(r: Repairer, path: bytes, inode: int, ctx: RequestContext) -> None:
    """The xattrs of the backing file ``path`` that decrypt, set on ``inode`` through the core (one
    that does not decrypt was reported; nothing readable is left behind)."""
    names = r.fs.names
    for backing in r.walk.fs.bd.listxattr(path):
        raw = os.fsencode(backing)
        if not names.is_xattr(raw):
            continue
        try:
            stored = r.walk.fs.bd.getxattr(path, backing)
            plain = names.xattr_plain_name(raw, stored)
            value = names.decrypt_xattr_value(raw, stored)
        except (NameAuthError, OSError, ValueError):
            continue
        r.fs.setxattr(inode, plain, value, ctx)


def rescue(r: Repairer, check: FileCheck) -> None:
    """Copy what opens of a damaged file to lost+found (zeros for its damaged blocks), with a
    report beside it, then remove the file (every backing name, its journal and state)."""
    if check.rescued:
        return  # one action per damaged run: the first does the file
    path = check.links[0].path
    ctx = _ctx(check.st)
    lost = r.lost_found(ctx)
    base = os.fsencode(check.links[0].plain.rsplit("/", 1)[-1])
    want = b"#%d" % check.st.st_ino if check.name_damaged else base
    fd = r.walk.fs.bd.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        header = FileHeader.parse(os.pread(fd, HEADER_LEN, 0))
        assert r.walk.opened is not None
        config = r.walk.opened.config
        key = r.walk.fs.files.keys.key(header)
        from encfs.blocks import BlockCipher
        from encfs.fuse.content import FileContent

        c = FileContent(fd, header, BlockCipher(key, header.file_id, config.block_size), r.root, r.walk.journals,
                        state_in_file=header.file_id in r.walk.states)
        c.load(writable=False, after_crash=r.walk.recovering)
        # This backing file as it is now: a repair killed after renaming its report saw the same
        # (nothing it does changes it before the removal); a restored or rewritten file does not.
        st = os.fstat(fd)
        mark = b"file id: %s, inode %d, changed %d\n" % (header.file_id.hex().encode(), st.st_ino, st.st_ctime_ns)
        name = r.reported(lost, ctx).get(mark)
        if name is not None:
            size = _regular_size(r, lost, name, ctx)
            if size == c.size:
                _remove_rescued(r, check, header)  # killed before it removed the file: finish that
                return
            if size is not None:
                name = None  # something else took that name since: a new copy and report
        report_there = name is not None
        if name is None:
            name = r.free_name(lost, want, ctx)
        bad: list[int] = []

        def fill(write: object) -> None:
            def sink(first: int, plain: memoryview) -> None:
                write(first * c.block, plain)  # type: ignore[operator]
            for b in read_blocks(c, sink):
                bad.append(b)
                write(b * c.block, bytes(min(c.block, c.size - b * c.block)))  # type: ignore[operator]
            last = -(-c.size // c.block) - 1
            if c.size and last in c.holes:  # nothing wrote the end: the copy gets its holes' size too
                write(c.size - 1, b"\0")  # type: ignore[operator]

        # A killed repair's files under these names were dropped before (repair_order).
        partial, report = name + fsck.PARTIAL_SUFFIX, name + b".fsck" + fsck.PARTIAL_SUFFIX
        inode = _write_new(r, lost, partial, stat_m.S_IMODE(check.st.st_mode), ctx, fill)
        c.journal.close()
        _copy_xattrs(r, path, inode, ctx)
    finally:
        os.close(fd)
    if not report_there:
        ranges = "\n".join(f"  block {b}: bytes {b * c.block}-{min(c.size, (b + 1) * c.block) - 1} are zeros "
                           "(they failed authentication)" for b in bad)
        names = "\n".join(f"  {link.plain}" for link in check.links)
        text = (f"encfs fsck --repair moved this file here: the blocks below could not be read.\n"
                f"was:\n{names}\nsize: {c.size} bytes\ndamaged:\n{ranges}\n").encode() + mark
        _write_new(r, lost, report, 0o600, ctx, lambda write: write(0, text))
        r.fs.rename(lost, report, lost, name + b".fsck", 0, ctx)
        r.reported(lost, ctx)[mark] = name
    r.fs.rename(lost, partial, lost, name, 0, ctx)
    r.fs.bd.fsync_dir(r.fs._path(lost))  # the copy has its name before the file is removed
    _remove_rescued(r, check, header)


def _remove_rescued(r: Repairer, check: FileCheck, header: FileHeader) -> None:
    """Remove a damaged file whose copy is in lost+found: every backing name, its journal, its state."""
    for link in check.links:
        _remove_backing(r.walk.fs.bd, link.path)
    # The repair's own core may know the file (a damaged file in lost+found, read with the
    # reports): it forgets it as after the kernel's FORGET, since the next new file may get its
    # number and must not take a removed name or cached state.
    r.fs.forget([(r.fs.inodes.ino(check.st), 1 << 62)])
    for p in (journal_path(r.root, header.file_id), state_file(r.root, header.file_id)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    check.rescued = True


def _regular_size(r: Repairer, parent: int, name: bytes, ctx: RequestContext) -> int | None:
    """The size of the regular file ``name`` in ``parent``; -1 for another kind; None: no entry."""
    try:
        attrs = r.fs.lookup(parent, name, ctx)
    except FuseError:
        return None
    return attrs.st_size if stat_m.S_ISREG(attrs.st_mode) else -1


MARK_MAX = 256  # the most bytes a report's last line (its mark) takes


def _read_reports(r: Repairer, lost: int, ctx: RequestContext) -> dict[bytes, bytes]:
    """{last line: name} of the reports in lost+found (``name.fsck``) whose last line is a rescue's
    mark (only its tail is read). An entry that is no regular file or cannot be read is passed over."""
    found: dict[bytes, bytes] = {}
    fh = r.fs.opendir(lost, ctx)
    try:
        entries = [(name, attrs) for name, attrs, _next in r.fs.readdir(fh, 0, False) if name.endswith(b".fsck")]
    finally:
        r.fs.releasedir(fh)
    for name, attrs in entries:
        if not stat_m.S_ISREG(attrs.st_mode):
            continue
        try:
            fh = r.fs.open(attrs.st_ino, os.O_RDONLY, ctx)
            try:
                opened = r.fs.reader(fh)
                start = max(0, attrs.st_size - MARK_MAX)
                text = b"" if opened is None else bytes(r.fs.read_open(opened, start, attrs.st_size - start))
            finally:
                r.fs.release(fh)
        except (FuseError, OSError):
            continue  # damaged: fsck reports it as any other file
        last = text[text.rfind(b"\n", 0, len(text) - 1) + 1:]
        if last.startswith(b"file id: "):
            found[last] = name[:-len(b".fsck")]
    return found


def rescue_named(r: Repairer, path: bytes, st: os.stat_result) -> None:
    """A regular file whose name does not decrypt: its backing file is renamed into lost+found as
    ``#<inode>`` (its contents are bound to its file id, not to its name or place)."""
    if r.walk.files[(st.st_dev, st.st_ino)].bad:
        return  # its blocks are damaged too: rescue() copies what opens
    ctx = _ctx(st)
    lost = r.lost_found(ctx)
    name = r.free_name(lost, b"#%d" % st.st_ino, ctx)
    dest, side = r.fs._child(lost, name)
    r.fs._write_side(dest, side)
    r.fs.bd.rename(path, dest)
    with contextlib.suppress(FileNotFoundError):
        r.fs.bd.unlink(longname_side_file(path))


def drop_partial(r: Repairer, path: bytes) -> None:
    """Remove the partial lost+found copy ``path`` an interrupted repair left (and its long name):
    the one removal of those files (before any rescue, which writes under such names)."""
    _remove_backing(r.walk.fs.bd, path)


def _remove_backing(bd: BackingDirs, path: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        bd.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        bd.unlink(longname_side_file(path))


def repair_order(repair: tuple[Finding, fsck.Action, bool]) -> tuple[bool, bool, bool]:
    """The sort key of the repairs. First those added to run first: the partial copies a killed
    repair left in lost+found (drop_partial), since a rescue writes its copy and report under
    those names. Orphans last: a rescue removes a file's journal itself. Before them, files whose
    names do not decrypt are moved to lost+found: the other repairs of such a file (a torn header
    emptied) name it where the walk found it."""
    finding, _action, first = repair
    return (not first, finding.kind == "orphan", finding.kind == "name")


def repair_walk(cipherdir: Path, walk: fsck.Walk) -> None:
    """Run every repair action of ``walk``; a failure is a "repair" finding."""
    r = Repairer(cipherdir, walk)
    try:
        for finding, action, _first in sorted(walk.actions, key=repair_order):
            try:
                action(r)
            except (EncfsError, OSError, FuseError, HeaderError) as e:
                if isinstance(e, EncfsError):
                    why = e.message
                elif isinstance(e, FuseError):  # an errno alone
                    why = os.strerror(e.errno)
                else:
                    why = getattr(e, "strerror", None) or str(e)
                walk.report.add(Finding("repair", f"not repaired: {finding.message}: {why}",
                                        place=f"{finding.kind}#{finding.place}"))
                finding.repairable = False
    finally:
        r.close()
