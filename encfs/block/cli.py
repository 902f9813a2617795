"""``encfs volume create|attach|detach|list|info|rekey|upgrade|resize`` (a volume's recovery key:
encfs.recoverycli).

Recovery keys (recovery.py) follow ``encfs hsm backup``: ``--new-recovery-key FILE`` makes a new
key in a new file (never replacing one), ``--recovery-key FILE`` reads an existing one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.block import budget
from encfs.block.attach import (
    attach,
    attachments,
    detach,
    find_attachment,
    grow_attached,
    live_attachment,
    refuse_attached,
)
from encfs.block.layout import image_size
from encfs.block.volume import (
    VolumeBusy,
    VolumeError,
    check_space,
    create_volume,
    grow_volume,
    parse_size,
    read_volume_header,
)
from encfs.cliargs import home_of, hsm_options, open_key_service, state_dir
from encfs.errors import UsageError
from encfs.output import print_json, print_record, report, wants_json
from encfs.recoverycli import add_key_options as add_recovery_key_options


def _ks(args: argparse.Namespace) -> tuple[Any, Any]:
    return home_of(args), hsm_options(args)


def _with_recovery_key(args: argparse.Namespace, make: Callable[[bytes | None], Any]) -> tuple[Any, str]:
    """``make(recovery key)`` with the key --recovery-key names, or a new one in the file
    --new-recovery-key names (made first, removed again if ``make`` fails); and a note for the user."""
    from encfs.recoverykey import new_recovery_key, read_recovery_key

    if getattr(args, "recovery_key", None):
        return make(read_recovery_key(args.recovery_key)), f"; recovery key {args.recovery_key} opens it too"
    if not getattr(args, "new_recovery_key", None):
        return make(None), ""
    rk = new_recovery_key(args.new_recovery_key)
    try:
        done = make(rk)
    except BaseException:
        os.unlink(args.new_recovery_key)
        raise
    return done, (f"; new recovery key in {args.new_recovery_key} (it opens the volume without the HSM: "
                  "keep it apart from the image)")


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if args.format != 2 and (args.recovery_key or args.new_recovery_key):
        raise UsageError("a recovery key needs format 2 (the default)")
    if not args.sparse and args.format == 2:
        check_space(Path(args.volume), size)
    with open_key_service(args) as ks:
        header, note = _with_recovery_key(args, lambda rk: create_volume(Path(args.volume), size, ks, args.key,
                                                                          version=args.format, recovery_key=rk))
    report(args, {"Image": str(Path(args.volume).absolute()), "VolumeId": header.volume_id.hex(), "Size": size,
                  "KeyId": header.key_id, "Format": args.format, "RecoveryKey": header.has_recovery_key},
           f"volume {header.volume_id.hex()} created in {args.volume}: {size} bytes under key {header.key_id}"
           + note)
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    home, hsm = _ks(args)
    rk = None
    if args.recovery_key:
        from encfs.recoverykey import read_recovery_key

        if args.key:
            raise UsageError("--key names the CMK, which --recovery-key does not use: give one of them")
        rk = read_recovery_key(args.recovery_key)
    a = attach(Path(args.volume), home, hsm, args.log_file, accept_rollback=args.accept_rollback,
               expected_key=args.key, name=args.name or "", read_only=args.read_only, recovery_key=rk)
    report(args, {"Image": str(Path(args.volume).absolute()), "Device": a.loop, "Name": args.name or None,
                  "ReadOnly": args.read_only, "RecoveryKey": rk is not None}, a.loop)
    return 0


def cmd_attach_all(args: argparse.Namespace) -> int:
    """Attach every ``auto`` volume of the table that is not attached yet; go on past a failure,
    then fail naming how many did."""
    from encfs.block import voltab
    from encfs.errors import EncfsError

    home, hsm = _ks(args)
    table = Path(args.table) if args.table else voltab.VOLTAB
    failed = []
    rows: list[dict[str, Any]] = []  # --json: {"Volumes": rows}
    for v in voltab.read(table):
        if not v.auto:
            continue
        live = next((a for a in attachments() if a.name == v.name and a.daemon_alive()), None)
        if live is not None:
            rows.append({"Name": v.name, "Image": str(v.image), "Device": live.loop, "State": "already-attached"})
            _say(args, f"{v.name}: already attached at {live.loop}")
            continue
        try:
            a = attach(v.image, home, hsm, v.log_file, expected_key=v.key, name=v.name, read_only=v.read_only)
        except EncfsError as e:
            rows.append({"Name": v.name, "Image": str(v.image), "Device": None, "State": "failed", "Error": e.message})
            _say(args, f"{v.name}: not attached: {e.message}")
            failed.append(v.name)
            continue
        rows.append({"Name": v.name, "Image": str(v.image), "Device": a.loop, "State": "attached"})
        _say(args, f"{v.name}: {a.loop}")
    if wants_json(args):  # printed before a failure's exit code: the object says which volumes failed
        print_json({"Volumes": rows})
    if failed:
        raise VolumeError(f"{len(failed)} volume(s) of {table} not attached: {', '.join(failed)}")
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    """One line of a command's progress: stdout without --json (where it always went)."""
    if not wants_json(args):
        print(line, flush=True)


