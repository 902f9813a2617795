"""``encfs status [--json]``: every encfs mount and attached volume on this machine.

Mounts come from /proc/self/mountinfo (type fuse.encfs, source the CIPHERDIR) and the owner
record a read-write mount keeps in its CIPHERDIR (daemon pid); volumes from the attachment
registry. Key ids are read without the token (the config, the volume header: not verified);
key states come from the key service if it can be opened, else "unknown". Nothing here
stat()s a mounted filesystem, so a hung daemon does not hang `status`.

Errors since start: requests a daemon answered EIO. A volume daemon publishes its count
beside its registry entry, a read-write filesystem mount in its owner record, each at most
once a second. A read-only mount writes no record (pid and errors null, "unknown"), nor does a
daemon of an older encfs keep a count.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.errors import EncfsError
from encfs.output import print_json

UNKNOWN = "unknown"


def _mount_rows() -> list[dict[str, Any]]:
    from encfs.daemon import proc_start
    from encfs.fuse.fsconfig import peek_config
    from encfs.fuse.mountlock import owner_record
    from encfs.fuse.mounttable import encfs_mounts

    rows = []
    for m in encfs_mounts():
        cipherdir = Path(m.source)
        try:
            key_id: str | None = peek_config(cipherdir)[0].key_id
        except (EncfsError, OSError):
            key_id = None
        rec = owner_record(cipherdir)
        pid = alive = errors = None
        # Only a read-write mount writes a record; it is this mount's if it names this mountpoint.
        if rec is not None and rec.get("state") == "mounted" and rec.get("mountpoint") == m.mountpoint \
                and isinstance(rec.get("pid"), int):
            pid = rec["pid"]
            start = proc_start(pid)
            alive = start is not None and start == rec.get("pid_start")
            errors = rec.get("errors") if isinstance(rec.get("errors"), int) else None
        rows.append({"Type": "filesystem", "Source": m.source, "Target": m.mountpoint, "Name": None,
                     "ReadOnly": m.read_only, "KeyId": key_id, "KeyState": UNKNOWN, "Pid": pid,
                     "DaemonAlive": alive, "Errors": errors})
    return rows


def _volume_rows() -> list[dict[str, Any]]:
    from encfs.block.attach import attachments
    from encfs.block.volume import read_volume_header

    rows = []
    for a in attachments():
        try:
            key_id: str | None = read_volume_header(Path(a.image))[0].key_id
        except (EncfsError, OSError):
            key_id = None
        rows.append({"Type": "volume", "Source": a.image, "Target": a.loop, "Name": a.name or None,
                     "ReadOnly": a.read_only, "KeyId": key_id, "KeyState": UNKNOWN, "Pid": a.pid,
                     "DaemonAlive": a.daemon_alive(), "Errors": a.errors()})
    return rows


def _key_states(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Fill in KeyState from the key service; "unknown" where it cannot say."""
    from encfs.cliargs import open_key_service

    ids = sorted({r["KeyId"] for r in rows if r["KeyId"]})
    if not ids:
        return
    try:
        with open_key_service(args) as ks:
            states = {}
            for key_id in ids:
                try:
                    states[key_id] = str(ks.describe_key(key_id)["KeyState"])
                except EncfsError:  # a key of another home or token
                    continue
    except (EncfsError, OSError):
        return
    for r in rows:
        r["KeyState"] = states.get(r["KeyId"], UNKNOWN)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def cmd_status(args: argparse.Namespace) -> int:
    mounts, volumes = _mount_rows(), _volume_rows()
    _key_states(args, mounts + volumes)
    if args.json:
        print_json({"Mounts": mounts, "Volumes": volumes})
        return 0
    rows = mounts + volumes
    if not rows:
        print("no encfs mounts or attached volumes")
        return 0
    cols = [("TYPE", "Type"), ("SOURCE", "Source"), ("TARGET", "Target"), ("NAME", "Name"), ("RO", "ReadOnly"),
            ("KEY ID", "KeyId"), ("KEY STATE", "KeyState"), ("PID", "Pid"), ("ALIVE", "DaemonAlive"),
            ("ERRORS", "Errors")]
    table = [[h for h, _ in cols]]
    table += [[UNKNOWN if k == "Errors" and r[k] is None else _cell(r[k]) for _, k in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if any(r["DaemonAlive"] is False for r in rows):
        print("ALIVE no: the daemon is gone; `encfs umount` or `encfs volume detach` cleans up")
    return 0


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("status", help="every encfs mount and attached volume on this machine: source, mountpoint "
                                      "or device, key id and state, daemon pid")
    add_hsm_options(p)
    p.add_argument("--json", action="store_true", help="PascalCase JSON: {\"Mounts\": [...], \"Volumes\": [...]}")
    p.set_defaults(func=cmd_status)
