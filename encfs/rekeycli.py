"""``encfs rekey TARGET``: move a volume, a snapshot export or a filesystem to another CMK.

TARGET is a volume image, an export directory (``encfs snapshot export``) or a CIPHERDIR; the
kind is read from what is there (a CIPHERDIR's re-wrap and ``--full``: encfs/fuse/rewrap.py and
fullrekey.py). As with ``cryptsetup luksChangeKey`` and AWS KMS's
ReEncrypt, the default is a re-wrap: every wrapped key moves under ``--key`` (or, without it,
under its own CMK's newest backing-key version, after ``encfs key rotate``), and no content
is rewritten, so the old CMK can then be disabled or deleted. ``--full`` gives fresh data
keys and re-encrypts every byte, as ``cryptsetup reencrypt`` does: a volume is copied and
swapped in, snapshots and all (block/rekey.py, rekeysnap.py), an export directory rebuilt
beside itself and exchanged with it (block/exportrekey.py); a killed run is finished by the
same command. The target must not be attached or mounted.

Snapshots inside a format-2 volume are sealed under the volume's key: ``encfs rekey VOL``
moves them with it, and ``VOL@snap-…`` is refused with that advice.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from encfs.block.volume import read_volume_header
from encfs.cliargs import open_key_service, state_dir
from encfs.errors import UsageError
from encfs.output import print_json, report

CONFIG_NAMES = ("encfs.conf", "encfs.conf.bak")


def kind_of(target: Path) -> str:
    """"volume", "export" or "filesystem"; UsageError in one line for anything else."""
    if "@" in target.name and not target.exists():
        raise UsageError(f"{target}: a snapshot inside a volume is sealed under the volume's key: "
                         f"`encfs rekey {str(target).rsplit('@', 1)[0]}` moves it with its volume")
    if target.is_dir():
        if any((target / n).exists() for n in CONFIG_NAMES):
            return "filesystem"
        if (target / "key").is_file() and (target / "manifests").is_dir():
            return "export"
        raise UsageError(f"{target} is neither a CIPHERDIR nor an encfs export directory")
    if not target.exists():
        raise UsageError(f"{target}: no such file or directory")
    read_volume_header(target)  # VolumeError in one line unless it is a volume image
    return "volume"


def _finishing(resumed: bool, end: str = "") -> str:
    """The words a run that finished an interrupted one adds to its line (``end``: mid-sentence)."""
    return ", finishing an interrupted re-key" + end if resumed else ""


def _version(key: str, version: int) -> str:
    return f"key {key} (version {version})"


def cmd_rekey(args: argparse.Namespace) -> int:
    from encfs.block.rewrap import rewrap_export, rewrap_volume

    target = Path(args.target)
    kind = kind_of(target)
    if kind == "filesystem":
        return _filesystem(args, target)
    rk = _volume_recovery_key(args, kind)
    if args.full:
        return _full(args, target, kind, rk)
    with open_key_service(args) as ks:
        if kind == "volume":
            done = rewrap_volume(target, ks, args.key, dry_run=args.dry_run, recovery_key=rk)
        else:
            done = rewrap_export(target, ks, args.key, dry_run=args.dry_run)
    what = "volume key" if kind == "volume" else "export key"
    if args.json:
        print_json({"Target": str(target), "Kind": kind, "Changed": done.changed, "DryRun": args.dry_run,
                          "SourceKeyId": done.from_key, "SourceKeyVersion": done.from_version,
                          "KeyId": done.to_key, "KeyVersion": done.to_version,
                          "WrappedKeys": int(done.changed), "Repaired": done.repaired,
                          "Seconds": round(done.seconds, 3)})
    else:
        would = "would " if args.dry_run else ""
        if done.changed:
            print(f"{target}: {would}re-wrap{'' if would else 'ped'} the {what} from "
                  f"{_version(done.from_key, done.from_version)} to {_version(done.to_key, done.to_version)}"
                  + ("" if would else f" in {done.seconds:.2f} s") + " (no content is rewritten)")
        elif done.repaired:
            print(f"{target}: the {what} is under {_version(done.to_key, done.to_version)}; "
                  f"{would}rewr{'ite' if would else 'ote'} the header copies ({done.repaired[0]})")
        else:
            print(f"{target}: the {what} is already under {_version(done.to_key, done.to_version)}: nothing to do")
    return 0


def _filesystem(args: argparse.Namespace, target: Path) -> int:
    from encfs.fuse.rewrap import RewrapError, rewrap_filesystem

    recovery_key = None
    if args.recovery_key:  # the old CMK is lost: the recovery key opens the keys (encfs/fuse/recovery.py)
        from encfs.recoverykey import read_recovery_key

        if not args.key:
            raise UsageError("--recovery-key needs --key NEWCMK: the CMK to move the filesystem to")
        recovery_key = (read_recovery_key(args.recovery_key), args.recovery_key)
    with open_key_service(args) as ks:
        done = rewrap_filesystem(target, ks, args.key, dry_run=args.dry_run, full=args.full,
                                 recovery_key=recovery_key)
    src, dst = _version(done.from_key, done.from_version), _version(done.to_key, done.to_version)
    what = f"{done.files} file key{'s' if done.files != 1 else ''}" + (" and the filesystem key" if done.config else "")
    if done.full:
        mib = done.resealed / (1 << 20)
        files = f"{done.fresh} file{'s' if done.fresh != 1 else ''}"
        if args.json:
            print_json({"Target": str(target), "Kind": "filesystem", "Full": True, "DryRun": args.dry_run,
                              "Resumed": done.resumed, "SourceKeyId": done.from_key,
                              "SourceKeyVersion": done.from_version, "KeyId": done.to_key,
                              "KeyVersion": done.to_version, "Files": done.fresh, "WrappedKeys": done.wrapped_keys,
                              "CopiedBytes": done.resealed, "Damaged": done.damaged,
                              "Seconds": round(done.seconds, 3)})
        elif args.dry_run:
            print(f"{target}: would give {files} fresh data keys under {dst} and re-encrypt "
                  f"{mib:.1f} MiB (one file at a time: needs free space for the largest file)")
        else:
            print(f"{target}: gave {files} fresh data keys under {dst}"
                  + _finishing(done.resumed)
                  + f" ({mib:.1f} MiB re-encrypted in {done.seconds:.1f} s)")
    elif args.json:
        print_json({"Target": str(target), "Kind": "filesystem", "Changed": done.changed, "DryRun": args.dry_run,
                          "Resumed": done.resumed, "SourceKeyId": done.from_key, "SourceKeyVersion": done.from_version,
                          "KeyId": done.to_key, "KeyVersion": done.to_version, "Files": done.files,
                          "WrappedKeys": done.wrapped_keys, "Damaged": done.damaged,
                          "Seconds": round(done.seconds, 3)})
    elif not done.changed:
        print(f"{target}: every wrapped key is already under {dst}: nothing to do")
    elif args.dry_run:
        print(f"{target}: would re-wrap {what} from {src} to {dst}"
              + (" and finish an interrupted re-key" if done.resumed else "") + " (no content is rewritten)")
    else:
        print(f"{target}: re-wrapped {what} from {src} to {dst}"
              + _finishing(done.resumed, ",")
              + f" in {done.seconds:.2f} s (no content rewritten)")
    if done.damaged:
        raise RewrapError(f"{target}: {len(done.damaged)} file header(s) are damaged and stay as they were "
                          f"(first: {done.damaged[0]}): their files could not be read before either")
    return 0


def _volume_recovery_key(args: argparse.Namespace, kind: str) -> bytes | None:
    """A volume's recovery key (--recovery-key FILE): it opens the volume instead of its CMK."""
    if not args.recovery_key:
        return None
    if kind != "volume":  # an export's key is wrapped under the CMK only
        raise UsageError(f"{args.target}: --recovery-key moves a volume or a CIPHERDIR, not an export directory")
    from encfs.recoverykey import read_recovery_key

    return read_recovery_key(args.recovery_key)


