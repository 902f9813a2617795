"""``encfs fsck TARGET [--repair] [--json]``: check (and repair) a volume image and its snapshots,
or a snapshot export directory.

TARGET's kind is found first (KINDS: a volume image by its header's magic, an export by its key
file, a CIPHERDIR by its config file), then the checker of that kind runs: encfs/block/fsck.py
for volumes, encfs/block/fsckexport.py for exports, encfs/fuse/fsck.py for filesystems.

Invariants:
- Exit codes are fsck(8)'s (encfs/fsckreport.py): 0 clean, 1 errors corrected, 4 errors left
  uncorrected, 8 operational error. Any error that keeps the check from running (a missing
  target, a wrong PIN, a disabled key, an attached volume, a mounted CIPHERDIR) is one line
  ``encfs: ...`` and 8.
- ``--json`` prints exactly one JSON object on stdout; without it, one line per finding (at
  most MAX_LINES, the rest counted) and a summary line. A progress bar only on a terminal.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.errors import EncfsError
from encfs.fsckreport import EXIT_OPERATIONAL, FsckError, Report
from encfs.output import print_json

MAX_LINES = 50  # findings listed without --json


def _is_volume(path: Path) -> bool:
    from encfs.block.header import MAGIC
    from encfs.block.layout import header_offset

    if not path.is_file():
        return False
    with open(path, "rb") as f:
        for copy in (0, 1):
            f.seek(header_offset(copy))
            if f.read(len(MAGIC)) == MAGIC:
                return True
    return False


def _is_cipherdir(path: Path) -> bool:
    from encfs.fuse.fsconfig import COPIES

    return path.is_dir() and any((path / name).exists() for name in COPIES)


def _is_export(path: Path) -> bool:
    from encfs.block.exportformat import KEY_FILE, MANIFESTS, OBJECTS

    return path.is_dir() and (path / KEY_FILE).is_file() and any((path / d).is_dir() for d in (MANIFESTS, OBJECTS))


def _check_export(args: argparse.Namespace, path: Path) -> Report:
    from encfs.block.fsckexport import check_export
    from encfs.cliargs import open_key_service

    with open_key_service(args) as ks:
        return check_export(path, ks, repair=args.repair)


def _check_volume(args: argparse.Namespace, path: Path) -> Report:
    from encfs.block.attach import refuse_attached
    from encfs.block.fsck import check_volume
    from encfs.block.header import read_header
    from encfs.cliargs import open_key_service

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header, _warnings = read_header(fd)
        finally:
            os.close(fd)
    except EncfsError:
        header = None  # no copy parses: the check reports it (both copies damaged)
    if header is not None:
        refuse_attached(path, header.volume_id.hex())
    with open_key_service(args) as ks:
        return check_volume(path, ks, repair=args.repair)


def _is_device(path: Path) -> bool:
    return path.is_block_device()


def _attached_device(_args: argparse.Namespace, path: Path) -> Report:
    from encfs.block.snapcli import _image_of_loop

    image = _image_of_loop(str(path))  # VolumeError unless it is an attached encfs volume
    raise FsckError(f"{path} is the attached volume {image}: detach it first (`encfs volume detach {path}`), "
                    f"then check {image}")


def _check_filesystem(args: argparse.Namespace, path: Path) -> Report:
    from encfs.cliargs import open_key_service
    from encfs.fuse.fsck import check_filesystem

    with open_key_service(args) as ks:
        return check_filesystem(path, ks, repair=args.repair)


# (kind, whether TARGET is one, its checker), tried in order.
KINDS: list[tuple[str, Callable[[Path], bool], Callable[[argparse.Namespace, Path], Report]]] = [
    ("volume", _is_volume, _check_volume),
    ("export", _is_export, _check_export),
    ("device", _is_device, _attached_device),
    ("filesystem", _is_cipherdir, _check_filesystem),
]


def cmd_fsck(args: argparse.Namespace) -> int:
    path = Path(args.target)
    try:
        if not os.path.lexists(path):
            raise FsckError(f"{path}: no such file or directory")
        checker = next((check for _kind, test, check in KINDS if test(path)), None)
        if checker is None:
            raise FsckError(f"{path} is not an encfs volume image, snapshot export or CIPHERDIR")
        report = checker(args, path)
    except EncfsError as e:
        if e.exit_code == EXIT_OPERATIONAL:
            raise
        raise FsckError(e.message) from None
    except OSError as e:
        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        raise FsckError(f"{where}{e.strerror or e}") from None
    if args.json:
        print_json(report.as_json())  # PascalCase: Target, Kind, Counts, Damage, ExitCode...
    else:
        _print(report)
    return report.exit_code()


def _print(report: Report) -> None:
    for f in report.findings[:MAX_LINES]:
        state = "repaired" if f.repaired else f.severity
        print(f"{report.target}: {state}: {f.message}")
    if len(report.findings) > MAX_LINES:
        print(f"{report.target}: ... and {len(report.findings) - MAX_LINES} more (--json lists them all)")
    c = report.counts
    if report.kind == "filesystem":
        print(_filesystem_summary(report))
        return
    checked = c.get("sectors_checked", 0) * 4096
    rate = f", {checked / report.seconds / 1e6:.0f} MB/s" if report.seconds > 0 and checked else ""
    snaps = f", {c['snapshots']} snapshot{'' if c['snapshots'] == 1 else 's'}" if "snapshots" in c else ""
    verdict = _verdict(report)
    fmt = f"format-{report.format} " if report.format else ""
    print(f"{report.target}: {fmt}{report.kind}{snaps}: {c.get('sectors_checked', 0)} sectors checked "
          f"({checked / (1 << 20):.1f} MiB in {report.seconds:.1f} s{rate}): {verdict} (exit {report.exit_code()})")


def _verdict(report: Report) -> str:
    errors, warnings = report.errors, report.warnings
    repaired = sum(f.repaired for f in report.findings)
    if not errors and not warnings:
        return "clean"
    return (f"{len(errors)} error{'' if len(errors) == 1 else 's'}, {len(warnings)} warning"
            f"{'' if len(warnings) == 1 else 's'}" + (f" ({repaired} repaired)" if repaired else ""))


def _filesystem_summary(report: Report) -> str:
    c = report.counts
    checked = c.get("bytes_checked", 0)
    rate = f", {checked / report.seconds / 1e6:.0f} MB/s" if report.seconds > 0 and checked else ""
    return (f"{report.target}: format-{report.format} filesystem: {c.get('files', 0)} files, "
            f"{c.get('directories', 0)} directories, {c.get('symlinks', 0)} symlinks, {c.get('xattrs', 0)} xattrs "
            f"checked ({checked / (1 << 20):.1f} MiB in {report.seconds:.1f} s{rate}): {_verdict(report)} "
            f"(exit {report.exit_code()})")


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    help = ("check a volume image (and its snapshots), a snapshot export or a filesystem (CIPHERDIR) for damage; "
            "exit codes as fsck(8)")
    p = sub.add_parser("fsck", help=help, description=help)
    add_hsm_options(p)
    p.add_argument("target", metavar="TARGET",
                   help="a volume image (detached), a snapshot export directory or a CIPHERDIR (not mounted)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite damaged header copies, commit and map slots from their good mirror and give back "
                        "leaked space (an export: remove unnamed objects); damaged sectors are listed, never changed. "
                        "A CIPHERDIR: rewrite damaged config and directory-id copies, drop orphaned bookkeeping, "
                        "move files with damaged blocks (readable blocks kept, damaged ones zeros) or names to "
                        "lost+found")
    p.add_argument("--json", action="store_true", help="one JSON object: the counts and every finding")
    p.set_defaults(func=cmd_fsck)
