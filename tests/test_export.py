"""Snapshot exports (encfs/block/export.py, docs/FORMAT.md §9) on the real SoftHSM2 key service,
with a dict-backed snapshot source and import target (tests/export_tool.py)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from export_tool import SECTOR, DictSource, DictTarget
from encfs.block.export import (
    ExportDamaged,
    ExportError,
    export_snapshot,
    import_snapshot,
    read_manifest,
    unwrap_key,
)
from encfs.block.exportformat import CHUNK_SIZE
from encfs.keys.service import KeyService

TOOL = Path(__file__).with_name("export_tool.py")
CHUNK_SECTORS = CHUNK_SIZE // SECTOR
VOLUME_ID = bytes.fromhex("5e1f0c0a" * 4)


def sector(rng: random.Random) -> bytes:
    return rng.randbytes(SECTOR)


@pytest.fixture
def cmk(service: KeyService) -> str:
    return str(service.create_key()["KeyId"])


def snapshot(cmk: str, seed: int = 1, snapshot_id: str = "snap-" + "1" * 32, created: float = 1.7e9,
             volume_id: bytes = VOLUME_ID) -> DictSource:
    """5.5 MiB: a full chunk, a chunk with a few sectors (one of them zeros), a chunk written only
    with zeros, an unwritten chunk, a full chunk and a short last chunk."""
    rng = random.Random(seed)
    sectors: dict[int, bytes] = {}
    sectors.update({s: sector(rng) for s in range(0, 256)})
    sectors.update({256 + 3: sector(rng), 256 + 4: bytes(SECTOR), 256 + 5: sector(rng), 256 + 200: sector(rng)})
    sectors.update({512 + s: bytes(SECTOR) for s in range(0, 256, 7)})
    sectors.update({1024 + s: sector(rng) for s in range(256)})
    sectors.update({1280 + s: sector(rng) for s in range(100, 128)})
    return DictSource(volume_id, snapshot_id, 1408 * SECTOR, sectors, cmk, "nightly", created)


def imported(directory: Path, ks: KeyService, snapshot_id: str | None = None) -> tuple[DictTarget, object]:
    manifest = read_manifest(directory, ks, snapshot_id)
    target = DictTarget(manifest.size)
    stats = import_snapshot(directory, ks, manifest, target)
    return target, stats


def objects(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "objects").rglob("*") if p.is_file())


def test_round_trip_byte_for_byte(tmp_path: Path, service: KeyService, cmk: str) -> None:
    src = snapshot(cmk)
    stats = export_snapshot(src, tmp_path / "exp", service)
    # chunks 0, 1, 4 and 5 hold data; chunk 2 only zeros and chunk 3 nothing: null
    assert (stats.objects_written, stats.objects_reused) == (4, 0)
    assert len(objects(tmp_path / "exp")) == 4
    sizes = sorted(p.stat().st_size for p in objects(tmp_path / "exp"))
    assert sizes == [128 * SECTOR + 16] + [CHUNK_SIZE + 16] * 3  # nothing but the chunk's size
    assert stats.bytes_written == sum(sizes) + (tmp_path / "exp/manifests" / src.snapshot_id).stat().st_size \
        + (tmp_path / "exp/key").stat().st_size

    manifest = read_manifest(tmp_path / "exp", service)
    assert (manifest.volume_id, manifest.snapshot_id, manifest.size) == (src.volume_id, src.snapshot_id, src.size)
    assert (manifest.description, manifest.created) == ("nightly", 1.7e9)
    assert [c is None for c in manifest.chunks] == [False, False, True, True, False, False]
    target = DictTarget(manifest.size)
    istats = import_snapshot(tmp_path / "exp", service, manifest, target)
    assert target.plaintext() == src.plaintext()
    assert target.flushes == 1 and istats.objects_read == 4
    # null chunks and zero sectors are left to read as zeros in the fresh target
    assert not any(s // CHUNK_SECTORS in (2, 3) for s in target.writes)
    assert 256 + 4 not in target.writes and 1280 + 99 not in target.writes
    assert istats.bytes_written == len(target.writes) * SECTOR == (256 + 3 + 256 + 28) * SECTOR
    # the directory reveals no plaintext
    for p in objects(tmp_path / "exp"):
        data = p.read_bytes()
        assert all(src.sectors[s][:32] not in data for s in (0, 259, 1024, 1380))


def test_a_second_export_writes_only_the_changed_chunks(tmp_path: Path, service: KeyService, cmk: str) -> None:
    exp = tmp_path / "exp"
    first = snapshot(cmk)
    export_snapshot(first, exp, service)
    rng = random.Random(7)
    changed = dict(first.sectors)
    changed[5] = sector(rng)  # chunk 0
    changed[1300] = sector(rng)  # chunk 5 (the short one)
    changed.update({768 + s: sector(rng) for s in range(3)})  # chunk 3, unwritten before
    second = DictSource(VOLUME_ID, "snap-" + "2" * 32, first.size, changed, cmk, "later", 1.8e9)
    before = set(objects(exp))
    stats = export_snapshot(second, exp, service)
    assert (stats.objects_written, stats.objects_reused) == (3, 2)
    assert len(set(objects(exp)) - before) == 3
    # the newest by creation time is the default; both import byte for byte
    assert read_manifest(exp, service).snapshot_id == second.snapshot_id
    assert imported(exp, service)[0].plaintext() == second.plaintext()
    assert imported(exp, service, first.snapshot_id)[0].plaintext() == first.plaintext()
    # exporting the same snapshot again writes no object
    again = export_snapshot(second, exp, service)
    assert (again.objects_written, again.objects_reused) == (0, 5)


def test_repeated_chunks_are_one_object(tmp_path: Path, service: KeyService, cmk: str) -> None:
    rng = random.Random(3)
    chunk = [sector(rng) for _ in range(256)]
    sectors = {c * 256 + i: chunk[i] for c in range(4) for i in range(256)}
    src = DictSource(VOLUME_ID, "snap-rep", 4 * CHUNK_SIZE, sectors, cmk)
    stats = export_snapshot(src, tmp_path / "exp", service)
    assert (stats.objects_written, stats.objects_reused) == (1, 3)
    assert len(set(read_manifest(tmp_path / "exp", service).chunks)) == 1
    assert imported(tmp_path / "exp", service)[0].plaintext() == src.plaintext()


def test_a_rerun_clears_leftovers_and_rewrites_an_object_of_the_wrong_size(tmp_path: Path, service: KeyService,
                                                                          cmk: str) -> None:
    exp = tmp_path / "exp"
    src = snapshot(cmk)
    export_snapshot(src, exp, service)
    (exp / "tmp" / ("ab" * 32 + ".999999")).write_bytes(b"half an object")  # as a killed export leaves it
    short = read_manifest(exp, service).chunks[1]
    path = exp / "objects" / short[:2] / short
    path.write_bytes(path.read_bytes()[:4096])  # a torn object (a disk that lied about fsync)
    stats = export_snapshot(src, exp, service)
    assert (stats.objects_written, stats.objects_reused) == (1, 3)
    assert os.listdir(exp / "tmp") == []
    assert imported(exp, service)[0].plaintext() == src.plaintext()


def _one_line(e: pytest.ExceptionInfo[ExportError]) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_a_tampered_object_is_refused_naming_it(tmp_path: Path, service: KeyService, cmk: str, damage: str) -> None:
    exp = tmp_path / "exp"
    src = snapshot(cmk)
    export_snapshot(src, exp, service)
    manifest = read_manifest(exp, service)
    victim = manifest.chunks[4]
    path = exp / "objects" / victim[:2] / victim
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[12345] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    else:  # another object of the same size under this one's name
        data = bytearray((exp / "objects" / manifest.chunks[0][:2] / manifest.chunks[0]).read_bytes())
    path.write_bytes(bytes(data))
    target = DictTarget(manifest.size)
    with pytest.raises(ExportDamaged) as e:
        import_snapshot(exp, service, manifest, target)
    message = _one_line(e)
    assert f"object {victim} (chunk 4, plaintext bytes {4 * CHUNK_SIZE}-{5 * CHUNK_SIZE - 1}" in message
    assert ("is damaged" if damage == "truncate" else "fails authentication") in message
    # nothing of that chunk (or after it) reached the target
    assert not any(s >= 4 * CHUNK_SECTORS for s in target.writes)
    key = unwrap_key(exp, service)._key  # the export key never shows in a message
    assert key.hex() not in message


def test_a_missing_object_is_refused_naming_it(tmp_path: Path, service: KeyService, cmk: str) -> None:
    exp = tmp_path / "exp"
    export_snapshot(snapshot(cmk), exp, service)
    manifest = read_manifest(exp, service)
    gone = manifest.chunks[1]
    (exp / "objects" / gone[:2] / gone).unlink()
    with pytest.raises(ExportDamaged) as e:
        import_snapshot(exp, service, manifest, DictTarget(manifest.size))
    assert _one_line(e) == (f"object {gone} (chunk 1, plaintext bytes {CHUNK_SIZE}-{2 * CHUNK_SIZE - 1} of snapshot "
                            f"{manifest.snapshot_id}) is missing from {exp}")


def test_a_tampered_or_renamed_manifest_is_refused(tmp_path: Path, service: KeyService, cmk: str) -> None:
    exp = tmp_path / "exp"
    src = snapshot(cmk)
    export_snapshot(src, exp, service)
    path = exp / "manifests" / src.snapshot_id
    good = path.read_bytes()
    for offset in (10, len(good) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[offset] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(ExportDamaged, match=f"manifest {src.snapshot_id} fails authentication") as e:
            read_manifest(exp, service, src.snapshot_id)
        assert _one_line(e).startswith(f"{exp}: ")
    path.write_bytes(good[:20])
    with pytest.raises(ExportDamaged, match=f"manifest {src.snapshot_id} is not an encfs export manifest"):
        read_manifest(exp, service)
    # a genuine manifest under another snapshot's name
    path.unlink()
    (exp / "manifests" / "snap-other").write_bytes(good)
    with pytest.raises(ExportDamaged, match="manifest snap-other fails authentication"):
        read_manifest(exp, service)
    with pytest.raises(ExportError, match=f"holds no export of snapshot {src.snapshot_id}"):
        read_manifest(exp, service, src.snapshot_id)


def test_the_wrong_export_key_is_refused(tmp_path: Path, service: KeyService, cmk: str) -> None:
    """The key file of another export of the same volume unwraps, but opens none of this one's manifests."""
    src = snapshot(cmk)
    export_snapshot(src, tmp_path / "a", service)
    export_snapshot(src, tmp_path / "b", service)
    manifest = read_manifest(tmp_path / "a", service)
    (tmp_path / "a/key").write_bytes((tmp_path / "b/key").read_bytes())
    with pytest.raises(ExportDamaged, match="sealed under another export key"):
        read_manifest(tmp_path / "a", service)
    with pytest.raises(ExportDamaged, match=f"object {manifest.chunks[0]} .* fails authentication"):
        import_snapshot(tmp_path / "a", service, manifest, DictTarget(manifest.size))
    # a key file edited to name another volume no longer unwraps (its context names the volume)
    doc = json.loads((tmp_path / "b/key").read_bytes())
    doc["volume_id"] = "00" * 16
    (tmp_path / "b/key").write_text(json.dumps(doc))
    with pytest.raises(ExportDamaged, match="key does not unwrap"):
        read_manifest(tmp_path / "b", service)


