"""``encfs hsm backup FILE`` and ``encfs hsm restore FILE`` (the archive: encfs.keys.backup).

The archive's passphrase is asked on the terminal (twice for a backup) or read from
``--passphrase-file``; a recovery key is a file (``--recovery-key``; ``--new-recovery-key``
creates one). Neither ever appears in argv, the environment or the audit log.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from encfs.errors import ConfigError, NoKeyStore, StateError, UsageError
from encfs.keys import backup
from encfs.keys.audit import AuditLog
from encfs.keys.backup import KIND_PASSPHRASE, KIND_RECOVERY_KEY, Secret
from encfs.output import report
from encfs.recoverykey import new_recovery_key, read_recovery_key


def _home(args: argparse.Namespace) -> Path:
    """The state directory, if it is one the embedded token lives in (or may be restored to)."""
    from encfs.cliargs import state_dir
    from encfs.keys.config import HsmOptions, resolve_token

    home = state_dir(args)
    _spec, embedded = resolve_token(home, HsmOptions())  # also checks the directory is usable
    if embedded is None:
        raise UsageError(f"{home}/config.toml names a PKCS#11 module: `encfs hsm backup` and `restore` apply to "
                         f"the embedded SoftHSM2 token (back up a real HSM with its vendor's tools)")
    return home


def _passphrase(args: argparse.Namespace, confirm: bool) -> Secret:
    from encfs.keys.pinseal import read_passphrase

    what = "new passphrase for the backup" if confirm else "passphrase of the backup"
    text = read_passphrase(args.passphrase_file, what, confirm=confirm)
    return Secret(KIND_PASSPHRASE, text.encode("utf-8", "surrogateescape"))


def _audit(home: Path) -> AuditLog:
    log = AuditLog(home / "audit.log")
    log.open()  # an unwritable audit log refuses the command before it acts, as KeyService.open does
    return log


def cmd_backup(args: argparse.Namespace) -> int:
    home = _home(args)
    from encfs.keys.softhsm import EmbeddedSoftHSM

    if not EmbeddedSoftHSM(home).provisioned:
        raise NoKeyStore(home)
    out = Path(args.file).expanduser().absolute()
    if os.path.lexists(out):
        raise UsageError(f"{out} exists: a backup never replaces a file (choose another name)")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: no such directory {out.parent}")
    log = _audit(home)
    try:
        if args.new_recovery_key:
            secret = Secret(KIND_RECOVERY_KEY, new_recovery_key(args.new_recovery_key))
        elif args.recovery_key:
            secret = Secret(KIND_RECOVERY_KEY, read_recovery_key(args.recovery_key))
        else:
            secret = _passphrase(args, confirm=True)
        files = backup.snapshot(home)
        data = backup.seal(backup.pack_payload(files, time.time(), str(home)), secret)
        backup.write_archive(out, data)
        sealed = "a passphrase" if secret.kind == KIND_PASSPHRASE else "a recovery key"
        log.record("BackupKeyStore", archive=str(out), files=len(files), sealed_with=sealed.split(" ", 1)[1])
    finally:
        log.close()
    report(args, {"StateDirectory": str(home), "Archive": str(out), "Files": len(files), "Bytes": len(data),
                  "SealedWith": sealed.split(" ", 1)[1]},
           f"key store {home} backed up to {out} ({len(files)} files, {len(data)} bytes, sealed under {sealed})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    home = _home(args)
    existing = backup.existing_store(home) if home.is_dir() else []
    if existing and not args.force:  # before asking for anything; checked again under the lock
        raise StateError(f"a key store exists at {home} ({', '.join(existing)}); restoring would replace it: "
                         f"give --force")
    path = Path(args.file)
    try:
        with open(path, "rb") as f:
            data = f.read(backup.MAX_ARCHIVE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read backup {path}: {e.strerror}") from None
    if len(data) > backup.MAX_ARCHIVE:
        raise UsageError(f"{path} is over {backup.MAX_ARCHIVE} bytes: not an encfs key store backup")
    kind = backup.archive_kind(data, path)
    if args.recovery_key:
        secret = Secret(KIND_RECOVERY_KEY, read_recovery_key(args.recovery_key))
    elif kind == KIND_RECOVERY_KEY:
        raise UsageError(f"backup {path} is sealed under a recovery key: give --recovery-key FILE")
    else:
        secret = _passphrase(args, confirm=False)
    files, meta = backup.unpack_payload(backup.open_archive(data, secret, path), path)
    replaced = backup.restore(home, files, args.force)
    log = _audit(home)
    try:
        log.record("RestoreKeyStore", archive=str(path.absolute()), backup_created=meta.get("created"),
                   backup_source=meta.get("source"), replaced_existing=bool(replaced))
    finally:
        log.close()
    pins = ("its PINs are sealed: commands ask for that passphrase" if "softhsm/pins.sealed" in files
            else "its PINs are in plain files, mode 0600")
    report(args, {"StateDirectory": str(home), "Archive": str(path.absolute()), "BackupCreated": meta.get("created"),
                  "BackupSource": meta.get("source"), "ReplacedExisting": bool(replaced),
                  "PinsSealed": "softhsm/pins.sealed" in files},
           f"key store restored into {home} from {path} (backed up {meta.get('created')} from "
           f"{meta.get('source')}{'; the previous store was replaced' if replaced else ''}); {pins}")
    return 0


def register(hsm: Any) -> None:
    def secret_options(p: argparse.ArgumentParser) -> Any:
        p.add_argument("file", metavar="FILE")
        p.add_argument("--home", help="state directory (default $ENCFS_HOME or ~/.local/share/encfs)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--passphrase-file", metavar="FILE",
                       help="the archive's passphrase, first line of FILE (default: ask on the terminal)")
        g.add_argument("--recovery-key", metavar="FILE", help="seal or open the archive with this recovery key file")
        return g

    help_b = "seal the embedded token, its PINs and the key metadata into FILE (a passphrase or a recovery key)"
    p = hsm.add_parser("backup", help=help_b, description=help_b)
    secret_options(p).add_argument("--new-recovery-key", metavar="KEYFILE",
                                   help="create a random recovery key in KEYFILE (mode 0600; keep it apart)")
    p.set_defaults(func=cmd_backup)
    help_r = "restore the embedded key store from a backup FILE (refuses to replace a store without --force)"
    p = hsm.add_parser("restore", help=help_r, description=help_r)
    secret_options(p)
    p.add_argument("--force", action="store_true", help="replace the key store that is there")
    p.set_defaults(func=cmd_restore)
