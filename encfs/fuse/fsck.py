"""``encfs fsck CIPHERDIR``: check a filesystem offline, under its mount lock; repair what can be
repaired without losing anything readable (fsckrepair.py).

What is checked, reading the CIPHERDIR only (the filesystem core's own readers: open_config,
NameCipher, DirIds, Symlinks, FileHeader, FileContent.load and BlockCipher):
- both config copies (open_config: a copy that is missing, damaged or stale);
- a walk from the root: every entry's name (long names: the side file and its hash), every
  directory's id copies (each must authenticate for its place, docs/FORMAT.md §6.3), every
  symlink target, every encfs xattr (name and value) and, for each regular file (each inode
  once: hard links share it), its header, its wrapped data key (unwrapped by the key service),
  its state, its journal (scanned as a recovery would) and every block tag, the journaled
  version of a block where the journal has one;
- the bookkeeping beside the tree: journals, re-key side files and state files whose file no
  header names, long-name side files with no entry, long symlink targets no symlink refers to,
  temporary entries of interrupted renames and write-fsync-renames.

File contents are checked by fsckcontent.py: blocks are read in runs of up to CHUNK_BLOCKS and
opened with BlockCipher.open_into, while a thread has the kernel read the next files ahead
(POSIX_FADV_WILLNEED), as block/fsck.py does.

Both config copies damaged (or intact but disagreeing) is a finding, exit 4: nothing else can be
checked. What keeps the check from running is one line, exit 8: a mount (the lock), an interrupted
`encfs rekey` (its marker), a config of a newer format, a wrong PIN or a disabled key.

Invariants:
- Without ``repair`` nothing in the CIPHERDIR is written but the lock's owner record (the lock is
  taken exclusively, in mode "fsck": no mount, read-only or not, runs meanwhile).
- A finding names the plaintext path (and block numbers) of what is damaged, or the backing
  entry's name under its plaintext parent where the name itself does not decrypt; never key
  material or file contents.
- Bookkeeping is reported as orphaned (and dropped by a repair) only when provably not needed:
  the walk reached every directory and parsed every file header, so no file it missed can own it.
"""

from __future__ import annotations

import os
import stat as stat_m
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from encfs.fsckreport import WARNING, Finding, Report, quiet
from encfs.fuse import rekeyfile
from encfs.fuse.dirids import DIRID_NEXT, plain_empty
from encfs.fuse.fileheader import JOURNAL_DIR, STATE_SUFFIX
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsckcontent import FileCheck, Link, _rel, check_contents
from encfs.fuse.fsconfig import COPIES, FsConfigError, FsVersionError, OpenedConfig, open_config
from encfs.fuse.journal import file_ids
from encfs.fuse.names import (
    DIRID_FILE,
    DIRID_LEN,
    LONGLINK_DIR,
    LONGNAME_PREFIX,
    LONGNAME_SUFFIX,
    NameAuthError,
    NameCipher,
    is_internal,
    is_long_symlink,
    is_longname_entry,
)
from encfs.fuse.symlinks import TMP_PREFIX
from encfs.fuseproto.wire import FuseError
from encfs.keys.service import KeyService

if TYPE_CHECKING:
    from encfs.fuse.fsckrepair import Repairer

LOST_FOUND = b"lost+found"
# A copy to lost+found is written under its name with this suffix, then renamed (fsckrepair.rescue).
PARTIAL_SUFFIX = b".fsck-partial"
# Bookkeeping in the root that the walk leaves to others: the config (checked first), the lock,
# the journal directory and long targets (checked after the walk), a re-key's files (refused).
ROOT_ENTRIES = {os.fsencode(n) for n in (*COPIES, "encfs.lock", "encfs.rekey", "encfs.rekey.redo",
                                         "encfs.rekey.done")} | {JOURNAL_DIR, LONGLINK_DIR}


def is_atomic_leftover(name: bytes) -> bool:
    """A write-fsync-rename's temporary file (atomicfile: ``<name>.tmp.<pid>``) a crash left: ours,
    as every backing name with a '.' is (a long name's side file's too, ``encfs.ln.<hash>.name.tmp.N``,
    which is_internal takes for a long-name entry)."""
    stem, _, pid = name.rpartition(b".tmp.")
    return bool(stem) and pid.isdigit()


