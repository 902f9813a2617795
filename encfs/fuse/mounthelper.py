"""The fstab side of ``encfs mount``: mount(8)'s helper conventions and ``encfs install-mount-helper``.

mount(8) runs ``/sbin/mount.fuse.encfs CIPHERDIR MOUNTPOINT [-sfnv] [-o OPTS]`` (util-linux's
"external helpers"); that script runs ``encfs CIPHERDIR MOUNTPOINT ...``, which encfs.cli turns
into ``encfs mount`` with mount(8)'s flags translated here (``-f`` there is fake, not foreground).

Invariants:
- mount(8)'s flags: ``-f`` (fake) checks everything a mount checks and mounts nothing; ``-n``
  (no mtab: encfs never writes one) is accepted and ignored; ``-v`` prints what was mounted;
  ``-s`` (sloppy) drops -o options neither encfs nor fusermount3 knows instead of failing.
- mount(8)'s own options (MOUNT8_OPTIONS: ``user``, ``users``, ``noauto``, ``nofail``,
  ``_netdev``, ...) and ``x-*``/``comment=`` are accepted and never passed to FUSE. ``nofail``:
  a CIPHERDIR or MOUNTPOINT that does not exist (a disk or network share not there) is one
  warning line and exit 0; every other failure still fails.
- ``install-mount-helper`` replaces only a file that carries MARKER (one it wrote), unless
  ``--force``: a helper of another package, such as a legacy EncFS setup's, is kept byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.errors import Busy

MARKER = "# installed by `encfs install-mount-helper`"

# mount(8)'s and systemd's options, meaningless to FUSE: mount(8) or systemd act on them
# (mount.fuse3 drops the same ones). `user`/`users` let users mount the fstab entry; mount(8)
# adds noexec,nosuid,nodev for them, which do go to FUSE.
MOUNT8_OPTIONS = {"defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                  "_netdev", "nofail"}

# What fusermount3 (libfuse 3.14, util/fusermount.c) accepts; with -s, anything else is dropped.
FUSERMOUNT_FLAGS = {"ro", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync", "atime",
                    "noatime", "diratime", "nodiratime", "lazytime", "nolazytime", "relatime", "norelatime",
                    "strictatime", "nostrictatime", "dirsync", "symfollow", "nosymfollow", "default_permissions",
                    "allow_other", "allow_root", "auto_unmount", "blkdev", "debug"}
FUSERMOUNT_VALUED = {"fsname", "subtype", "max_read", "blksize", "context", "fscontext", "defcontext",
                     "rootcontext"}

# mount(8)'s flags as the helper gets them, as `encfs mount` options (None: accepted, ignored)
_FLAGS = {"f": "--fake", "n": None, "v": "--verbose", "s": "--sloppy"}


def is_mount8_option(option: str) -> bool:
    # mount(8) passes `user=NAME` (the mounting user) to a helper when a non-root user mounts a
    # `user`/`users` line: it is mount(8)'s, not FUSE's.
    return option in MOUNT8_OPTIONS or option.startswith(("x-", "comment=", "user="))


def translate_helper_args(rest: list[str]) -> list[str]:
    """mount(8)'s ``[-sfnv] [-o OPTS] [-t TYPE]`` after CIPHERDIR MOUNTPOINT, as `encfs mount` options."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "-t" and i + 1 < len(rest):  # fuse.encfs: the helper's own type
            i += 2
            continue
        if len(arg) > 1 and arg[0] == "-" and all(c in _FLAGS for c in arg[1:]):
            out.extend(dict.fromkeys(o for c in arg[1:] if (o := _FLAGS[c])))
        else:
            out.append(arg)
        i += 1
    return out


def known_to_fuse(option: str) -> bool:
    name, eq, _value = option.partition("=")
    return name in FUSERMOUNT_VALUED if eq else name in FUSERMOUNT_FLAGS


def sloppy_filter(options: list[str]) -> tuple[list[str], list[str]]:
    """-s: (the options kept, those dropped: fusermount3 would refuse them)."""
    dropped = [o for o in options if not known_to_fuse(o) and not is_mount8_option(o) and o != "remount"]
    return [o for o in options if o not in dropped], dropped


def missing_under_nofail(cipherdir: Path, mountpoint: Path) -> str | None:
    """With nofail, what does not exist (a disk or share not there yet), else None."""
    for what, path in (("CIPHERDIR", cipherdir), ("mountpoint", mountpoint)):
        if not os.path.lexists(path):
            return f"{what} {path} does not exist"
    return None


def helper_script() -> str:
    # -P: mount(8) runs this as root from whatever directory root is in; without it, `python -m`
    # would import an `encfs` package planted there (Python >= 3.11).
    return f'#!/bin/sh\n{MARKER}\nexec {shlex.quote(sys.executable)} -P -m encfs "$@"\n'


def install(path: Path, force: bool) -> None:
    """Write the helper at ``path`` atomically; a file there that is not ours is refused (Busy)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        head = None
    except IsADirectoryError:
        raise Busy(f"{path} is a directory: not replaced") from None
    if head is not None and MARKER.encode() not in head.splitlines() and not force:
        raise Busy(f"{path} exists and was not installed by encfs (another package's mount helper?): "
                   f"not replaced; remove it or pass --force")
    # The shared write-fsync-rename: a per-process temporary name, so two installs never collide.
    write_atomic(path, helper_script().encode(), 0o755, sync_dir=True)
    os.chmod(path, 0o755)  # whatever the umask took off


def add_mount8_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mount(8)'s flags (the fstab helper passes them as -f, -v, -s; -n is ignored)")
    g.add_argument("--fake", action="store_true",
                   help="check CIPHERDIR, its config and MOUNTPOINT as a mount would, then mount nothing")
    g.add_argument("--verbose", action="store_true", help="print what was mounted where")
    g.add_argument("--sloppy", action="store_true",
                   help="drop -o options neither encfs nor fusermount3 knows instead of failing")