def _full(args: argparse.Namespace, target: Path, kind: str, rk: bytes | None = None) -> int:
    from encfs.block.attach import refuse_attached
    from encfs.block.rekey import rekey_volume

    if kind != "volume":
        return _full_export(args, target)
    header, _w = read_volume_header(target)
    refuse_attached(target, header.volume_id.hex())
    if args.dry_run:
        report(args, {"Target": str(target), "Kind": kind, "Full": True, "DryRun": True,
                      "VolumeId": header.volume_id.hex(), "KeyId": args.key or header.key_id},
               f"{target}: would copy every written sector"
               + (" and every snapshot" if header.copy_on_write else "") + " under a fresh volume key"
               + (f" wrapped by {args.key}" if args.key else "") + " (needs free space for the copy)")
        return 0
    with open_key_service(args) as ks:
        done = rekey_volume(target, ks, args.key, recovery_key=rk)
        if done.volume_id != header.volume_id.hex():  # the copy is a new volume: the old id has no blobs left
            ks.usage.forget(f"volume:{header.volume_id.hex()}", None)
    if done.snapshots:  # the catalog names each snapshot's volume id: the copy's is new
        from encfs.block.snapshots import remember

        remember(state_dir(args), target, done.volume_id, done.snapshots)
    mib = done.sectors * 4096 / (1 << 20)
    if args.json:
        print_json({"Target": str(target), "Kind": kind, "Full": True, "VolumeId": done.volume_id,
                          "KeyId": done.key_id, "CopiedBytes": done.sectors * 4096, "Snapshots": done.snapshots,
                          "Resumed": done.resumed, "Seconds": round(done.seconds, 3)})
    else:
        n = len(done.snapshots)
        snaps = f" with its {n} snapshot{'s' if n != 1 else ''}" if n else ""
        print(f"{target}: re-keyed{snaps} as volume {done.volume_id} under key {done.key_id}"
              + _finishing(done.resumed)
              + f" ({mib:.1f} MiB of written sectors re-encrypted in {done.seconds:.1f} s)")
    return 0