def cmd_detach(args: argparse.Namespace) -> int:
    a = detach(args.target)
    report(args, {"Image": a.image, "Device": a.loop, "Name": a.name or None, "Detached": True},
           f"detached {a.image} from {a.loop}")
    return 0


def _info(path: Path, ks: Any = None, key: str | None = None, recovery_key: bytes | None = None) -> dict[str, Any]:
    """Without ``ks`` (or ``recovery_key``) the header is read without a key: nothing in it is authenticated."""
    header, warnings = read_volume_header(path, ks, key, recovery_key)
    a = find_attachment(header.volume_id.hex())
    st = os.stat(path)
    seals = header.seals_reserved if header.authenticated else None
    warn, refuse = ((budget.COUNTER_WARN, budget.COUNTER_REFUSE) if header.copy_on_write
                    else (budget.SEAL_WARN, budget.SEAL_REFUSE))
    if seals is not None and seals >= warn:
        warnings.append(f"the volume key has made up to {seals} seals, past {warn}; writes stop at {refuse}: "
                        "`encfs volume rekey` gives it a fresh key")
    nominal = st.st_size if header.copy_on_write else image_size(header.sectors)
    return {"image": str(path.absolute()), "volume_id": header.volume_id.hex(), "format": header.version,
            "size": header.size, "sector_size": header.sector_size, "key_id": header.key_id,
            "header_seq": header.seq, "maps_mirrored": header.maps_mirrored or header.copy_on_write,
            "header_mac": header.authenticated, "header_verified": ks is not None or recovery_key is not None,
            "recovery_key": header.has_recovery_key, "one_sync_commits": header.one_sync_commits,
            "seals_reserved": seals,
            "image_nominal_bytes": nominal, "image_allocated_bytes": st.st_blocks * 512,
            "attached": a.loop if a and a.daemon_alive() else None, "warnings": warnings}


def cmd_info(args: argparse.Namespace) -> int:
    if args.recovery_key:  # checks the file opens the volume, as `cryptsetup open --test-passphrase`
        from encfs.recoverykey import read_recovery_key

        if args.key:
            raise UsageError("--key names the CMK, which --recovery-key does not use: give one of them")
        info = _info(Path(args.volume), recovery_key=read_recovery_key(args.recovery_key))
    elif args.key is None:
        info = _info(Path(args.volume))
    else:
        with open_key_service(args) as ks:
            info = _info(Path(args.volume), ks, args.key)
    print_record(info, args.json, width=22)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [{"volume_id": a.volume_id, "image": a.image, "loop": a.loop, "pid": a.pid, "name": a.name,
             "read_only": a.read_only, "state": "attached" if a.daemon_alive() else "dead"}
            for a in attachments()]
    if args.json:
        print_json({"Volumes": rows})  # PascalCase: VolumeId, Image, Device (AWS: Device), Pid...
        return 0
    print(f"{'LOOP':12} {'STATE':9} {'VOLUME ID':32} IMAGE")
    for r in rows:
        print(f"{r['loop']:12} {r['state']:9} {r['volume_id']:32} {r['image']}")
    if any(r["state"] == "dead" for r in rows):
        print("dead: the volume daemon is gone; `encfs volume detach` cleans up, `attach` re-attaches")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    path = Path(args.volume)
    header, _w = read_volume_header(path)
    size = parse_size(args.size, current=header.size)
    if header.copy_on_write and not args.sparse:
        check_space(path, size, "grow")
    a = live_attachment(header.volume_id.hex())
    if a is not None and a.read_only:
        raise VolumeBusy(f"{path} is attached read-only at {a.loop}: detach it to resize it")
    if a is not None:
        if args.key is not None:  # the daemon verified the header it serves; pin the key it names
            with open_key_service(args) as ks:
                read_volume_header(path, ks, args.key)
        grow_attached(a, size)
        report(args, {"Image": str(path.absolute()), "Size": size, "Device": a.loop, "Online": True},
               f"{path}: {size} bytes (online; {a.loop} resized)")
        return 0
    with open_key_service(args) as ks:
        new = grow_volume(path, size, ks, expected_key=args.key)
    report(args, {"Image": str(path.absolute()), "Size": new.size, "Device": None, "Online": False},
           f"{path}: {new.size} bytes")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from encfs.block.rekey import rekey_volume

    path = Path(args.volume)
    header, _w = read_volume_header(path)
    refuse_attached(path, header.volume_id.hex())
    rk = _recovery_for_rekey(args)
    with open_key_service(args) as ks:
        done = rekey_volume(path, ks, args.key, expected_key=args.expect_key, recovery_key=rk)
    if done.snapshots:  # the catalog names each snapshot's volume id: the copy's is new
        from encfs.block.snapshots import remember

        remember(state_dir(args), path, done.volume_id, done.snapshots)
    mib = done.sectors * 4096 / (1 << 20)
    report(args, _copied(path, done), f"{path}: re-keyed as volume {done.volume_id} under key {done.key_id} "
           f"({mib:.1f} MiB of written sectors copied in {done.seconds:.1f} s)")
    return 0


