"""Copies of the embedded token's files, so that a killed process cannot lose the token.

SoftHSM2 (2.6, file backend) rewrites an object file in place: lock it
(fcntl), ftruncate to zero, write, unlock; no temporary file, no fsync.
C_Login rewrites ``token.object`` that way every time (it stores the
PIN-count flags), and C_SetAttributeValue rewrites a key's ``<uuid>.object``.
A process killed between the truncate and the write leaves the file empty:
an empty ``token.object`` makes the token vanish (TokenNotFound in every later
process, and the token key it holds, wrapped under the PINs, is gone); an
empty key object loses that customer master key. See docs/dev/pkcs11.md.

Invariants:
- Both entry points run only while the token store's exclusive lock
  (token._store_lock), which every encfs call that writes the store holds,
  is really held, and read each token file under SoftHSM2's own fcntl lock:
  no write in progress (by encfs or another PKCS#11 user) is taken for
  damage or copied half-written.
- Every non-empty object file that differs from its copy is copied, before
  each login (``check()``) and after each call that wrote the store
  (``record()``), so a copy holds the last state an encfs call finished (and
  so acknowledged). A copy that cannot be written is a logged warning, never
  a failed call.
- ``check()``, in the same pass, puts a copy back (atomically) over an object
  file found empty. An empty file without a copy is left as it is (a creation
  that never finished: SoftHSM2 skips it), except ``token.object``, which is
  reported (TokenError) since only a backup can bring that token back.
- Copies live beside the token directory (``token-copies/``, mode 0700),
  never in it: SoftHSM2 and ``encfs hsm backup`` own every entry there. They
  are as sensitive as the token's own files (the same encrypted objects)
  and are removed with the objects, and the token directories, they copy.
- Not covered: a file of more than one write (over 4 KiB, stdio's buffer)
  that a kill cut short; SoftHSM2 then drops that object as damaged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.diskio import fsync_dir
from encfs.errors import TokenError

log = logging.getLogger("encfs.keys")

TOKEN_OBJECT = "token.object"


def emptied_message(path: object, was: bool = False) -> str:
    """What an empty object file is (or, once restored, ``was``), for the messages that name one."""
    return f"{path} {'was' if was else 'is'} empty (a process was killed while SoftHSM2 rewrote it)"


def _read_locked(path: Path) -> bytes | None:
    """``path``'s bytes under a shared fcntl lock (SoftHSM2 writes under an exclusive one);
    None if it does not exist. This process holds no other lock on it (_P11_LOCK is held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)  # drops the lock


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class TokenFileCopies:
    """Copies of the ``*.object`` files of every token in ``tokendir``, kept in ``copydir``."""

    def __init__(self, tokendir: Path, copydir: Path) -> None:
        self.tokendir, self.copydir = tokendir, copydir

    def _tokens(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.tokendir) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    @staticmethod
    def _objects(tokdir: Path) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(tokdir)
                          if e.name.endswith(".object") and e.is_file(follow_symlinks=False))
        except FileNotFoundError:  # the token was deleted meanwhile
            return []

    def check(self) -> None:
        """Put the copy back over each object file found empty, then bring the copies up to date
        (one pass: see the invariants). TokenError for an empty ``token.object`` without a copy,
        or a copy that cannot be put back."""
        self._sync(restore=True)

    def record(self) -> None:
        """Bring the copies up to date with the token's files (see the invariants)."""
        self._sync(restore=False)

    def _sync(self, restore: bool) -> None:
        try:
            self._sync_all(restore)
        except OSError as e:  # the token works on; only this guard is missing
            log.warning("cannot keep copies of the token's files in %s: %s: %s", self.copydir,
                        e.filename, e.strerror)

    def _sync_all(self, restore: bool) -> None:
        tokens = self._tokens()
        try:
            stale = [e.name for e in os.scandir(self.copydir) if e.name not in tokens]
        except FileNotFoundError:
            stale = []
        for name in stale:  # copies of a token directory that is gone (deleted, provisioned again)
            shutil.rmtree(self.copydir / name)
        for token in tokens:
            self._sync_token(self.tokendir / token, self.copydir / token, restore)

    def _sync_token(self, tokdir: Path, copies: Path, restore: bool) -> None:
        copied = set(os.listdir(copies)) if copies.is_dir() else set()
        changed = restored = False
        present = set()
        for name in self._objects(tokdir):
            data = _read_locked(tokdir / name)
            if data is None:
                continue  # destroyed meanwhile: its copy goes below
            present.add(name)
            kept = _read(copies / name) if name in copied else None
            if not data:
                restored |= restore and self._restore(tokdir / name, kept, copies)
                continue  # its copy stays
            if data != kept:
                for d in (self.copydir, copies):  # mkdir(parents=True) would give the parent 0755
                    d.mkdir(mode=0o700, exist_ok=True)
                write_atomic(copies / name, data, 0o600)
                changed = True
        for name in sorted(copied - present):  # destroyed objects, a killed copy's temporaries
            (copies / name).unlink(missing_ok=True)
            changed = True
        if restored:
            fsync_dir(str(tokdir))
        if changed:
            fsync_dir(str(copies))

    @staticmethod
    def _restore(path: Path, kept: bytes | None, copies: Path) -> bool:
        """Put ``kept`` back over the empty ``path``; False if there is no copy (see the invariants)."""
        if not kept:
            if path.name == TOKEN_OBJECT:
                raise TokenError(f"{emptied_message(path)} and encfs has no copy of it: restore "
                                 f"the key store with `encfs hsm restore`")
            return False
        try:
            write_atomic(path, kept, 0o600, tmp_dir=copies)  # no stray name in the token directory
        except OSError as e:
            raise TokenError(f"{emptied_message(path)} and encfs's copy cannot be put back: {e.strerror}") from None
        log.warning("%s: restored from %s", emptied_message(path, was=True),
                    copies / path.name)
        return True
