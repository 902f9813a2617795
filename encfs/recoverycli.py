"""``encfs recovery-key add|remove TARGET``: one command for a filesystem's and a volume's
recovery key (a CIPHERDIR is a directory, a volume image a file), as cryptsetup's
``luksAddKey``/``luksRemoveKey`` serve every LUKS device.

The work is the filesystem's (encfs.fuse.recovery) or the volume's (encfs.block.recovery, through
encfs.block.cli); this module only parses and dispatches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.errors import ConfigError, UsageError
from encfs.output import JSON_HELP


def _target(args: argparse.Namespace) -> bool:
    """Whether TARGET is a volume image (else a CIPHERDIR); sets the name each side reads."""
    path = Path(args.target)
    if path.is_dir():
        args.cipherdir = args.target
        return False
    if path.is_file():
        args.volume = args.target
        return True
    raise ConfigError(f"{path}: no such CIPHERDIR or volume image")


def cmd_add(args: argparse.Namespace) -> int:
    if _target(args):
        from encfs.block.cli import cmd_add_recovery_key

        return cmd_add_recovery_key(args)
    from encfs.fuse.recovery import cmd_add as add_to_filesystem

    return add_to_filesystem(args)


def cmd_remove(args: argparse.Namespace) -> int:
    if _target(args):
        from encfs.block.cli import cmd_remove_recovery_key

        return cmd_remove_recovery_key(args)
    if args.recovery_key:
        raise UsageError("a filesystem's recovery key is removed with the HSM (drop --recovery-key)")
    from encfs.fuse.recovery import cmd_remove as remove_from_filesystem

    return remove_from_filesystem(args)


def add_key_options(p: argparse.ArgumentParser, required: bool) -> None:
    """--new-recovery-key FILE or --recovery-key FILE (as `encfs hsm backup` takes them)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--new-recovery-key", metavar="FILE",
                   help="create a random recovery key in FILE (mode 0600; never replaces a file; keep it apart): "
                        "it opens the filesystem or volume without the HSM")
    g.add_argument("--recovery-key", metavar="FILE", help="as --new-recovery-key, with the existing key in FILE "
                   "(64 hex digits)")


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("recovery-key", help="add or remove the recovery key of a filesystem or a volume",
                       description="a recovery key opens a filesystem or a volume without the HSM, like a LUKS "
                       "recovery keyslot: anyone with its file and the CIPHERDIR or image reads everything")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("add", help="set a recovery key (a filesystem: then every file is re-keyed so that "
                           "it opens every file); a volume must be detached")
    a.add_argument("target", metavar="CIPHERDIR|VOL")
    add_key_options(a, required=True)
    a.add_argument("--json", action="store_true", help=JSON_HELP)
    add_hsm_options(a)
    a.set_defaults(func=cmd_add)
    r = actions.add_parser("remove", help="drop the recovery key (older copies of the config or image, and "
                           "backups, still open with it)")
    r.add_argument("target", metavar="CIPHERDIR|VOL")
    r.add_argument("--recovery-key", metavar="FILE",
                   help="a volume only: open it with this recovery key instead of the HSM")
    r.add_argument("--json", action="store_true", help=JSON_HELP)
    add_hsm_options(r)
    r.set_defaults(func=cmd_remove)
