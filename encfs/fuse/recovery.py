"""A filesystem's recovery key: ``encfs recovery-key add|remove CIPHERDIR``, and opening the
config by the recovery key alone (``encfs mount --recovery-key``; docs/FORMAT.md §6.10).

``add`` gives the config a recovery root R (wrapped by the CMK) and the recovery wrapping of
the secret and R, then re-keys every file (fullrekey.py, through rewrap.py's ``--full`` run)
so that every file's data key is derived from R: files made before have random keys, which no
recovery key could open. ``remove`` drops R and the wrapping; files keep the keys they have
until the next ``encfs rekey --full``. On a filesystem with derived file keys (filekeys.py)
every key comes from the secret, which the wrapping holds: ``add`` re-keys nothing, and
``remove`` cannot revoke what older config copies open.

Invariants:
- ``add`` holds the mount lock (mode "rekey") from its first check to its last file, and writes
  the re-key marker (rewrap.py, operation "full", ``"adding": true``) before a new key file or
  the config changes; the marker goes only once every file has a derived key: while a file may
  still have a random key, read-write mounts are refused and running ``add`` again (or ``encfs
  rekey --full``) finishes it. A config with a recovery wrapping and no marker means every
  file's key is derived.
- A mount by the recovery key is allowed with any marker (read-only, nothing replayed): every
  file's key is derived from the file id, which a re-wrap never changes; a file whose key is not
  (an add's file not yet converted) fails its block's AEAD check: EIO, never other bytes.
- Opening by the recovery key needs no token: a copy counts only once its recovery wrapping
  opens under the key and its MAC verifies under the secret it holds (FORMAT.md §6.1).
- The recovery key is read from a file named on the command line (recoverykey.py) and never
  written anywhere else; it, R and the secret never reach a message or a log line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from encfs.errors import UsageError, WrongPassphrase
from encfs.fuse.fsconfig import (
    CONFIG_NAME,
    COPIES,
    DERIVED_FEATURE,
    FS_FORMAT,
    RECOVERY_FEATURE,
    FsConfig,
    FsConfigError,
    OpenedConfig,
    _read_copy,
    _verify,
    derive_fs_keys,
    open_config,
    peek_config,
    write_config,
)
from encfs.fuse.mountlock import REKEY_MODE, MountLock
from encfs.fuse.recoverykeys import WrongKey, open_keys, seal_keys
from encfs.keys.service import KeyService
from encfs.output import report
from encfs.recoverykey import new_recovery_key, read_recovery_key


def open_by_recovery_key(cipherdir: Path, recovery_key: bytes, source: str) -> OpenedConfig:
    """The config verified by the recovery key alone (read-only: nothing is written). WrongPassphrase
    (exit 77) if ``recovery_key`` (read from the file ``source``) opens no copy."""
    if not cipherdir.is_dir():
        raise FsConfigError(f"{cipherdir} is not a directory")
    copies = [_read_copy(cipherdir, name) for name in COPIES]
    if all(c.missing for c in copies):
        raise FsConfigError(f"{cipherdir} is not an encfs filesystem (no {CONFIG_NAME})")
    with_key = [c for c in copies if c.config is not None and c.config.recovery is not None]
    if not with_key:
        raise FsConfigError(f"{cipherdir} has no recovery key (`encfs recovery-key add` sets one)")
    wrong = 0
    for copy in with_key:
        config = copy.config
        assert config is not None and config.recovery is not None
        try:
            secret, root = open_keys(recovery_key, config.fs_id, config.recovery)
        except WrongKey:
            wrong += 1
            copy.problem = "not opened by this recovery key"
            continue
        _verify(copy, secret)  # the MAC under the secret it holds; a newer format is refused
        if copy.problem is None:
            warnings = [f"{c.name} is {c.problem}" for c in copies if c.problem and c is not copy]
            return OpenedConfig(config, derive_fs_keys(secret, config.fs_id), warnings, secret, root)
    if wrong == len(with_key):
        raise WrongPassphrase(f"{source} is not the recovery key of {cipherdir} (wrong recovery key)")
    raise FsConfigError(f"{cipherdir}: " + "; ".join(f"{c.name} is {c.problem}" for c in copies if c.problem))


@dataclass
class Added:
    fs_id: str
    files: int = 0  # files given a derived key
    derived: bool = False  # DERIVED_FEATURE: every file's key comes from the secret, which the key opens
    resealed: int = 0
    resumed: bool = False  # an interrupted add was finished
    already: bool = False  # this recovery key was set and every file's key derived already


def add_recovery_key(cipherdir: Path, ks: KeyService, key_file: str, create: bool) -> Added:
    """Set the recovery key of ``key_file`` (``create``: a new random one written there) and give
    every file a key derived from R (see the module docstring). The lock is held from the first
    check to the last file: a kill anywhere leaves the "adding" marker, and the same command
    finishes the job (with ``create``, taking the key file the killed run wrote)."""
    from encfs.fuse import rewrap

    peek_config(cipherdir)  # an encfs filesystem: only then may its lock file be created
    lock = MountLock.acquire(cipherdir, "-", read_only=False, mode=REKEY_MODE)
    recovering = lock.recovering
    try:
        marker = rewrap.read_marker(cipherdir, None, rewrap.FULL)
        if marker is not None:  # a killed run's own record made the lock say "recovering": the marker knows
            recovering = bool(marker.get("recovering", True))
        adding = marker is not None and marker.get("adding") is True
        opened = open_config(cipherdir, ks, writable=marker is None)
        config = opened.config
        result = Added(config.fs_id)
        if config.recovery is not None:  # set already: the same key finishes an interrupted add
            if create and not (adding and os.path.lexists(key_file)):
                raise UsageError(f"{cipherdir} has a recovery key already: `encfs recovery-key remove` it first")
            try:
                open_keys(read_recovery_key(key_file), config.fs_id, config.recovery)
            except WrongKey:
                raise UsageError(f"{cipherdir} has another recovery key already: `encfs recovery-key remove` "
                                 f"it first") from None
            if marker is None:
                result.already = True
                return result
            result.resumed = True
        else:
            if marker is not None and not adding:
                rewrap.refuse_if_interrupted(cipherdir)  # another re-key's: finish it first
            if config.format < FS_FORMAT:
                raise FsConfigError(f"{cipherdir}: its config is still format {config.format}: mount it "
                                    f"read-write once (which upgrades it), then add a recovery key")
            recovery_key: bytes | None = None
            if not create or (adding and os.path.lexists(key_file)):  # a killed run's key: not used yet
                recovery_key = read_recovery_key(key_file)
            elif os.path.lexists(key_file):  # before the marker: a refusal leaves nothing behind
                raise UsageError(f"{key_file} exists: --new-recovery-key never replaces a file")
            root = ks.generate_data_key(config.key_id, config.root_context(), with_plaintext=True,
                                        encfs_internal=True)
            assert root.plaintext is not None
            # The marker first: from the key file's creation on, the same command finishes the job,
            # and from the config's change on, no mount until every key is derived.
            if marker is None:
                rewrap._write_marker(cipherdir, rewrap.FULL, config.key_id, recovering, adding=True)
            else:
                result.resumed = True
            if recovery_key is None:
                recovery_key = new_recovery_key(key_file)
            write_config(cipherdir, opened, replace(
                config, features=(*config.features, RECOVERY_FEATURE), wrapped_root=root.ciphertext_blob,
                recovery=seal_keys(recovery_key, config.fs_id, opened.secret, root.plaintext)))
        if DERIVED_FEATURE in config.features and (marker is None or adding):
            # Every key derives from the secret, which the wrapping holds: only add's own marker goes
            # (another run's, an interrupted `encfs rekey --full`, is finished below as always).
            rewrap._remove(cipherdir, os.fsencode(cipherdir), (rewrap.MARKER,))
            result.derived = True
            return result
        done = rewrap.rewrap_filesystem(cipherdir, ks, None, full=True, held=lock)  # resumes from the marker
        result.files, result.resealed = done.fresh, done.resealed
        return result
    finally:
        lock.release(clean=not recovering)


def remove_recovery_key(cipherdir: Path, ks: KeyService) -> FsConfig | None:
    """Drop the recovery root and wrapping from both copies; the config as it is now, or None if
    there was none to drop."""
    from encfs.fuse import rewrap

    peek_config(cipherdir)
    lock = MountLock.acquire(cipherdir, "-", read_only=False, mode=REKEY_MODE)
    recovering = lock.recovering
    try:
        rewrap.refuse_if_interrupted(cipherdir)
        opened = open_config(cipherdir, ks, writable=True)
        config = opened.config
        if RECOVERY_FEATURE not in config.features:
            return None
        without = replace(config, features=tuple(f for f in config.features if f != RECOVERY_FEATURE),
                          wrapped_root=None, recovery=None)
        write_config(cipherdir, opened, without)
        return without
    finally:
        lock.release(clean=not recovering)


# -- the commands ----------------------------------------------------------------------------------------

def init_recovery_key(args: argparse.Namespace) -> Callable[[], bytes] | None:
    """For `encfs init`: what gives the new filesystem its recovery key, if one was asked for."""
    if args.new_recovery_key:
        return lambda: new_recovery_key(args.new_recovery_key)
    if args.recovery_key:
        key = read_recovery_key(args.recovery_key)  # before anything is created
        return lambda: key
    return None


def cmd_add(args: argparse.Namespace) -> int:
    from encfs.cliargs import open_key_service

    cipherdir = Path(args.cipherdir)
    key_file = args.new_recovery_key or args.recovery_key
    with open_key_service(args) as ks:
        done = add_recovery_key(cipherdir, ks, key_file, create=bool(args.new_recovery_key))
    record = {"CipherDir": str(cipherdir.absolute()), "FileSystemId": done.fs_id, "RecoveryKey": True,
              "Changed": not done.already, "AlreadySet": done.already, "Resumed": done.resumed, "Files": done.files, "CopiedBytes": done.resealed}
    if done.already:
        text = f"{cipherdir}: this recovery key is set already: nothing to do"
    elif done.derived:
        text = (f"{cipherdir}: recovery key {key_file} set; every file's key derives from the filesystem secret, "
                f"which it opens. Anyone with {key_file} and the CIPHERDIR reads every file without the HSM: "
                f"keep it apart")
    else:
        text = (f"{cipherdir}: recovery key {key_file} set" + (", finishing an interrupted add" if done.resumed else "")
                + f"; {done.files} file{'s' if done.files != 1 else ''} given keys derived from it "
                f"({done.resealed / (1 << 20):.1f} MiB re-encrypted). Anyone with {key_file} and the CIPHERDIR "
                f"reads every file without the HSM: keep it apart")
    report(args, record, text)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from encfs.cliargs import open_key_service

    cipherdir = Path(args.cipherdir)
    with open_key_service(args) as ks:
        removed = remove_recovery_key(cipherdir, ks)
    if removed is not None and DERIVED_FEATURE in removed.features:  # the keys come from the secret, which old copies hold
        after = ("copies of the config from before, and backups, still open with it, and so every file, new "
                 "ones too: only a new filesystem is closed to it")
    else:
        after = ("copies of the config from before, and backups, still open with it; `encfs rekey --full` "
                 "gives every file a key it does not derive")
    report(args, {"CipherDir": str(cipherdir.absolute()), "RecoveryKey": False, "Changed": removed is not None},
           f"{cipherdir}: recovery key removed ({after})" if removed is not None
           else f"{cipherdir}: has no recovery key: nothing to do")
    return 0