def _recovery_for_rekey(args: argparse.Namespace) -> bytes | None:
    from encfs.recoverykey import read_recovery_key

    if not args.recovery_key:
        return None
    if getattr(args, "expect_key", None):
        raise UsageError("--expect-key names the CMK, which --recovery-key does not use: give one of them")
    return read_recovery_key(args.recovery_key)


def cmd_add_recovery_key(args: argparse.Namespace) -> int:
    from encfs.block.recovery import set_recovery_key

    path = Path(args.volume)
    header, _w = read_volume_header(path)
    if header.has_recovery_key:
        raise UsageError(f"{path} already has a recovery key: remove it first "
                         f"(`encfs recovery-key remove {path}`)")
    if not header.copy_on_write:
        raise UsageError(f"{path} has format 1, which cannot have a recovery key: `encfs volume upgrade {path}` "
                         "first")
    refuse_attached(path, header.volume_id.hex())
    with open_key_service(args) as ks:
        new, note = _with_recovery_key(args, lambda rk: set_recovery_key(path, rk, ks=ks))
    report(args, {"Image": str(path.absolute()), "VolumeId": new.volume_id.hex(), "RecoveryKey": True,
                  "RecoveryKeyFile": str(Path(args.new_recovery_key or args.recovery_key).absolute()),
                  "Changed": True},
           f"{path}: recovery key added{note}")
    return 0


def cmd_remove_recovery_key(args: argparse.Namespace) -> int:
    from encfs.block.recovery import set_recovery_key
    from encfs.recoverykey import read_recovery_key

    path = Path(args.volume)
    header, _w = read_volume_header(path)
    result = {"Image": str(path.absolute()), "VolumeId": header.volume_id.hex(), "RecoveryKey": False}
    if not header.has_recovery_key:
        report(args, {**result, "Changed": False}, f"{path} has no recovery key: nothing to do")
        return 0
    refuse_attached(path, header.volume_id.hex())
    if args.recovery_key:  # opened with the recovery key itself: no token
        set_recovery_key(path, None, opened_with=read_recovery_key(args.recovery_key))
    else:
        with open_key_service(args) as ks:
            set_recovery_key(path, None, ks=ks)
    report(args, {**result, "Changed": True},
           f"{path}: recovery key removed (copies of the image made before keep theirs: they open with it)")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from encfs.block.header import COW_FORMAT
    from encfs.block.rekey import rekey_volume

    path = Path(args.volume)
    header, _w = read_volume_header(path)
    if header.copy_on_write:
        report(args, {"Image": str(path.absolute()), "Format": COW_FORMAT, "Changed": False,
                      "VolumeId": header.volume_id.hex(), "KeyId": header.key_id},
               f"{path} already has format {COW_FORMAT}")
        return 0
    refuse_attached(path, header.volume_id.hex())
    with open_key_service(args) as ks:
        done = rekey_volume(path, ks, expected_key=args.key, version=COW_FORMAT)
    report(args, {**_copied(path, done), "Format": COW_FORMAT, "Changed": True},
           f"{path}: upgraded to format {COW_FORMAT} as volume {done.volume_id} under key {done.key_id} "
           f"({done.sectors * 4096 / (1 << 20):.1f} MiB of written sectors copied in {done.seconds:.1f} s)")
    return 0


