"""Copies of the embedded token's files, so that a killed process cannot lose the token.

SoftHSM2 (2.6, file backend) rewrites an object file in place: ftruncate to
zero, then one write, with no temporary file and no fsync. C_Login rewrites
``token.object`` that way every time (it stores the PIN-count flags), and
C_SetAttributeValue rewrites a key's ``<uuid>.object``. A process killed
between the two calls leaves the file empty: an empty ``token.object`` makes
the token vanish (TokenNotFound in every later process, and the token key
it holds, wrapped under the PINs, is gone), an empty key object loses that
customer master key. See docs/dev/pkcs11.md.

Invariants:
- ``TokenFileCopies.guard()`` runs under the token store's exclusive lock
  (token._store_lock), which every encfs call that writes the store holds,
  so no file it reads is half-written by an encfs process.
- A copy is taken of every non-empty object file that differs from its copy,
  before each login and after each call that wrote the store: it always
  holds the last state an encfs call finished (and so acknowledged).
- An empty object file is never SoftHSM2's own state: guard() puts the copy
  back (atomically); an empty file without a copy is a creation that was
  killed before it finished (nothing was acknowledged) and is removed, except
  ``token.object``, which is reported (TokenError) since only a backup can
  bring that token back.
- Copies live beside the token directory (``token-copies/``, mode 0700),
  never in it: SoftHSM2 and ``encfs hsm backup`` own every entry there. They
  are as sensitive as the token's own files (the same encrypted objects) and
  are removed with the objects they copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.diskio import fsync_dir
from encfs.errors import TokenError

log = logging.getLogger("encfs.keys")

TOKEN_OBJECT = "token.object"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class TokenFileCopies:
    """Copies of the ``*.object`` files of every token in ``tokendir``, kept in ``copydir``."""

    def __init__(self, tokendir: Path, copydir: Path) -> None:
        self.tokendir, self.copydir = tokendir, copydir

    def guard(self) -> list[str]:
        """Restore empty object files from their copies, then bring the copies up to date.
        Returns the files restored or removed (also logged). Caller holds the store lock."""
        changed: list[str] = []
        try:
            tokens = sorted(e.name for e in os.scandir(self.tokendir) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return changed
        for token in tokens:
            changed += self._guard_token(self.tokendir / token, self.copydir / token)
        return changed

    def _guard_token(self, tokdir: Path, copies: Path) -> list[str]:
        changed: list[str] = []
        names = {e.name for e in os.scandir(tokdir) if e.name.endswith(".object") and e.is_file(follow_symlinks=False)}
        copied = set(os.listdir(copies)) if copies.is_dir() else set()
        synced = False
        for name in sorted(names):
            path, copy = tokdir / name, copies / name
            data = _read(path)
            if data is None:  # destroyed meanwhile (another module user): its copy goes below
                continue
            kept = _read(copy) if name in copied else None
            if not data:
                if kept:
                    write_atomic(path, kept, 0o600, tmp_dir=copies)  # no stray name in the token directory
                    synced = True
                    changed.append(f"restored {path} from encfs's copy")
                    log.warning("%s was empty (a process was killed while SoftHSM2 rewrote it): "
                                "restored from %s", path, copy)
                elif name == TOKEN_OBJECT:
                    raise TokenError(f"{path} is empty (a process was killed while SoftHSM2 rewrote it) and "
                                     f"encfs has no copy of it: restore the key store with `encfs hsm restore`")
                else:
                    path.unlink()
                    synced = True
                    changed.append(f"removed {path}")
                    log.warning("%s was empty (a key creation was killed before it finished): removed", path)
                continue
            if data != kept:
                try:
                    for d in (self.copydir, copies):  # mkdir(parents=True) would give the parent 0755
                        d.mkdir(mode=0o700, exist_ok=True)
                    write_atomic(copy, data, 0o600)
                except OSError as e:  # the token works on; only this guard is missing
                    log.warning("cannot keep a copy of %s in %s: %s", path, copies, e.strerror)
                    continue
                synced = True
        for name in sorted(copied - names):
            if name.endswith(".object") or ".tmp." in name:  # a destroyed object's, or a killed guard's
                (copies / name).unlink(missing_ok=True)
                synced = True
        if synced:
            for d in (tokdir, copies):
                if d.is_dir():
                    fsync_dir(str(d))
        return changed