def test_a_directory_of_another_volume_is_refused(tmp_path: Path, service: KeyService, cmk: str) -> None:
    exp = tmp_path / "exp"
    export_snapshot(snapshot(cmk), exp, service)
    before = sorted(p.name for p in exp.rglob("*"))
    other = snapshot(cmk, volume_id=bytes(range(16)))
    with pytest.raises(ExportError) as e:
        export_snapshot(other, exp, service)
    assert _one_line(e) == (f"{exp} holds the export of volume {VOLUME_ID.hex()}, not of volume "
                            f"{bytes(range(16)).hex()}: export into another directory")
    assert sorted(p.name for p in exp.rglob("*")) == before
    # nor is one volume's manifest imported from another volume's directory
    export_snapshot(other, tmp_path / "other", service)
    with pytest.raises(ExportError, match=f"is of volume {VOLUME_ID.hex()}, but .* holds the export of volume"):
        import_snapshot(tmp_path / "other", service, read_manifest(exp, service), DictTarget(other.size))
    # nor is a directory that holds something else
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/letter.txt").write_text("hello")
    with pytest.raises(ExportError, match="is not empty and is not an encfs export directory"):
        export_snapshot(snapshot(cmk), tmp_path / "docs", service)
    assert sorted(os.listdir(tmp_path / "docs")) == ["letter.txt"]


