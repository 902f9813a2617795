"""`encfs rekey` of volumes and snapshot exports (issue #21), through the real CLI: a re-wrap moves
the wrapped key and rewrites no content, after which the old CMK can be disabled or scheduled
for deletion and every byte (and every snapshot) still reads back; --full re-encrypts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_encfs
from volume_helpers import Rig, rig  # noqa: F401  (the fixture)
from volume_tool import contents, digests, live_pages, write

MiB = 1 << 20


def ok(home: Path, *args: str | Path) -> str:
    p = run_encfs(*map(str, args), home=home)
    assert p.returncode == 0, p.stderr.decode()
    assert b"Traceback" not in p.stderr
    return p.stdout.decode()


def fails(home: Path, *args: str | Path) -> str:
    p = run_encfs(*map(str, args), home=home)
    assert p.returncode != 0, p.stdout.decode()
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs: "), p.stderr.decode()
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home of its own (its keys get disabled): CMKs 'a' and 'b'."""
    h = tmp_path / "home"
    ok(h, "hsm", "init")
    for alias in ("a", "b"):
        ok(h, "key", "create", "--alias", alias)
    return h


def key_id(home: Path, alias: str) -> str:
    return str(json.loads(ok(home, "key", "describe", alias, "--json"))["KeyId"])


def header_bytes(image: Path) -> bytes:
    with open(image, "rb") as f:
        return f.read(2 * 4096 + 8192)


@pytest.mark.parametrize("fmt", ["1", "2"])
def test_a_rewrapped_volume_reads_back_whole_with_its_old_cmk_disabled(
        home: Path, tmp_path: Path, fmt: str) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "24M", "--key", "a", "--format", fmt)
    write(image, home, {0: os.urandom(3 * MiB), 17 * MiB + 5: os.urandom(100_000)}, tmp_path)
    if fmt == "2":
        ok(home, "snapshot", "create", image)
        write(image, home, {MiB: os.urandom(MiB)}, tmp_path)
    before = digests(image, home)
    size = os.path.getsize(image)
    out = json.loads(ok(home, "rekey", image, "--key", "b", "--json"))
    assert out["Changed"] and out["SourceKeyId"] == key_id(home, "a") and out["KeyId"] == key_id(home, "b")
    assert os.path.getsize(image) == size  # no content rewritten: nothing grew or moved
    ok(home, "key", "disable", "a")
    assert digests(image, home) == before  # the live volume and every snapshot
    info = ok(home, "volume", "info", image, "--json")
    assert key_id(home, "b") in info and key_id(home, "a") not in info


