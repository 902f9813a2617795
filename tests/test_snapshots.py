"""`encfs snapshot` on detached volumes, through the real CLI (a real SoftHSM2 token)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_encfs

MiB = 1 << 20


def ok(*args: str | Path, home: Path) -> str:
    p = run_encfs(*map(str, args), home=home)
    assert p.returncode == 0, p.stderr.decode()
    assert not p.stderr.strip() or b"Traceback" not in p.stderr
    return p.stdout.decode()


def fails(*args: str | Path, home: Path) -> str:
    p = run_encfs(*map(str, args), home=home)
    assert p.returncode != 0, p.stdout.decode()
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs: "), p.stderr.decode()
    return lines[0]


TOOL = Path(__file__).with_name("volume_tool.py")


def _tool(home: Path, *args: str | Path, data: bytes = b"") -> bytes:
    p = subprocess.run([sys.executable, str(TOOL), *map(str, args)], input=data, capture_output=True,
                       env=dict(os.environ, ENCFS_HOME=str(home)), timeout=120, check=False)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def write(image: Path, home: Path, chunks: dict[int, bytes]) -> None:
    for offset, data in chunks.items():
        _tool(home, "write", image, offset, data=data)


def contents(image: Path, home: Path) -> bytes:
    return _tool(home, "read", image)


def snap(image: Path, home: Path, description: str = "") -> str:
    return json.loads(ok("snapshot", "create", image, "--description", description, "--json", home=home))["SnapshotId"]


@pytest.fixture
def volume(tmp_path: Path, fs_home: Path) -> Path:
    image = tmp_path / "vol.img"
    ok("volume", "create", image, "--size", "32M", "--key", "fs", home=fs_home)
    return image


def test_a_chain_of_snapshots_restores_byte_for_byte_after_the_middle_one_is_deleted(
        volume: Path, fs_home: Path, tmp_path: Path) -> None:
    states, ids = [], []
    for i in range(3):
        write(volume, fs_home, {i * 3 * MiB: os.urandom(2 * MiB), 20 * MiB: bytes([i + 1]) * 4096})
        states.append(contents(volume, fs_home))
        ids.append(snap(volume, fs_home, f"step {i}"))
    listed = json.loads(ok("snapshot", "list", volume, "--json", home=fs_home))["Snapshots"]
    assert [s["SnapshotId"] for s in listed] == ids and [s["Description"] for s in listed] == ["step 0", "step 1",
                                                                                                  "step 2"]
    assert ok("snapshot", "delete", ids[1], home=fs_home).strip() == f"{ids[1]} deleted"
    assert ids[1] not in ok("snapshot", "list", volume, home=fs_home)
    for i in (0, 2):
        out = tmp_path / f"r{i}.img"
        ok("snapshot", "restore", ids[i], out, home=fs_home)
        assert contents(out, fs_home) == states[i]
    assert contents(volume, fs_home) == states[2]
    assert "no snapshot" in fails("snapshot", "restore", f"{volume}@{ids[1]}", tmp_path / "x.img", home=fs_home)
    assert not (tmp_path / "x.img").exists()


def test_info_shows_exclusive_and_shared_bytes(volume: Path, fs_home: Path) -> None:
    write(volume, fs_home, {0: os.urandom(4 * MiB)})
    first = snap(volume, fs_home)
    write(volume, fs_home, {0: os.urandom(1 * MiB)})
    info = json.loads(ok("snapshot", "info", first, "--json", home=fs_home))
    # 1 MiB of it was overwritten since (only it holds that), 3 MiB it shares with the live volume
    assert 1 * MiB <= info["ExclusiveBytes"] <= 1.1 * MiB and 3 * MiB <= info["SharedBytes"] <= 3.1 * MiB
    assert info["VolumeSize"] == 32 * MiB and info["Volume"] == str(volume)


def test_rollback_and_copy_under_another_key(volume: Path, fs_home: Path, tmp_path: Path) -> None:
    write(volume, fs_home, {0: b"before" * 1000})
    before = contents(volume, fs_home)
    first = snap(volume, fs_home)
    write(volume, fs_home, {0: b"after!" * 1000})
    ok("snapshot", "rollback", volume, first, home=fs_home)
    assert contents(volume, fs_home) == before
    other = ok("key", "create", "--alias", f"copy-{os.getpid()}-{tmp_path.name[-6:]}", home=fs_home).strip()
    out = tmp_path / "copy.img"
    line = ok("snapshot", "copy", first, out, "--key", other, home=fs_home)
    assert contents(out, fs_home) == before
    info = json.loads(ok("volume", "info", out, "--json", home=fs_home))
    assert info["KeyId"] in other or other in info["KeyId"]
    copied = line.split()[0]
    assert json.loads(ok("snapshot", "info", copied, "--json", home=fs_home))["Volume"] == str(out)


def test_bad_input_is_one_line(volume: Path, fs_home: Path, tmp_path: Path) -> None:
    assert "not a snapshot id" in fails("snapshot", "info", "snap-xyz", home=fs_home)
    assert "not known on this machine" in fails("snapshot", "info", "snap-0123456789abcdef", home=fs_home)
    old = tmp_path / "old.img"
    ok("volume", "create", old, "--size", "8M", "--key", "fs", "--format", "1", home=fs_home)
    assert "volume upgrade" in fails("snapshot", "create", old, home=fs_home)
    first = snap(volume, fs_home)
    assert "already exists" in fails("snapshot", "restore", first, volume, home=fs_home)


def test_upgrade_converts_a_format_1_volume_and_keeps_its_contents(fs_home: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.img"
    ok("volume", "create", old, "--size", "16M", "--key", "fs", "--format", "1", home=fs_home)
    write(old, fs_home, {5 * MiB: os.urandom(3 * MiB)})
    before = contents(old, fs_home)
    ok("volume", "upgrade", old, home=fs_home)
    assert json.loads(ok("volume", "info", old, "--json", home=fs_home))["Format"] == 2
    assert contents(old, fs_home) == before
    assert "already has format 2" in ok("volume", "upgrade", old, home=fs_home)
    snap(old, fs_home)


def test_export_import_round_trip_incremental_and_refusals(volume: Path, fs_home: Path, tmp_path: Path) -> None:
    write(volume, fs_home, {0: os.urandom(3 * MiB), 17 * MiB: os.urandom(MiB)})
    first = snap(volume, fs_home)
    out = tmp_path / "export"
    assert "4 objects written, 0 already there" in ok("snapshot", "export", first, out, home=fs_home)
    write(volume, fs_home, {0: os.urandom(4096)})
    second = snap(volume, fs_home)
    assert "1 object written, 3 already there" in ok("snapshot", "export", second, out, home=fs_home)
    for sid, name in ((first, "a.img"), (second, "b.img")):
        restored, imported = tmp_path / f"r-{name}", tmp_path / name
        ok("snapshot", "restore", sid, restored, home=fs_home)
        ok("snapshot", "import", out, imported, "--snapshot", sid, home=fs_home)
        assert contents(imported, fs_home) == contents(restored, fs_home)
    objects = sorted(p for p in (out / "objects").rglob("*") if p.is_file())
    assert len(objects) == 5
    victim = objects[0]  # used by one snapshot or both: the imports that need it are refused
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    for damage in ("fails authentication", "missing"):
        refused = []
        for sid in (first, second):
            p = run_encfs("snapshot", "import", str(out), str(tmp_path / "t.img"), "--snapshot", sid, home=fs_home)
            if p.returncode:
                [line] = p.stderr.decode().strip().splitlines()
                assert victim.name in line and damage in line, line
                refused.append(sid)
            (tmp_path / "t.img").unlink(missing_ok=True)
        assert refused
        assert not list(tmp_path.glob("t.img*"))
        victim.unlink(missing_ok=True)


def test_an_upgrade_out_of_space_says_upgrade_and_changes_nothing(fs_home: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        old = small / "old.img"
        ok("volume", "create", old, "--size", "16M", "--key", "fs", "--format", "1", home=fs_home)
        write(old, fs_home, {0: os.urandom(6 * MiB)})
        before = contents(old, fs_home)
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "fill").write_bytes(bytes(max(0, free - 2 * MiB)))  # room for less than the copy
        line = fails("volume", "upgrade", old, home=fs_home)
        assert line.startswith(f"encfs: cannot upgrade {old}: No space left on device"), line
        (small / "fill").unlink()
        assert json.loads(ok("volume", "info", old, "--json", home=fs_home))["Format"] == 1
        assert contents(old, fs_home) == before
        assert sorted(p.name for p in small.iterdir()) == ["old.img"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