def _full_export(args: argparse.Namespace, target: Path) -> int:
    from encfs.block.exportrekey import rekey_export

    with open_key_service(args) as ks:
        done = rekey_export(target, ks, args.key, dry_run=args.dry_run)
    mib = done.bytes_read / (1 << 20)
    n = len(done.snapshots)
    snaps = f"{n} snapshot{'s' if n != 1 else ''}"
    if args.json:
        print_json({"Target": str(target), "Kind": "export", "Full": True, "DryRun": args.dry_run,
                          "Resumed": done.resumed, "KeyId": done.key_id, "Snapshots": done.snapshots,
                          "ObjectsWritten": done.objects_written, "ReadBytes": done.bytes_read,
                          "Seconds": round(done.seconds, 3)})
    elif args.dry_run:
        print(f"{target}: would re-encrypt {done.objects_written} objects ({mib:.1f} MiB read) of {snaps} under a "
              f"fresh export key wrapped by key {done.key_id} (needs free space for a "
              "copy of the directory)")
    else:
        print(f"{target}: re-encrypted {snaps} under a fresh export key wrapped by key {done.key_id}"
              + _finishing(done.resumed)
              + f" ({done.objects_written} objects written, {mib:.1f} MiB read, in {done.seconds:.1f} s)")
    return 0


def register(sub: Any, add_hsm_options: Any) -> None:
    p = sub.add_parser("rekey", help="move a volume, export or filesystem to another CMK (re-wrap, or --full)",
                       description="move a volume, a snapshot export or a filesystem to another CMK: by default every wrapped "
                       "key is re-wrapped and no content is rewritten; --full re-encrypts every byte")
    p.add_argument("target", metavar="TARGET", help="a volume image, an export directory or a CIPHERDIR")
    p.add_argument("--key", metavar="KEY", help="destination CMK (id or alias); default: the target's own "
                                                "CMK, at its newest backing-key version")
    p.add_argument("--full", action="store_true",
                   help="fresh data keys and every byte re-encrypted (default: re-wrap the keys only)")
    p.add_argument("--recovery-key", metavar="FILE",
                   help="a CIPHERDIR or volume whose CMK is lost: open its keys with its recovery key instead, and "
                   "move them under --key (a CIPHERDIR: not with --full); a volume's --full needs it too, and wraps "
                   "the new volume key under it")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_hsm_options(p)
    p.set_defaults(func=cmd_rekey)


__all__ = ["cmd_rekey", "kind_of", "register"]