def _copied(path: Path, done: Any) -> dict[str, Any]:
    """What `volume rekey` and `upgrade` made (encfs.block.rekey's result)."""
    return {"Image": str(path.absolute()), "VolumeId": done.volume_id, "KeyId": done.key_id,
            "CopiedBytes": done.sectors * 4096, "Snapshots": list(done.snapshots), "Seconds": round(done.seconds, 3)}


def _expected_key(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--key", metavar="KEY", help="refuse unless the volume key is wrapped by this CMK (id or alias)"
                   + more)


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    vol = sub.add_parser("volume", help="encrypted block volumes (attached as /dev/loopN)").add_subparsers(
        dest="volume_command", required=True, metavar="COMMAND")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str, hsm: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = vol.add_parser(name, help=help, description=help)
        if hsm:
            add_hsm_options(p)
        p.set_defaults(func=func)
        return p

    p = cmd("create", cmd_create, "create an encrypted volume image VOL")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--size", required=True, help="e.g. 512M, 10G (= 10GiB), 10GB (decimal, rounded up to 4 KiB)")
    p.add_argument("--key", required=True, metavar="KEY", help="CMK (id or alias) that wraps the volume key")
    p.add_argument("--format", type=int, choices=(1, 2), default=2,
                   help="2 (default): copy-on-write, with snapshots; 1: the older format, for encfs before 0.2")
    p.add_argument("--sparse", action="store_true",
                   help="create it even if the disk cannot hold it once full (writes then fail with ENOSPC)")
    add_recovery_key_options(p, required=False)
    p = cmd("attach", cmd_attach, "attach VOL as a plaintext loop device; prints /dev/loopN")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: none)")
    p.add_argument("--name", metavar="NAME", help="also link /dev/encfs/NAME to the loop device (A-Z a-z 0-9 . _ -)")
    p.add_argument("--read-only", "--ro", action="store_true",
                   help="open the image read-only (read-only media) and attach a read-only loop device")
    p.add_argument("--accept-rollback", action="store_true",
                   help="attach a volume made by an older encfs even where a damaged sector map slot leaves "
                        "only the other, possibly older map (those sectors may roll back to it; logged)")
    _expected_key(p)
    p.add_argument("--recovery-key", metavar="FILE",
                   help="open VOL with its recovery key file instead of the HSM (no token, no PIN)")
    p = cmd("attach-all", cmd_attach_all, "attach every volume of /etc/encfs/volumes (NAME IMAGE [ro,key=KEY,"
                                          "log-file=FILE,noauto]) not attached yet; at boot")
    p.add_argument("--table", metavar="FILE", help="the volume table (default /etc/encfs/volumes)")
    p = cmd("detach", cmd_detach, "detach VOL, /dev/loopN or NAME (flushes everything first; fails if that flush "
                                  "fails)",
            hsm=False)
    p.add_argument("target", metavar="VOL|/dev/loopN|NAME")
    p = cmd("list", cmd_list, "attached volumes", hsm=False)
    p.add_argument("--json", action="store_true")
    p = cmd("info", cmd_info, "a volume's header and state (authenticated only with --key)")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--json", action="store_true")
    _expected_key(p, "; with it the header is read with the key and authenticated")
    p.add_argument("--recovery-key", metavar="FILE",
                   help="authenticate the header with VOL's recovery key file instead (no token): checks the file")
    p = cmd("rekey", cmd_rekey, "copy a detached volume, snapshots and all, under a fresh volume key (its "
                                 "nonce budget starts again), in place; needs free space for the copy")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--key", metavar="KEY", help="CMK (id or alias) to wrap the new volume key (default: VOL's), "
                                                "as for create")
    p.add_argument("--expect-key", metavar="KEY", help="refuse unless VOL's key is wrapped by this CMK")
    p.add_argument("--recovery-key", metavar="FILE",
                   help="VOL's recovery key file: VOL is opened with it (its CMK is not needed) and the new "
                        "volume key is wrapped under it too (required if VOL has a recovery key)")
    p = cmd("upgrade", cmd_upgrade, "convert a detached format-1 volume to format 2 (copy-on-write, snapshots), "
                                     "by a copy under a fresh volume key; needs free space for the copy")
    p.add_argument("volume", metavar="VOL")
    _expected_key(p)
    p = cmd("resize", cmd_resize, "grow a volume to SIZE (attached or detached)")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--size", required=True, help="the new size (10G, 10GiB, 10GB) or +SIZE to add (+2G)")
    p.add_argument("--sparse", action="store_true", help="grow it even if the disk cannot hold it once full")
    _expected_key(p)
