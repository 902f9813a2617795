"""The PKCS#11 modules this process has loaded and the locks every call into them takes.

load_module initialises a module once per process (and again in a forked child); _P11_LOCK
serialises this process's calls into any module; _store_lock is the lock this user's processes
share over one module's token store, under which the embedded token's files are checked and
copied (tokenguard.py). Why each is needed: the invariants in token.py's module docstring.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e

from encfs.errors import ModuleNotFound
from encfs.keys.tokenguard import TokenFileCopies
from encfs.keys.tokenspec import TokenSpec

_P11_LOCK = threading.RLock()
_LIBS: dict[str, tuple[Any, int]] = {}  # module path -> (pkcs11.lib, pid that initialised it)


def load_module(path: str) -> Any:
    """Return the process-wide ``pkcs11.lib`` for ``path``, initialised for this pid."""
    with _P11_LOCK:
        entry = _LIBS.get(path)
        if entry is not None:
            lib, pid = entry
            if pid != os.getpid():
                lib.reinitialize()  # a forked child must C_Initialize again
                _LIBS[path] = (lib, os.getpid())
            return lib
        if not os.path.exists(path):
            raise ModuleNotFound(f"PKCS#11 module not found: {path}")
        try:
            lib = pkcs11.lib(path)
        except p11e.PKCS11Error as e:
            # python-pkcs11's exceptions often carry no text: name the error, and SoftHSM2's config,
            # the usual cause of a failing C_Initialize.
            conf = os.environ.get("SOFTHSM2_CONF")
            hint = f" (SOFTHSM2_CONF={conf})" if conf and "softhsm" in os.path.basename(path) else ""
            raise ModuleNotFound(f"cannot load PKCS#11 module {path}: {str(e) or type(e).__name__}{hint}") from None
        _LIBS[path] = (lib, os.getpid())
        return lib


_STORE_LOCKS: dict[str, list[Any]] = {}  # module + conf -> [fd, pid that opened it, mode held: None|"sh"|"ex"]
_MODULE_EPOCH: dict[str, int] = {}  # module path -> number of reloads (sessions of older epochs are dead)


@contextmanager
def _store_lock(module: str, exclusive: bool) -> Iterator[bool]:
    """A lock shared by this user's processes using ``module`` (and the same SOFTHSM2_CONF).

    SoftHSM2's file store is not safe across processes: C_Login rewrites
    token.object in place and object creation writes files in several steps,
    while any call in another process may re-read the store; a process that
    reads a half-written file loses the token (TokenNotFound, GeneralError on
    login) or the new object ("missing from the token") until it exits. So
    calls that write the store (login, create, destroy) hold this lock
    exclusively and all other calls hold it shared. Caller holds _P11_LOCK;
    nesting is allowed (a shared hold is upgraded, then restored).
    The lock file sits next to SOFTHSM2_CONF if that is set and writable (for
    the embedded token: ``$ENCFS_HOME/softhsm/``), else in the temp directory.
    Best effort: without a usable lock file, calls run unlocked (and it yields False).
    """
    conf = os.environ.get("SOFTHSM2_CONF", "")
    key = f"{module}\0{conf}"
    entry = _STORE_LOCKS.get(key)
    if entry is None or entry[1] != os.getpid():  # a forked child needs its own open file
        paths = [os.path.join(os.path.dirname(os.path.abspath(conf)), "encfs-token.lock")] if conf else []
        digest = hashlib.sha256(f"{os.path.realpath(module)}\0{conf}".encode()).hexdigest()[:16]
        paths.append(os.path.join(tempfile.gettempdir(), f"encfs-pkcs11-{os.getuid()}-{digest}.lock"))
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                break
            except OSError:
                continue
        else:
            yield False
            return
        entry = _STORE_LOCKS[key] = [fd, os.getpid(), None]
    fd, _pid, held = entry
    want = "ex" if exclusive else "sh"
    if held == "ex" or held == want:
        yield True
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    entry[2] = want
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH if held == "sh" else fcntl.LOCK_UN)
        entry[2] = held


def check_store_files(spec: TokenSpec) -> None:
    """Put back token files a killed process left empty and bring their copies up to date
    (before a copy of the store is taken: ``encfs hsm backup``)."""
    with _P11_LOCK, _store_lock(spec.module, exclusive=True) as locked:
        _check_copies(spec, locked)


def _store_copies(spec: TokenSpec, locked: bool) -> TokenFileCopies | None:
    """The token files' copies, if kept and the caller holds _P11_LOCK and the store lock
    exclusively (``locked``): else a write of another process may be in progress."""
    return spec.store_copies if locked else None


def _check_copies(spec: TokenSpec, locked: bool) -> None:
    copies = _store_copies(spec, locked)
    if copies is not None:
        copies.check()
