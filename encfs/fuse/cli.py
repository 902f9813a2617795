"""``encfs init``, ``encfs mount``, ``encfs umount``, ``encfs info``.

The mount machinery is imported only by the commands that mount: every encfs
command pays for the imports of the modules its parser registers.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat as stat_m
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.fuse.fsconfig import (
    BLOCK_FEATURES,
    CONFIG_NAME,
    DEFAULT_BLOCK_SIZE,
    DERIVED_FEATURE,
    init_filesystem,
    peek_config,
)
from encfs.fuse.mounthelper import add_mount8_options
from encfs.fuse.names import is_internal, is_longname_entry
from encfs.output import print_json, report

log = logging.getLogger("encfs.fuse")


def _ks_args(args: argparse.Namespace) -> tuple[Any, Any]:
    from encfs.cliargs import home_of, hsm_options

    return home_of(args), hsm_options(args)


def cmd_init(args: argparse.Namespace) -> int:
    from encfs.cliargs import open_service
    from encfs.fuse.recovery import init_recovery_key

    home, hsm = _ks_args(args)
    recovery_key = init_recovery_key(args)
    with open_service(home, hsm) as ks:
        config = init_filesystem(Path(args.cipherdir), ks, args.key, block_size=args.block_size,
                                 recovery_key=recovery_key, wrapped_file_keys=args.wrapped_file_keys)
    report(args, {"CipherDir": str(Path(args.cipherdir).absolute()), "FileSystemId": config.fs_id,
                  "KeyId": config.key_id, "BlockSize": config.block_size, "RecoveryKey": recovery_key is not None,
                  "FileKeys": "derived" if DERIVED_FEATURE in config.features else "wrapped"},
           f"encrypted filesystem {config.fs_id} created in {args.cipherdir} under key {config.key_id}"
           f" ({config.block_size // 1024} KiB blocks)"
           + (f"; recovery key {args.new_recovery_key or args.recovery_key} opens it without the HSM: keep it apart"
              if recovery_key else ""))
    return 0


# encfs's own settings inside -o (fstab): home=DIR, config=FILE, pin-file=FILE, passphrase-file=FILE,
# log-file=FILE, server=NAME
_OWN_OPTIONS = {"home": "home", "config": "config", "pin-file": "pin_file", "passphrase-file": "passphrase_file",
                "log-file": "log_file", "server": "server"}
# -o flags that are encfs's own: libfuse's spellings of --debug and --io-uring, and --keep-cpu-awake.
_OWN_FLAGS = {"debug": "debug", "io_uring": "io_uring", "keep_cpu_awake": "keep_cpu_awake"}


def take_own_options(args: argparse.Namespace) -> None:
    """Move encfs's own settings out of ``-o`` into ``args`` (the rest stays in ``args.fuse_extra``).

    The CLI calls this before anything reads the token options (where the PIN comes from)."""
    if hasattr(args, "fuse_extra"):
        return
    args.fuse_extra = []
    for o in (o for opt in (args.o or []) for o in opt.split(",") if o):
        name, eq, value = o.partition("=")
        if eq and name in _OWN_OPTIONS:
            setattr(args, _OWN_OPTIONS[name], value)
        elif not eq and name in _OWN_FLAGS:  # never to FUSE, nor dropped by -s
            setattr(args, _OWN_FLAGS[name], True)
        else:
            args.fuse_extra.append(o)


def cmd_mount(args: argparse.Namespace) -> int:
    from encfs.fuse import mounthelper
    from encfs.fuse.mount import MountOptions, mount

    take_own_options(args)
    if args.sloppy:
        args.fuse_extra, dropped = mounthelper.sloppy_filter(args.fuse_extra)
        if dropped and args.verbose and not args.json:  # --json: stdout is the one object
            print(f"encfs: ignored (sloppy): {','.join(dropped)}", file=sys.stderr)
    cipherdir, mountpoint = Path(args.cipherdir), Path(args.mountpoint)
    if "remount" in args.fuse_extra:  # mount -o remount,ro|rw, through mount.fuse3
        from encfs.fuse.mount import remount

        code = remount(cipherdir, mountpoint, read_only="ro" in args.fuse_extra, fake=args.fake)
        _mounted(args, "ro" in args.fuse_extra, fake=args.fake)
        return code
    if "nofail" in args.fuse_extra and (missing := mounthelper.missing_under_nofail(cipherdir, mountpoint)):
        log.warning("%s: not mounted (nofail)", missing)
        report(args, {"CipherDir": str(cipherdir.absolute()), "MountPoint": str(mountpoint.absolute()),
                      "Mounted": False}, None)
        return 0
    home, hsm = _ks_args(args)
    recovery_key = None
    if args.recovery_key:  # read-only: new files would need the CMK (recovery.py)
        from encfs.recoverykey import read_recovery_key

        recovery_key = read_recovery_key(args.recovery_key)
    opts = MountOptions(read_only=args.read_only or "ro" in args.fuse_extra or recovery_key is not None,
                        recovery_key=recovery_key, recovery_key_file=args.recovery_key,
                        allow_other=args.allow_other or "allow_other" in args.fuse_extra, extra=args.fuse_extra,
                        log_file=args.log_file, debug=args.debug, server=getattr(args, "server", None) or "encfs",
                        io_uring=args.io_uring, keep_cpu_awake=args.keep_cpu_awake)
    code = mount(cipherdir, mountpoint, home, hsm, opts, args.foreground, fake=args.fake)
    if not args.foreground or args.fake:  # in the foreground the command is the daemon: it returns once unmounted
        _mounted(args, opts.read_only, opts.server, fake=args.fake)
    return code


def _mounted(args: argparse.Namespace, read_only: bool, server: str | None = None, fake: bool = False) -> None:
    """A mount prints nothing, as mount(8); with --json, what it mounted; with --verbose (mount -v), a line."""
    cipherdir, mountpoint = Path(args.cipherdir).absolute(), Path(args.mountpoint).absolute()
    text = (f"encfs: {cipherdir} {'would be' if fake else 'is'} mounted on {mountpoint}{' (fake)' if fake else ''}"
            if args.verbose else None)
    report(args, {"CipherDir": str(cipherdir), "MountPoint": str(mountpoint), "ReadOnly": read_only,
                  **({"Server": server} if server else {}), **({"Mounted": False} if fake else {})}, text)


def cmd_install_mount_helper(args: argparse.Namespace) -> int:
    """mount(8) runs /sbin/mount.fuse.encfs CIPHERDIR MOUNTPOINT -o OPTS with a sanitised PATH."""
    from encfs.fuse import mounthelper

    path = Path(args.path)
    mounthelper.install(path, force=args.force)
    report(args, {"Path": str(path)}, f"installed {path}: fstab lines like `CIPHERDIR MOUNTPOINT fuse.encfs defaults,home=/root/.local/share/encfs 0 0` now mount")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from encfs.fuse.mount import umount

    umount(Path(args.mountpoint))
    report(args, {"MountPoint": str(Path(args.mountpoint).absolute()), "Unmounted": True}, None)  # silent as umount(8)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """What the config says without the token (so not verified: a mount verifies both copies),
    the mount lock's state, and counts of the backing tree. A mountpoint of an encfs mount names
    its CIPHERDIR (the mount's source)."""
    from encfs.fuse.mountlock import describe
    from encfs.fuse.mounttable import mount_at

    cipherdir = Path(args.cipherdir)
    mounted = mount_at(cipherdir)
    if mounted is not None:
        cipherdir = Path(mounted.source)
    config, warnings = peek_config(cipherdir)
    counts = {"files": 0, "directories": 0, "symlinks": 0, "other": 0, "long_names": 0, "backing_bytes": 0}
    for _dirpath, dirnames, filenames, dir_fd in os.fwalk(cipherdir):  # by dir fds: paths past PATH_MAX
        for name in dirnames + filenames:
            raw = os.fsencode(name)
            if is_internal(raw):
                continue
            counts["long_names"] += is_longname_entry(raw)
            st = os.lstat(name, dir_fd=dir_fd)
            counts["backing_bytes"] += st.st_size
            kind = ("files" if stat_m.S_ISREG(st.st_mode) else "directories" if stat_m.S_ISDIR(st.st_mode)
                    else "symlinks" if stat_m.S_ISLNK(st.st_mode) else "other")
            counts[kind] += 1
    sizes = [BLOCK_FEATURES[f] for f in config.features if f in BLOCK_FEATURES]
    info = {"cipherdir": str(cipherdir), "mountpoint": mounted.mountpoint if mounted else None,
            "config": CONFIG_NAME, "format": config.format, "verified": False,
            "fs_id": config.fs_id, "key_id": config.key_id, "features": list(config.features),
            "block_size": sizes[0] if len(sizes) == 1 else None, "recovery": config.recovery is not None,
            "lock": describe(cipherdir),
            "counts": counts, "warnings": warnings}
    if args.json:
        print_json(info)  # PascalCase: CipherDir, FileSystemId, KeyId, Counts.LongNames...
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                v = ", ".join(f"{name}={n}" for name, n in v.items())
            elif isinstance(v, list):
                v = ", ".join(v) or "-"
            elif v is None:
                v = "-"
            elif k == "verified":
                v = "no (needs the token: a mount verifies both copies)"
            elif k == "recovery":
                v = "yes (its file opens every file without the HSM)" if v else "no"
            print(f"{k:10} {v}")
    return 0


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("init", help="create an encrypted filesystem in CIPHERDIR")
    add_hsm_options(p)
    p.add_argument("cipherdir", metavar="CIPHERDIR")
    p.add_argument("--key", required=True, metavar="KEY", help="CMK (id or alias) that wraps its keys")
    p.add_argument("--block-size", type=int, choices=sorted(BLOCK_FEATURES.values()), default=DEFAULT_BLOCK_SIZE,
                   metavar="BYTES", help=f"plaintext bytes per AES-GCM content block (default {DEFAULT_BLOCK_SIZE}; "
                   "32768: sequential reads a few percent faster, 4 KiB random I/O slower)")
    p.add_argument("--wrapped-file-keys", action="store_true",
                   help="wrap every new file's data key by the CMK (a pass through the token per 32 new files, an "
                   "audit record per file, as S3 without bucket keys) instead of deriving it from the "
                   "filesystem's secret")
    from encfs.recoverycli import add_key_options

    add_key_options(p, required=False)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("mount", help="mount CIPHERDIR as plaintext at MOUNTPOINT")
    add_hsm_options(p)
    p.add_argument("cipherdir", metavar="CIPHERDIR")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    p.add_argument("--read-only", "--ro", action="store_true")
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument("-o", action="append", metavar="OPTS", help="extra FUSE mount options")
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: none)")
    p.add_argument("--debug", "-d", action="store_true",
                   help="log every FUSE request and error reply by opcode name (to --log-file, or stderr with -f)")
    p.add_argument("--server", metavar="NAME",
                   help="FUSE server: encfs (default, the project's own protocol server) or pyfuse3 "
                   "(libfuse 3 through pyfuse3 on trio); fstab: -o server=NAME")
    p.add_argument("--io-uring", action="store_true",
                   help="serve requests over FUSE io_uring queues, one per CPU, when the kernel offers them "
                   "(root: echo Y > /sys/module/fuse/parameters/enable_uring); fstab: -o io_uring")
    p.add_argument("--keep-cpu-awake", action="store_true",
                   help="while requests flow, keep another CPU busy with a nice-19 helper process, so callers are "
                   "woken on the CPU that answered them: faster small-file operations on 2-vCPU virtual machines, "
                   "at the cost of that CPU's idle time; fstab: -o keep_cpu_awake")
    p.add_argument("--recovery-key", metavar="FILE",
                   help="open it by its recovery key, without the token (no PIN; always read-only)")
    add_mount8_options(p)
    p.set_defaults(func=cmd_mount, prepare=take_own_options)

    p = sub.add_parser("install-mount-helper",
                       help="install /sbin/mount.fuse.encfs so /etc/fstab entries of type fuse.encfs work")
    p.add_argument("--path", default="/sbin/mount.fuse.encfs", help="where (default /sbin/mount.fuse.encfs)")
    p.add_argument("--force", action="store_true",
                   help="replace a file at --path that encfs did not install (by default it is kept)")
    p.set_defaults(func=cmd_install_mount_helper)

    p = sub.add_parser("umount", help="flush and unmount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("info", help="format version, key id, feature flags, counts")
    p.add_argument("cipherdir", metavar="CIPHERDIR|MOUNTPOINT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