def test_without_key_a_rewrap_moves_to_the_newest_backing_version_then_does_nothing(
        home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    write(image, home, {0: b"kept" * 1024}, tmp_path)
    assert "nothing to do" in ok(home, "rekey", image)
    ok(home, "key", "rotate", "a")
    dry = ok(home, "rekey", image, "--dry-run")
    assert "would re-wrap" in dry and "(version 1)" in dry and "(version 2)" in dry
    moved = json.loads(ok(home, "rekey", image, "--json"))
    assert (moved["SourceKeyVersion"], moved["KeyVersion"], moved["Changed"]) == (1, 2, True)
    again = json.loads(ok(home, "rekey", image, "--json"))
    assert (again["Changed"], again["WrappedKeys"]) == (False, 0)
    assert contents(image, home)[:4096] == b"kept" * 1024


def test_a_dry_run_changes_nothing(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    before = header_bytes(image)
    assert "would re-wrap" in ok(home, "rekey", image, "--key", "b", "--dry-run")
    assert header_bytes(image) == before
    assert "would copy every written sector" in ok(home, "rekey", image, "--full", "--dry-run")
    assert header_bytes(image) == before


def test_a_rewrap_cut_between_the_header_copies_reads_with_the_old_cmk_disabled_and_finishes(
        home: Path, tmp_path: Path) -> None:
    """A crash between the two header writes leaves copy 0 under the new CMK and copy 1 under the
    old one. With the old CMK then disabled the volume still opens (the newer copy), and running
    the command again rewrites the other copy."""
    from encfs.block.layout import header_offset
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    data = os.urandom(MiB)
    write(image, home, {0: data}, tmp_path)
    with open(image, "rb") as f:
        f.seek(header_offset(1))
        old_copy = f.read(4096)
    ok(home, "rekey", image, "--key", "b")
    with open(image, "r+b") as f:  # copy 1 as it was: the crash came before its write
        f.seek(header_offset(1))
        f.write(old_copy)
    ok(home, "key", "disable", "a")
    assert contents(image, home)[:MiB] == data
    out = json.loads(ok(home, "rekey", image, "--key", "b", "--json"))
    assert not out["Changed"] and out["Repaired"] and "cannot be used" in out["Repaired"][0]
    p = run_encfs("volume", "info", image, "--key", "b", home=home)
    assert p.returncode == 0 and b"warning" not in p.stderr, p.stderr  # both copies good again
    assert "nothing to do" in ok(home, "rekey", image, "--key", "b")


def test_a_rewrap_cut_between_the_header_copies_is_finished_by_the_next_run(home: Path, tmp_path: Path) -> None:
    """The same crash with the old CMK still enabled: both copies unwrap, so nothing warns, but copy 1
    still holds the volume key under the old CMK. The next run must rewrite it, not find nothing to do."""
    from encfs.block.layout import header_offset
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    with open(image, "rb") as f:
        f.seek(header_offset(1))
        old_copy = f.read(4096)
    ok(home, "rekey", image, "--key", "b")
    with open(image, "r+b") as f:
        f.seek(header_offset(1))
        f.write(old_copy)
    assert run_encfs("fsck", image, home=home).returncode != 0  # "holds an older header"
    ok(home, "rekey", image, "--key", "b")
    p = run_encfs("fsck", image, home=home)
    assert p.returncode == 0, p.stdout + p.stderr  # both copies the same header again
    ok(home, "key", "disable", "a")  # and no copy left under it
    assert "nothing to do" in ok(home, "rekey", image, "--key", "b")


def test_a_rewrapped_export_imports_with_its_old_cmk_scheduled_for_deletion(home: Path, tmp_path: Path) -> None:
    image, exported = tmp_path / "vol.img", tmp_path / "export"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    write(image, home, {123: os.urandom(2 * MiB)}, tmp_path)
    sid = json.loads(ok(home, "snapshot", "create", image, "--json"))["SnapshotId"]
    ok(home, "snapshot", "restore", f"{image}@{sid}", tmp_path / "expected.img")
    expected = contents(tmp_path / "expected.img", home)
    ok(home, "snapshot", "export", f"{image}@{sid}", exported)
    objects = sorted((p.name, p.stat().st_size) for p in (exported / "objects").rglob("*") if p.is_file())
    assert "re-wrapped the export key" in ok(home, "rekey", exported, "--key", "b")
    assert sorted((p.name, p.stat().st_size) for p in (exported / "objects").rglob("*") if p.is_file()) == objects
    ok(home, "key", "schedule-deletion", "a", "--days", "7")
    ok(home, "snapshot", "import", exported, tmp_path / "restored.img", "--snapshot", sid, "--key", "b")
    assert contents(tmp_path / "restored.img", home) == expected


def test_a_full_rekey_reencrypts_under_a_fresh_volume_key(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    write(image, home, {4096: os.urandom(3 * MiB)}, tmp_path)
    before = contents(image, home)
    old_id = json.loads(ok(home, "volume", "info", image, "--json"))["VolumeId"]
    done = json.loads(ok(home, "rekey", image, "--full", "--key", "b", "--json"))
    assert done["VolumeId"] != old_id and done["KeyId"] == key_id(home, "b")
    ok(home, "key", "disable", "a")
    assert contents(image, home) == before


def test_a_full_rekey_refuses_a_volume_whose_map_node_fails_authentication(home: Path, tmp_path: Path) -> None:
    """A map leaf that fails authentication hides which of its sectors are written: a copy that
    skipped them would turn I/O errors into zeros. The copy is refused; nothing changes."""
    from volume_helpers import flip

    from encfs.block.layout import page_offset

    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "16M", "--key", "a")
    write(image, home, {0: os.urandom(MiB), 2048 * 4096: os.urandom(MiB)}, tmp_path)
    leaf = next(p for level, index, p in live_pages(image, home)["nodes"] if (level, index) == (0, 2))
    flip(image, page_offset(leaf) + 100)
    before = image.read_bytes()
    p = run_encfs("rekey", str(image), "--full", home=home)  # the open also logs the damaged node
    assert p.returncode != 0 and b"Traceback" not in p.stderr
    assert "sector 2048 fails authentication" in p.stderr.decode().strip().splitlines()[-1]
    assert image.read_bytes() == before and not list(tmp_path.glob("vol.img.*"))


def test_export_and_restore_refuse_a_snapshot_whose_map_node_fails_authentication(
        home: Path, tmp_path: Path) -> None:
    """The same for a snapshot: its export or restore would have left out the node's sectors."""
    from volume_helpers import flip

    from encfs.block.layout import page_offset

    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "16M", "--key", "a")
    write(image, home, {0: os.urandom(MiB), 2048 * 4096: os.urandom(MiB)}, tmp_path)
    sid = json.loads(ok(home, "snapshot", "create", image, "--json"))["SnapshotId"]
    leaf = next(p for level, index, p in live_pages(image, home)["nodes"] if (level, index) == (0, 2))
    flip(image, page_offset(leaf) + 100)  # the live map and the snapshot's share this leaf
    for args in (("snapshot", "export", f"{image}@{sid}", tmp_path / "exported"),
                 ("snapshot", "restore", f"{image}@{sid}", tmp_path / "restored.img")):
        p = run_encfs(*map(str, args), home=home)
        assert p.returncode != 0 and b"Traceback" not in p.stderr, p.stdout
        assert "fails authentication at sector 2048" in p.stderr.decode().strip().splitlines()[-1]
    assert not (tmp_path / "restored.img").exists()


def test_refusals_are_one_line(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    assert "moves it with its volume" in fails(home, "rekey", f"{image}@snap-0123456789abcdef")
    assert "no such file" in fails(home, "rekey", tmp_path / "missing.img")
    (tmp_path / "plain").write_bytes(os.urandom(8192))
    assert "volume" in fails(home, "rekey", tmp_path / "plain")
    (tmp_path / "somedir").mkdir()
    assert "neither a CIPHERDIR nor" in fails(home, "rekey", tmp_path / "somedir")
    assert "b2" in fails(home, "rekey", image, "--key", "b2")  # no such CMK
    ok(home, "key", "disable", "b")
    assert "b" in fails(home, "rekey", image, "--key", "b")  # a disabled destination


def test_an_attached_volume_is_refused(rig: Rig) -> None:  # noqa: F811
    image = rig.create(size="16M")
    rig.attach(image)
    try:
        assert "detach it first" in rig.fails("rekey", image, "--key", "fs")
    finally:
        rig.detach(image)