def test_a_sector_failing_authentication_stops_the_export(tmp_path: Path, service: KeyService, cmk: str) -> None:
    src = snapshot(cmk)
    src.bad.add(1030)
    with pytest.raises(ExportError, match="a sector in 1024-1279 fails authentication") as e:
        export_snapshot(src, tmp_path / "exp", service)
    _one_line(e)
    assert os.listdir(tmp_path / "exp/manifests") == []
    with pytest.raises(ExportError, match="holds no complete snapshot export"):
        read_manifest(tmp_path / "exp", service)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True, timeout=30)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_a_full_disk_is_reported_and_a_rerun_with_space_completes(small_disk: Path, service: KeyService,
                                                                  cmk: str) -> None:
    exp, src = small_disk / "exp", snapshot(cmk)  # 3.5 MiB of objects on a 3 MiB disk
    with pytest.raises(ExportError) as e:
        export_snapshot(src, exp, service)
    assert _one_line(e) == f"cannot export {src.snapshot_id} to {exp}: No space left on device"
    assert os.listdir(exp / "manifests") == [] and os.listdir(exp / "tmp") == []
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True, timeout=30)
    stats = export_snapshot(src, exp, service)  # objects are written in parallel: how many the full disk
    assert stats.objects_reused + stats.objects_written == 4 and stats.objects_written >= 1  # took varies
    assert imported(exp, service)[0].plaintext() == src.plaintext()


