"""``encfs fsck DIR`` for a snapshot export directory (export.py, exportformat.py): the key file,
every manifest, and every object a manifest names, each verified as an import verifies it.

Findings: a key file that does not unwrap (nothing else can be checked), a manifest that fails
authentication (its snapshot cannot be imported), and an object that is missing or fails (reported
for each snapshot and chunk that names it, as the sectors it holds): errors, none repairable from
the directory alone (an object is reused by a later export whenever its size is right, so a fresh
export of the snapshot does not mend one either). Objects no manifest names (what a killed
export leaves, or a manifest removed by hand) and files in DIR/tmp are warnings: ``--repair``
removes them, as the next export removes DIR/tmp's, unless a manifest failed (its objects would
look unnamed).

Invariants:
- The directory is locked as an export locks it (flock): shared to check, exclusive to repair, so
  neither runs beside an export into it; without ``repair`` nothing is written.
- Each object is read and opened once, whatever number of chunks and snapshots name it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from encfs.block.export import unwrap_key
from encfs.block.exportformat import (
    CHUNK_SECTORS,
    EXPORT_FORMAT,
    MANIFESTS,
    OBJECTS,
    TMP,
    ExportBusy,
    ExportDamaged,
    ExportError,
    ExportKeys,
    Manifest,
    check_snapshot_id,
)
from encfs.fsckreport import WARNING, Finding, Report
from encfs.keys.service import KeyService
from encfs.progress import progress


def check_export(directory: Path, ks: KeyService, repair: bool = False) -> Report:
    start = time.monotonic()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if repair else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportBusy(f"{directory} is in use by an encfs export") from None
        report = Report(str(directory), "export", EXPORT_FORMAT, repair=repair)
        _check(directory, ks, report, repair)
    finally:
        os.close(fd)
    report.seconds = time.monotonic() - start
    return report


def _check(directory: Path, ks: KeyService, report: Report, repair: bool) -> None:
    try:
        keys = unwrap_key(directory, ks)
    except ExportDamaged as e:
        report.add(Finding("key", f"{e.message}: nothing else can be checked (not repairable)"))
        return
    mdir = directory / MANIFESTS
    manifests: list[Manifest] = []
    failed = False
    for sid in sorted(_names(mdir)):
        try:
            manifests.append(keys.open_manifest(check_snapshot_id(sid), (mdir / sid).read_bytes()))
        except ExportError as e:  # ExportDamaged, a newer format, or a file named like no snapshot
            failed = True
            report.add(Finding("manifest", f"{e.message} (its snapshot cannot be imported; not repairable)",
                               snapshot=sid, place=sid))
    named: dict[str, tuple[int, list[tuple[str, int]]]] = {}  # object -> (length, [(snapshot, chunk)])
    for m in manifests:
        for index, name in enumerate(m.chunks):
            if name is not None:
                named.setdefault(name, (m.chunk_length(index), []))[1].append((m.snapshot_id, index))
    total = sum(length for length, _where in named.values())
    with progress(total, f"fsck {directory.name}") as bar:
        for name, (length, where) in sorted(named.items()):
            problem = _object_problem(directory, keys, name, length)
            bar.update(length)
            for sid, index in where if problem else ():
                first = index * CHUNK_SECTORS
                n = length // 4096
                report.add(Finding("object", f"snapshot {sid}: chunk {index} (sectors {first}-{first + n - 1}): "
                                             f"object {name} {problem} (not repairable)",
                                   snapshot=sid, sector=first, count=n, place=name))
    report.counts.update(snapshots=len(manifests), objects=len(named), bytes_checked=total,
                         sectors_checked=total // 4096)
    _strays(directory, set(named), report, repair, allowed=not failed)


def _names(d: Path) -> list[str]:
    try:
        return [n for n in os.listdir(d) if not n.startswith(".")]
    except FileNotFoundError:
        return []


def _object_problem(directory: Path, keys: ExportKeys, name: str, length: int) -> str | None:
    """Why object ``name`` cannot be imported, or None."""
    try:
        sealed = (directory / OBJECTS / name[:2] / name).read_bytes()
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    try:
        keys.open_object(name, sealed, length, "it")
    except ExportDamaged as e:
        return e.message.removeprefix("it ")
    return None


def _strays(directory: Path, named: set[str], report: Report, repair: bool, allowed: bool) -> None:
    """Objects no manifest names and files left in DIR/tmp: warnings, removed by ``repair`` (objects
    only if ``allowed``: no manifest failed)."""
    objects = directory / OBJECTS
    unnamed = [objects / sub / n for sub in sorted(_names(objects)) if (objects / sub).is_dir()
               for n in _names(objects / sub) if n not in named or sub != n[:2]]
    tmp = [directory / TMP / n for n in _names(directory / TMP)]
    for kind, paths, what in (("unnamed-objects", unnamed, "objects that no manifest names (a killed export?)"),
                              ("tmp-files", tmp, f"files in {TMP}/ left by an interrupted export")):
        if not paths:
            continue
        size = sum(p.stat().st_size for p in paths)
        ok = allowed or kind == "tmp-files"
        hint = "--repair removes them" if ok else "kept while a manifest fails (they may be its objects)"
        report.add(Finding(kind, f"{len(paths)} {what} hold {size >> 10} KiB: {hint}", WARNING,
                           repairable=ok, place=kind))
        if repair and ok:
            for p in paths:
                p.unlink()
            report.findings[-1].repaired = True