Action = Callable[["Repairer"], None]  # a repair, given the fsckrepair.Repairer


@dataclass
class Walk:
    """One check of a CIPHERDIR: the report, and a repair action per repairable finding."""

    root: bytes
    opened: OpenedConfig | None  # None: no config opened (a "config" finding; nothing was walked)
    ks: KeyService
    recovering: bool
    data: bool  # check block tags (a re-check after a repair skips them)
    report: Report
    actions: list[tuple[Finding, Action, bool]] = field(default_factory=list)  # (.., .., run first)
    complete: bool = True  # every directory walked and every header parsed
    seen_ids: set[bytes] = field(default_factory=set)
    longrefs: set[bytes] = field(default_factory=set)
    files: dict[tuple[int, int], FileCheck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.opened is None:
            return
        config = self.opened.config
        self.fs = EncryptedFS(self.root, config, self.opened.keys, self.ks, read_only=True,
                              recovering=self.recovering, recovery_root=self.opened.root)
        self.names: NameCipher = self.fs.names
        self.bound_dirids = "bound-dirids" in config.features
        self.second_dirid_copy = config.format >= 2  # format 1 kept the file copy alone
        self.journals = file_ids(self.root)
        self.rekeys = file_ids(self.root, rekeyfile.SUFFIX)
        self.states = file_ids(self.root, STATE_SUFFIX)

    def add(self, finding: Finding, action: Action | None = None, first: bool = False) -> None:
        """Report ``finding``, repaired by ``action`` if given: ``first``, before every other
        repair (fsckrepair.repair_order)."""
        self.report.add(finding)
        if action is not None:
            finding.repairable = True
            self.actions.append((finding, action, first))

    def count(self, what: str, n: int = 1) -> None:
        self.report.counts[what] = self.report.counts.get(what, 0) + n

    def close(self) -> None:
        """Release the backing root fd the walk's filesystem holds (backingdirs.py)."""
        if self.opened is not None:
            self.fs.bd.close()

    # -- the tree ------------------------------------------------------------------------------

    def run(self) -> None:
        pending: list[tuple[bytes, FileCheck]] = []
        assert self.opened is not None  # (a walk runs only once a config opened)
        self._xattrs(self.root, "/")
        self._dir(self.root, "/", bytes.fromhex(self.opened.config.fs_id)[:DIRID_LEN], pending)
        check_contents(self, pending)
        self._journal_dir()
        self._longlinks()

    def _dir(self, path: bytes, plain: str, dirid: bytes, pending: list[tuple[bytes, FileCheck]]) -> None:
        self.count("directories")
        try:
            entries = sorted(self.fs.bd.listdir(path))
        except OSError as e:
            self.complete = False
            self.add(Finding("directory", f"{plain}: cannot be listed ({e.strerror})", place=_rel(self.root, path)))
            return
        present = set(entries)
        for entry in entries:
            child = os.path.join(path, entry)
            if (path == self.root and entry in ROOT_ENTRIES) or entry in (DIRID_FILE, DIRID_NEXT):
                continue
            if is_atomic_leftover(entry) or entry.startswith(TMP_PREFIX):
                self._orphan(child, f"{plain}: leftover temporary entry {os.fsdecode(entry)} of an "
                                    "interrupted write or rename", "temporary")
                continue
            if entry.startswith(LONGNAME_PREFIX) and entry.endswith(LONGNAME_SUFFIX):
                if entry[:-len(LONGNAME_SUFFIX)] not in present:
                    self._orphan(child, f"{plain}: long-name side file {os.fsdecode(entry)} has no entry",
                                 "long-name")
                continue
            if is_internal(entry) and not is_longname_entry(entry):
                self.add(Finding("unknown", f"{plain}: unknown bookkeeping entry {os.fsdecode(entry)} (left as it is)",
                                 WARNING, place=_rel(self.root, child)))
                continue
            try:
                st = self.fs.bd.lstat(child)
            except FileNotFoundError:
                continue
            try:
                name = os.fsdecode(self.fs._plain_name(path, dirid, entry))
                where = plain.rstrip("/") + "/" + name
                damaged_name = False
            except (NameAuthError, OSError, ValueError):
                where, damaged_name = f"{plain.rstrip('/')}/<{os.fsdecode(entry)}>", True
                self._bad_name(child, plain, entry, st)
            if (plain == "/" + os.fsdecode(LOST_FOUND) and not damaged_name and stat_m.S_ISREG(st.st_mode)
                    and name.endswith(os.fsdecode(PARTIAL_SUFFIX))):
                self._partial(child, where)
                continue
            key = (st.st_dev, st.st_ino)
            if not (stat_m.S_ISREG(st.st_mode) and key in self.files):  # a hard link's xattrs: once
                self._xattrs(child, where)
            if stat_m.S_ISDIR(st.st_mode):
                if damaged_name:  # its id is sealed for its name: nothing under it can be opened
                    self.complete = False
                    continue
                child_id = self._dirid(child, where, dirid, entry)
                if child_id is not None:
                    self._dir(child, where, child_id, pending)
            elif stat_m.S_ISLNK(st.st_mode):
                self.count("symlinks")
                self._symlink(child, where, dirid, damaged_name)
            elif stat_m.S_ISREG(st.st_mode):
                known = self.files.get(key)
                if known is not None:
                    known.links.append(Link(child, where))
                    known.name_damaged |= damaged_name
                    continue
                self.count("files")
                check = self.files[key] = FileCheck([Link(child, where)], st, name_damaged=damaged_name)
                pending.append((child, check))
            else:
                self.count("special")

    def _partial(self, child: bytes, where: str) -> None:
        from encfs.fuse.fsckrepair import drop_partial

        self.add(Finding("orphan", f"{where}: the partial copy of a repair that was interrupted: not needed "
                                   "(repair: removed)", WARNING, place=_rel(self.root, child)),
                 lambda r: drop_partial(r, child), first=True)

    def _bad_name(self, child: bytes, plain: str, entry: bytes, st: os.stat_result) -> None:
        what = "file" if stat_m.S_ISREG(st.st_mode) else "directory" if stat_m.S_ISDIR(st.st_mode) else "entry"
        finding = Finding("name", f"{plain}: {what} {os.fsdecode(entry)}: its name does not decrypt",
                          place=_rel(self.root, child))
        if stat_m.S_ISREG(st.st_mode):  # its contents do not depend on its name: lost+found gets them
            from encfs.fuse.fsckrepair import rescue_named

            finding.message += " (repair: to lost+found)"
            self.add(finding, lambda r: rescue_named(r, child, st))
        else:
            finding.message += (" (its id is sealed for its name: what is under it cannot be opened)"
                                if stat_m.S_ISDIR(st.st_mode) else "")
            self.add(finding)

    def _dirid(self, path: bytes, where: str, parent_dirid: bytes, entry: bytes) -> bytes | None:
        """The id of the directory ``path``; a finding for each copy that does not authenticate."""
        rel = _rel(self.root, path)
        if not self.bound_dirids:
            return self._legacy_dirid(path, where, parent_dirid, rel)
        good = self.fs.dirids.sealed_copies(path, parent_dirid)
        ids = set(good.values())
        if len(ids) > 1:
            self.complete = False
            self.add(Finding("dirid", f"{where}: its directory id copies authenticate but disagree "
                                      f"({', '.join(good)}): "
                                      "tampering; its entries are not checked", place=rel))
            return None
        if not ids:
            if plain_empty(self.fs.bd.listdir(path)):
                self.add(Finding("dirid", f"{where}: empty directory without an id (an interrupted mkdir): "
                                          "it gets a new one", WARNING, place=rel),
                         lambda r: r.dirid(path, parent_dirid))
                return None
            self.complete = False
            self.add(Finding("dirid", f"{where}: no copy of its directory id authenticates here: its entries "
                                      "cannot be decrypted", place=rel))
            return None
        self._missing_dirid_copy(path, where, parent_dirid, good, rel)
        return ids.pop()

    def _legacy_dirid(self, path: bytes, where: str, parent_dirid: bytes, rel: str) -> bytes | None:
        """The id of ``path`` on a filesystem whose ids are not bound to their place (the legacy
        form: 16 plain bytes in each copy, or sealed ones during the upgrade)."""
        copies = self.fs.dirids.copies(path)
        plain = {stored for _which, stored in copies if len(stored) == DIRID_LEN}
        if len(plain) > 1:
            # Unauthenticated copies that disagree: which one names the entries cannot be told
            # here, and a repair taking either could destroy the other (a mount takes the file's).
            self.complete = False
            self.add(Finding("dirid", f"{where}: its two directory id copies disagree (the legacy, "
                                      "unauthenticated form): its entries are not checked, nothing is "
                                      "repaired", place=rel))
            return None
        try:
            dirid = self.fs.dirids.read(path, parent_dirid)  # read-only: repairs nothing
        except FuseError:
            self.complete = False
            self.add(Finding("dirid", f"{where}: its directory id is lost: its entries cannot be decrypted",
                             place=rel))
            return None
        good = {which: dirid for which, stored in copies if stored == dirid}
        good.update({w: i for w, i in self.fs.dirids.sealed_copies(path, parent_dirid, copies).items()
                     if i == dirid})
        if not good:  # read() found it empty and without an id (an interrupted mkdir)
            self.add(Finding("dirid", f"{where}: empty directory without an id (an interrupted mkdir): "
                                      "it gets a new one", WARNING, place=rel),
                     lambda r: r.dirid(path, parent_dirid))
            return None
        if "file" not in good:
            self._missing_dirid_copy(path, where, parent_dirid, good, rel)
        elif self.second_dirid_copy and "xattr" not in good and "next" not in good:
            # Releases that could not set the xattr wrote no second copy: a warning, which
            # --repair (as a read-write mount) mends.
            self.add(Finding("dirid-copy", f"{where}: its directory id has no second copy (lost, or never "
                                           "written by an older release)", WARNING, place=rel),
                     lambda r: r.dirid(path, parent_dirid))
        return dirid

    def _missing_dirid_copy(self, path: bytes, where: str, parent_dirid: bytes, good: dict[str, bytes],
                            rel: str) -> None:
        """A finding if one of the two copies of the id is not among ``good`` (the repair rewrites it)."""
        missing = [n for n, ok in (("encfs.dirid", "file" in good),
                                   ("the xattr copy", "xattr" in good or "next" in good)) if not ok]
        if missing:
            self.add(Finding("dirid-copy", f"{where}: directory id copy {missing[0]} is missing or damaged "
                                           "(the other copy is good)", place=rel),
                     lambda r: r.dirid(path, parent_dirid))

    def _symlink(self, path: bytes, where: str, dirid: bytes, damaged_name: bool) -> None:
        stored = self.fs.bd.readlink(path)
        if is_long_symlink(stored) and b"/" not in stored:
            self.longrefs.add(stored)
        if damaged_name:
            return  # its target is bound to its name: _bad_name reported it
        try:
            self.fs.links.read(path, dirid)
        except (NameAuthError, OSError, ValueError):
            self.add(Finding("symlink", f"{where}: its symlink target does not decrypt", place=_rel(self.root, path)))

    def _xattrs(self, path: bytes, where: str) -> None:
        try:
            backing = self.fs.bd.listxattr(path)
        except OSError:
            return
        for name in backing:
            raw = os.fsencode(name)
            if not NameCipher.is_xattr(raw):
                continue
            self.count("xattrs")
            try:
                value = self.fs.bd.getxattr(path, name)
                self.names.xattr_plain_name(raw, value)
                self.names.decrypt_xattr_value(raw, value)
            except (NameAuthError, OSError, ValueError):
                self.add(Finding("xattr", f"{where}: xattr {name} does not decrypt",
                                 place=f"{_rel(self.root, path)}#{name}"))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _orphan(self, path: bytes, message: str, kind: str) -> None:
        self.add(Finding("orphan", f"{message}: not needed (repair: removed)", WARNING,
                         place=_rel(self.root, path)), lambda r: r.drop(path))

    def _journal_dir(self) -> None:
        jdir = os.path.join(self.root, JOURNAL_DIR)
        kinds = ((b"", "journal", self.journals), (rekeyfile.SUFFIX, "re-key side file", self.rekeys),
                 (STATE_SUFFIX, "state file", self.states))
        for suffix, what, ids in kinds:
            for file_id in sorted(ids - self.seen_ids):
                path = os.path.join(jdir, file_id.hex().encode() + suffix)
                message = f"/: {what} {os.fsdecode(_rel(self.root, path))} belongs to no file"
                if self.complete:
                    self._orphan(path, message, what)
                else:
                    self.add(Finding("orphan", f"{message} that was checked (kept: a file that could not be "
                                               "checked may own it)", WARNING, place=_rel(self.root, path)))
        for file_id in sorted(file_ids(self.root, rekeyfile.TMP_SUFFIX)):  # a mount removes them unread
            path = rekeyfile.side_file(self.root, file_id, rekeyfile.TMP_SUFFIX)
            self._orphan(path, f"/: unfinished re-key side file {_rel(self.root, path)}", "re-key")

    def _longlinks(self) -> None:
        try:
            refs = sorted(os.listdir(os.path.join(self.root, LONGLINK_DIR)))
        except FileNotFoundError:
            return
        for ref in refs:
            if ref in self.longrefs:
                continue
            path = os.path.join(self.root, LONGLINK_DIR, ref)
            if self.complete:
                self._orphan(path, f"/: long symlink target {_rel(self.root, path)} has no symlink", "long target")
            else:
                self.add(Finding("orphan", f"/: long symlink target {_rel(self.root, path)} has no symlink that was "
                                           "checked (kept)", WARNING, place=_rel(self.root, path)))


def check(cipherdir: Path, ks: KeyService, recovering: bool, data: bool = True) -> Walk:
    """One pass over ``cipherdir`` (the caller holds the mount lock)."""
    try:
        opened = open_config(cipherdir, ks, writable=False)
    except FsVersionError:
        raise  # newer than this encfs: not damage
    except FsConfigError as e:  # both copies damaged, or both intact and disagreeing
        report = Report(str(cipherdir), "filesystem")
        report.add(Finding("config", f"config: {e.message}; nothing else can be checked"))
        return Walk(os.fsencode(os.path.abspath(cipherdir)), None, ks, recovering, data, report)
    report = Report(str(cipherdir), "filesystem", opened.config.format,
                    counts={"files": 0, "directories": 0, "symlinks": 0, "xattrs": 0, "bytes_checked": 0,
                            "blocks_checked": 0})
    walk = Walk(os.fsencode(os.path.abspath(cipherdir)), opened, ks, recovering, data, report)
    for warning in opened.warnings:
        name = warning.split(" ", 1)[0]
        walk.add(Finding("config-copy", f"config: {warning} (the other copy is good)", place=name),
                 lambda r: r.config())
    walk.run()
    return walk


def check_filesystem(cipherdir: Path, ks: KeyService, repair: bool = False) -> Report:
    """Check the CIPHERDIR (not mounted) and, with ``repair``, repair what is repairable."""
    from encfs.fuse.fsckrepair import repair_walk
    from encfs.fuse.mountlock import FSCK_MODE, MountLock
    from encfs.fuse.rewrap import refuse_if_interrupted

    start = time.monotonic()
    lock = MountLock.acquire(cipherdir, "-", read_only=False, mode=FSCK_MODE)
    recovering = lock.recovering
    try:
        refuse_if_interrupted(cipherdir)
        with quiet("encfs.fuse"):
            walk = check(cipherdir, ks, recovering)
            report = walk.report
            if repair and walk.actions:
                repair_walk(cipherdir, walk)
                second = check(cipherdir, ks, recovering, data=False)
                again = second.report
                second.close()
                still = {f.key for f in again.findings}
                known = {f.key for f in report.findings}
                for f in report.findings:
                    f.repaired = f.repaired or (f.repairable and f.key not in still and f.kind != "repair")
                report.findings += [f for f in again.findings if f.key not in known]
            walk.close()
    finally:
        lock.release(clean=not recovering)
    report.repair = repair
    report.seconds = time.monotonic() - start
    return report


__all__ = ["LOST_FOUND", "Walk", "check", "check_filesystem"]
