"""`encfs volume rekey`: a detached volume copied under a fresh volume key (encfs/block/rekey.py),
kernel-free through the volume API and once through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_encfs
from encfs.block import rekey as rekey_mod
from encfs.block.header import VolumeKeyMismatch
from encfs.block.volume import VolumeError, create_volume, open_volume
from encfs.keys.service import KeyService

MiB = 1 << 20


def written(path: Path, ks: KeyService, pieces: dict[int, bytes]) -> None:
    vol = open_volume(path, ks)
    try:
        for offset, data in pieces.items():
            vol.write(offset, data)
        vol.flush()
    finally:
        vol.close()


def contents(path: Path, ks: KeyService) -> tuple[bytes, str, str, int]:
    vol = open_volume(path, ks)
    try:
        return bytes(vol.read(0, vol.size)), vol.header.volume_id.hex(), vol.header.key_id, vol.seals
    finally:
        vol.close()


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def volume(tmp_path: Path, service: KeyService, request: pytest.FixtureRequest) -> tuple[Path, str, bytes]:
    key = service.create_key()["KeyId"]
    path = tmp_path / "vol.img"
    create_volume(path, 64 * MiB, service, key, version=request.param)
    written(path, service, {0: os.urandom(5000 * 4096), 40 * MiB + 8192: b"x" * 4096 * 3})
    return path, key, contents(path, service)[0]


def test_rekey_copies_every_sector_under_a_fresh_key(volume: tuple[Path, str, bytes], service: KeyService) -> None:
    path, key, before = volume
    _data, old_id, _k, _seals = contents(path, service)
    os.chmod(path, 0o640)
    done = rekey_mod.rekey_volume(path, service)
    assert os.stat(path).st_mode & 0o777 == 0o640  # the copy keeps the image's mode
    data, new_id, key_id, seals = contents(path, service)
    assert data == before and new_id == done.volume_id != old_id and key_id == key
    assert done.sectors == 5000 + 3 and seals < 2 * (5000 + 3) + 100  # the count starts again
    assert os.stat(path).st_blocks * 512 < 30 * MiB  # unwritten sectors stay holes
    assert not rekey_mod.tmp_path(path).exists()


def test_rekey_under_another_cmk_and_the_pin(volume: tuple[Path, str, bytes], service: KeyService) -> None:
    path, key, before = volume
    other = service.create_key()["KeyId"]
    with pytest.raises(VolumeKeyMismatch):
        rekey_mod.rekey_volume(path, service, other, expected_key=other)  # VOL is under ``key``, not ``other``
    rekey_mod.rekey_volume(path, service, other, expected_key=key)
    data, _id, key_id, _s = contents(path, service)
    assert data == before and key_id == other


def test_a_failed_copy_leaves_the_volume_unchanged_and_a_rerun_finishes(
        volume: tuple[Path, str, bytes], service: KeyService, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _key, before = volume
    image = path.read_bytes()
    real = rekey_mod.open_volume
    calls = []

    def full_disk_on_the_copy(p: Path, ks: KeyService, **kw: object):  # type: ignore[no-untyped-def]
        vol = real(p, ks, **kw)
        if p.name.endswith(".rekey.tmp"):
            write = vol.store.write_sectors

            def failing(first: int, data: bytes) -> None:
                calls.append(first)
                if len(calls) > 2:
                    raise OSError(28, "No space left on device")
                write(first, data)
            vol.store.write_sectors = failing  # type: ignore[method-assign]
        return vol

    monkeypatch.setattr(rekey_mod, "open_volume", full_disk_on_the_copy)
    with pytest.raises(VolumeError, match="No space left on device.*unchanged"):
        rekey_mod.rekey_volume(path, service)
    monkeypatch.undo()
    assert path.read_bytes() == image and not rekey_mod.tmp_path(path).exists()
    rekey_mod.tmp_path(path).write_bytes(b"left by a killed run")
    rekey_mod.rekey_volume(path, service)
    assert contents(path, service)[0] == before and not rekey_mod.tmp_path(path).exists()


def test_a_damaged_sector_stops_the_rekey(volume: tuple[Path, str, bytes], service: KeyService) -> None:
    path, _key, _before = volume
    vol = open_volume(path, service)
    try:  # find sector 1's place in the image and flip a byte there
        from encfs.block.layout import page_offset, sector_offset
        if vol.header.copy_on_write:
            at = page_offset(vol.store.tree.get(1)) + 50
        else:
            at = sector_offset(1, vol.store._state(1)) + 50
    finally:
        vol.close()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    image = path.read_bytes()
    with pytest.raises(VolumeError, match="sector 1 fails authentication"):
        rekey_mod.rekey_volume(path, service)
    assert path.read_bytes() == image


def test_an_open_volume_is_not_rekeyed(volume: tuple[Path, str, bytes], service: KeyService) -> None:
    path, _key, _before = volume
    vol = open_volume(path, service)  # as an attach daemon holds it
    try:
        with pytest.raises(VolumeError, match="in use"):
            rekey_mod.rekey_volume(path, service)
    finally:
        vol.close()


def test_the_cli_rekeys_and_reports_in_one_line(tmp_path: Path, fs_home: Path) -> None:
    img = tmp_path / "v.img"
    assert run_encfs("volume", "create", str(img), "--size", "4M", "--key", "fs", home=fs_home).returncode == 0
    proc = run_encfs("volume", "rekey", str(img), home=fs_home)
    assert proc.returncode == 0 and b"re-keyed as volume" in proc.stdout, proc.stderr
    proc = run_encfs("volume", "rekey", str(tmp_path / "missing.img"), home=fs_home)
    assert proc.returncode != 0 and proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
