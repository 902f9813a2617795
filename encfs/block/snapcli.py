"""``encfs snapshot create|list|info|delete|restore|rollback|copy|export|import``.

SNAP is ``VOL@snap-…`` or a snapshot id this machine has seen (snapshots.py). Output follows the
AWS CLI's habits: one line per action, ``--json`` for scripts, sizes in bytes in JSON.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat as stat_m
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.block import snapshots
from encfs.block.rekey import copy_sectors, tmp_path
from encfs.block.volume import OpenVolume, VolumeBusy, VolumeError, format_volume, open_volume
from encfs.cliargs import open_key_service, state_dir
from encfs.diskio import RENAME_NOREPLACE, fsync_dir, renameat2
from encfs.errors import UsageError
from encfs.filelock import lock_still_named
from encfs.keys.service import KeyService
from encfs.output import print_json, print_record, report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {"SnapshotId": r["id"], "Volume": r.get("volume"), "Description": r["description"],
            "StartTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created"])),
            "VolumeSize": r["size"], "ExclusiveBytes": r["exclusive"], "SharedBytes": r["shared"]}


MAX_DESCRIPTION = 255  # as an EBS snapshot's


def _description(text: str | None) -> str:
    """--description: one line of printable text (the list prints it on the snapshot's row)."""
    text = text or ""
    if len(text) > MAX_DESCRIPTION or any(not c.isprintable() for c in text):
        raise UsageError(f"--description must be one line of at most {MAX_DESCRIPTION} printable characters")
    return text


def _one_line(text: str) -> str:
    """A description made before create checked it, escaped so that it stays on its row."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def cmd_create(args: argparse.Namespace) -> int:
    description = _description(args.description)
    image = Path(args.volume)
    if image.is_block_device() or str(image).startswith("/dev/"):
        image = _image_of_loop(str(image))
    start = time.monotonic()
    with open_key_service(args) as ks:
        sid = snapshots.create(image, ks, description, state_dir(args))
    took = time.monotonic() - start
    report(args, {"SnapshotId": sid, "Volume": str(image.absolute()), "Seconds": round(took, 3)},
           f"{sid} created from {image} in {took:.2f} s")
    return 0


def _image_of_loop(device: str) -> Path:
    from encfs.block.attach import attachments

    real = os.path.realpath(device)
    for a in attachments():
        if os.path.realpath(a.loop) == real and a.daemon_alive():
            return Path(a.image)
    raise VolumeError(f"{device} is not an attached encfs volume")


def cmd_list(args: argparse.Namespace) -> int:
    home = state_dir(args)
    if args.volume:
        images = [_image_of_loop(args.volume) if args.volume.startswith("/dev/") else Path(args.volume)]
    else:
        images = sorted({Path(e["image"]) for e in snapshots.catalog(home).values() if not e.get("deleted")})
    rows: list[dict[str, Any]] = []
    problems = []
    with open_key_service(args) as ks:
        for image in images:
            try:
                rows += snapshots.list_snapshots(image, ks, home)
            except VolumeError as e:
                if args.volume:
                    raise
                problems.append(e.message)
    if args.json:
        print_json({"Snapshots": [_row(r) for r in rows]})
    else:
        print(f"{'SNAPSHOT':22} {'CREATED (UTC)':20} {'SIZE':>10} {'EXCLUSIVE':>10} {'SHARED':>10}  VOLUME / DESCRIPTION")
        for r in rows:
            x = _row(r)
            print(f"{x['SnapshotId']:22} {x['StartTime'][:19].replace('T', ' '):20} {_size(r['size']):>10} "
                  f"{_size(r['exclusive']):>10} {_size(r['shared']):>10}  {r['volume']}"
                  + (f"  {_one_line(r['description'])}" if r["description"] else ""))
    for p in problems:
        print(f"encfs: warning: {p}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    home = state_dir(args)
    image, sid = snapshots.resolve(args.snapshot, home)
    with open_key_service(args) as ks:
        rows = snapshots.list_snapshots(image, ks, home)
    row = next((r for r in rows if r["id"] == sid), None)
    if row is None:
        raise VolumeError(f"{image} has no snapshot {sid}")
    print_record(_row(row), args.json, width=16)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    home = state_dir(args)
    image, sid = snapshots.resolve(args.snapshot, home)
    with open_key_service(args) as ks:
        snapshots.delete(image, sid, ks, home)
    report(args, {"SnapshotId": sid, "Volume": str(image.absolute()), "Deleted": True}, f"{sid} deleted")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    home = state_dir(args)
    # A loop device is an attached volume: its image, so that the refusal says "detach it first".
    volume = str(_image_of_loop(args.volume)) if args.volume.startswith("/dev/") else args.volume
    image, sid = snapshots.resolve(args.snapshot if "@" in args.snapshot else f"{volume}@{args.snapshot}", home)
    if os.path.realpath(image) != os.path.realpath(volume):
        raise VolumeError(f"{sid} is a snapshot of {image}, not of {args.volume}")
    with open_key_service(args) as ks:
        snapshots.rollback(image, sid, ks)
    report(args, {"SnapshotId": sid, "Volume": str(Path(image).absolute())}, f"{image} rolled back to {sid}")
    return 0


def _build(target: Path, size: int, ks: KeyService, key: str, what: str, fill: Callable[[OpenVolume], int]) -> float:
    """Make a new volume at ``target`` under ``key`` and ``fill`` it: built as ``target.<what>.tmp``
    and renamed into place once complete and synced, so a killed run leaves no half volume. The
    run owns its temporary by an exclusive flock from the moment it has one (_claim) until the
    rename, which never replaces a file: a second run to the same target is refused (VolumeBusy),
    and a temporary left by a killed run (whose lock died with it) is taken over."""
    if target.exists():
        raise VolumeError(f"{target} already exists")
    start = time.monotonic()
    tmp = tmp_path(target, what)
    fd = _claim(tmp, target)
    try:
        try:
            format_volume(fd, tmp, size, ks, key)
            vol = open_volume(tmp, ks, locked_fd=os.dup(fd))  # the same open file: the lock stays this run's
            try:
                fill(vol)
                vol.flush()
            finally:
                vol.close()
            _rename_new(tmp, target)
            fsync_dir(str(target.absolute().parent))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise VolumeError(f"cannot make {target}: {e.strerror}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)  # still this run's: locked
            raise
    finally:
        os.close(fd)
    return time.monotonic() - start


def _claim(tmp: Path, target: Path) -> int:
    """An fd of ``tmp`` under this run's exclusive flock, the file empty and still named ``tmp``.
    It is created (O_EXCL) or, left by a run that died (no one holds its lock), taken over; a
    live run's is refused. Whoever locks a file first owns it: one created a moment ago by
    another run may be taken over before its creator locks it, and the creator then refuses."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            fd = os.open(tmp, flags)
        except FileNotFoundError:  # its run just finished or failed: let this one start over
            raise VolumeBusy(f"{target} is being made by another encfs run: try again") from None
        except OSError as e:
            raise VolumeError(f"cannot make {target}: {tmp}: {e.strerror}") from None
    except OSError as e:
        raise VolumeError(f"cannot make {target}: {tmp}: {e.strerror}") from None
    try:
        st = lock_still_named(fd, tmp, follow_symlinks=False)  # still the file named tmp (not made anew)
        if st is None or not stat_m.S_ISREG(st.st_mode):
            raise BlockingIOError
        if st.st_nlink == 1:
            os.ftruncate(fd, 0)  # a killed run's half volume: this run's to make again
            return fd
        os.unlink(tmp)  # also a finished volume's name (a killed fallback rename): drop this one
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise VolumeBusy(f"{target} is being made by another encfs run ({tmp.name} is in use)") from None
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return _claim(tmp, target)


def _rename_new(tmp: Path, target: Path) -> None:
    """``tmp`` to ``target`` unless ``target`` exists (a run to it by another command, or a file
    made meanwhile): VolumeError then, and ``tmp`` stays for the caller to remove."""
    try:
        renameat2(tmp, target, RENAME_NOREPLACE)
    except FileExistsError:
        raise VolumeError(f"{target} already exists (made while this run built it)") from None
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        try:  # no RENAME_NOREPLACE on this filesystem: a link fails as well if target exists
            os.link(tmp, target)
        except FileExistsError:
            raise VolumeError(f"{target} already exists (made while this run built it)") from None
        os.unlink(tmp)


def _copier(src: snapshots.SnapshotSource, what: str) -> Callable[[OpenVolume], int]:
    def fill(vol: OpenVolume) -> int:
        runs = list(src.written_runs())
        return copy_sectors(src.read_sectors, runs, vol, sum(n for _f, n in runs) * 4096, f"{what} {src.snapshot_id}",
                            lambda s: f"{src.snapshot_id}: sector {s} fails authentication; nothing was made")
    return fill


def cmd_restore(args: argparse.Namespace) -> int:
    image, sid = snapshots.resolve(args.snapshot, state_dir(args))
    with open_key_service(args) as ks:
        src = snapshots.open_source(image, sid, ks)
        try:
            took = _build(Path(args.new_volume), src.size, ks, args.key or src.key_id, "restore", _copier(src, "restore"))
            written = src.written_bytes()
        finally:
            src.close()
    report(args, {"SnapshotId": sid, "Volume": str(Path(args.new_volume).absolute()), "SourceVolume": str(image.absolute()),
                  "WrittenBytes": written, "Seconds": round(took, 3), "RecoveryKey": False},
           f"{args.new_volume}: restored from {sid} ({_size(written)} in {took:.1f} s)"
           + _no_recovery(image, args.new_volume))
    return 0


def _no_recovery(image: Path, new: object) -> str:
    """A note if ``image`` has a recovery key: a new volume (restore, copy) has a fresh volume key,
    which that recovery key does not open."""
    from encfs.block.volume import read_volume_header

    if not read_volume_header(image)[0].has_recovery_key:
        return ""
    return (f"; {image}'s recovery key does not open it (a fresh volume key): "
            f"`encfs recovery-key add {new}` gives it one")


def cmd_copy(args: argparse.Namespace) -> int:
    home = state_dir(args)
    image, sid = snapshots.resolve(args.snapshot, home)
    # Default: beside the source image, named after the snapshot (EBS's copy-snapshot takes no name).
    target = Path(args.new_volume) if args.new_volume else image.with_name(f"{image.stem}-{sid}-copy{image.suffix}")
    made: list[str] = []
    with open_key_service(args) as ks:
        src = snapshots.open_source(image, sid, ks)
        copy = _copier(src, "copy")

        def fill(vol: OpenVolume) -> int:
            n = copy(vol)
            made.append(snapshots.cow_store(vol).snapshot(snapshots.new_snapshot_id(), src.description,
                                                           src.created).id)
            return n
        try:
            took = _build(target, src.size, ks, args.key, "copy", fill)
            written = src.written_bytes()
        finally:
            src.close()
    snapshots.remember(home, target, snapshots.volume_id_of(target), made)
    report(args, {"SnapshotId": made[0], "Volume": str(target.absolute()), "SourceSnapshotId": sid,
                  "SourceVolume": str(image.absolute()), "KeyId": args.key, "WrittenBytes": written,
                  "Seconds": round(took, 3), "RecoveryKey": False},
           f"{made[0]} in {target}: a copy of {sid} under key {args.key} ({_size(written)} in {took:.1f} s)"
           + _no_recovery(image, target))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from encfs.block.export import export_snapshot

    image, sid = snapshots.resolve(args.snapshot, state_dir(args))
    with open_key_service(args) as ks:
        src = snapshots.open_source(image, sid, ks)
        try:
            stats = export_snapshot(src, Path(args.directory), ks)
        finally:
            src.close()
    n = stats.objects_written
    report(args, {"SnapshotId": sid, "Volume": str(image.absolute()), "Directory": str(Path(args.directory).absolute()),
                  "ObjectsWritten": n, "ObjectsReused": stats.objects_reused, "WrittenBytes": stats.bytes_written,
                  "Seconds": round(stats.seconds, 3)},
           f"{sid} exported to {args.directory}: {n} object{'' if n == 1 else 's'} written, "
           f"{stats.objects_reused} already there ({_size(stats.bytes_written)} in {stats.seconds:.1f} s)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from encfs.block.export import import_snapshot, read_manifest

    target, directory = Path(args.new_volume), Path(args.directory)
    with open_key_service(args) as ks:
        manifest = read_manifest(directory, ks, args.snapshot)
        key = args.key or _export_cmk(directory)

        def fill(vol: OpenVolume) -> int:
            import_snapshot(directory, ks, manifest, snapshots.VolumeTarget(vol))
            return 0
        took = _build(target, manifest.size, ks, key, "import", fill)
    report(args, {"SnapshotId": manifest.snapshot_id, "Volume": str(target.absolute()),
                  "Directory": str(directory.absolute()), "KeyId": key, "Seconds": round(took, 3)},
           f"{target}: imported {manifest.snapshot_id} from {directory} in {took:.1f} s")
    return 0


def _export_cmk(directory: Path) -> str:
    """The CMK that wraps an export directory's key (read_manifest() has checked the file)."""
    from encfs.block.exportformat import KeyFile
    from encfs.keys.blob import CiphertextBlob

    kf = KeyFile.parse((directory / "key").read_bytes(), str(directory / "key"))
    return str(CiphertextBlob.parse(kf.wrapped_key).header.key_id)


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    snap = sub.add_parser("snapshot", help="volume snapshots: instant, incremental, encrypted").add_subparsers(
        dest="snapshot_command", required=True, metavar="COMMAND")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = snap.add_parser(name, help=help, description=help)
        add_hsm_options(p)
        p.set_defaults(func=func)
        return p

    ref = "VOL@snap-ID, or a snapshot id seen on this machine"
    p = cmd("create", cmd_create, "snapshot VOL (an image, or its /dev/loopN while attached): point in time, "
                                  "crash-consistent, copies no data")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--json", action="store_true")
    p = cmd("list", cmd_list, "snapshots of VOL (default: of every volume this machine has seen)")
    p.add_argument("volume", metavar="VOL", nargs="?")
    p.add_argument("--json", action="store_true")
    p = cmd("info", cmd_info, "one snapshot, with its exclusive and shared size")
    p.add_argument("snapshot", metavar="SNAP", help=ref)
    p.add_argument("--json", action="store_true")
    p = cmd("delete", cmd_delete, "delete a snapshot; frees what nothing else uses")
    p.add_argument("snapshot", metavar="SNAP", help=ref)
    p = cmd("restore", cmd_restore, "make a new, independent volume NEWIMG from a snapshot")
    p.add_argument("snapshot", metavar="SNAP", help=ref)
    p.add_argument("new_volume", metavar="NEWIMG")
    p.add_argument("--key", metavar="KEY", help="CMK for NEWIMG's volume key (default: the snapshot's)")
    p = cmd("rollback", cmd_rollback, "make a detached volume's contents a snapshot's again")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("snapshot", metavar="SNAP", help="snap-ID of VOL")
    p = cmd("copy", cmd_copy, "copy a snapshot into a new volume NEWIMG under another CMK, with a fresh volume "
                              "key (NEWIMG holds the copy as its snapshot and as its contents)")
    p.add_argument("snapshot", metavar="SNAP", help=ref)
    p.add_argument("new_volume", metavar="NEWIMG", nargs="?",
                   help="default: VOL-SNAP-copy.img beside the snapshot's volume")
    p.add_argument("--key", required=True, metavar="KEY", help="CMK (id or alias) for the copy")
    p = cmd("export", cmd_export, "write a snapshot to DIR as encrypted, content-named objects (incremental)")
    p.add_argument("snapshot", metavar="SNAP", help=ref)
    p.add_argument("directory", metavar="DIR")
    p = cmd("import", cmd_import, "make a new volume NEWIMG from an exported snapshot in DIR")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("new_volume", metavar="NEWIMG")
    p.add_argument("--snapshot", metavar="ID", help="which snapshot in DIR (default: the newest)")
    p.add_argument("--key", metavar="KEY", help="CMK for NEWIMG's volume key (default: the export's)")