def test_one_export_at_a_time(tmp_path: Path, service: KeyService, cmk: str) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    fd = os.open(exp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ExportError, match="is in use by another encfs export"):
            export_snapshot(snapshot(cmk), exp, service)
    finally:
        os.close(fd)
    export_snapshot(snapshot(cmk), exp, service)


def test_export_and_import_draw_a_progress_bar_when_asked(tmp_path: Path, service: KeyService, cmk: str,
                                                          capfd: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = snapshot(cmk)
    export_snapshot(src, tmp_path / "quiet", service)  # stderr is not a terminal here
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("ENCFS_PROGRESS", "1")
    export_snapshot(src, tmp_path / "exp", service)
    imported(tmp_path / "exp", service)
    err = capfd.readouterr().err
    assert f"export {src.snapshot_id}" in err and f"import {src.snapshot_id}" in err
    # totals: the chunks read (4.5 MiB: the one written with zeros too), the objects imported (3.5 MiB)
    assert "/4.72M " in err and "/3.67M " in err


def _tool(mode: str, directory: Path, seed: int, mib: int) -> list[str]:
    return [sys.executable, str(TOOL), mode, str(directory), str(seed), str(mib)]


def _tool_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, ENCFS_HOME=str(home), PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("SOFTHSM2_CONF", None)
    return env


def _count_objects(directory: Path) -> int:
    try:
        return sum(len(os.listdir(d)) for d in os.scandir(directory / "objects") if d.is_dir())
    except FileNotFoundError:
        return 0


def test_an_export_killed_at_a_random_moment_completes_when_run_again(tmp_path: Path, fs_home: Path) -> None:
    exp, seed, mib = tmp_path / "exp", 42, 96
    rng = random.Random()
    stop_at = rng.randrange(1, mib - 8)  # objects written before the kill (96 distinct chunks in all)
    proc = subprocess.Popen(_tool("export", exp, seed, mib), env=_tool_env(fs_home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _count_objects(exp) < stop_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the export ended before the kill: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(exp / "manifests") == []  # a killed export leaves no manifest
    present = _count_objects(exp)
    assert stop_at <= present < mib
    # run again: it completes, writing only the objects still missing
    done = subprocess.run(_tool("export", exp, seed, mib), env=_tool_env(fs_home), capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["objects_reused"] == present and stats["objects_written"] == mib - present
    assert os.listdir(exp / "tmp") == []  # the killed run's temporary file is gone
    check = subprocess.run(_tool("verify", exp, seed, mib), env=_tool_env(fs_home), capture_output=True,
                           timeout=300)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["objects_read"] == mib
