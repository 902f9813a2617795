"""Backing-key versions after a rotation (issue #21): `encfs key describe` says which targets still
hold blobs under each version, `encfs rekey` moves a target off its old versions, and
`encfs key retire-version` destroys a version only once nothing known is under it.

The ledger logic runs in-process on the session token (the KeyService fixture); the end-to-end
cases drive the real CLI on a volume and a mounted filesystem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fuse_helpers import Mount
from test_rekey_fs import make, verify
from test_rekey_rewrap import fails, home, key_id, ok  # noqa: F401  (home: the fixture)
from volume_tool import contents, write

from encfs.errors import KeyStateError, UsageError
from encfs.keys.service import KeyService

MiB = 1 << 20


def versions(ks: KeyService, key: str) -> dict[int, dict]:
    return {v["Version"]: v for v in ks.describe_key(key)["KeyVersions"]}


def test_each_version_lists_the_targets_its_blobs_belong_to(service: KeyService) -> None:
    key = service.create_key()["KeyId"]
    service.generate_data_key(key, {"encfs:fs": "f1", "encfs:file": "01"}, encfs_internal=True)
    service.generate_data_keys(key, [{"encfs:fs": "f2", "encfs:file": "02"}] * 3, encfs_internal=True)
    service.generate_data_key(key, {"encfs:volume": "v1"}, encfs_internal=True)
    v1 = versions(service, key)[1]
    assert (v1["KeyVersionState"], v1["UsedBy"]) == ("Current", ["fs:f1", "fs:f2", "volume:v1"])
    service.rotate_key(key)
    service.encrypt(key, b"secret", {"app": "x"})
    got = versions(service, key)
    assert (got[1]["KeyVersionState"], got[2]["KeyVersionState"], got[2]["UsedBy"]) == ("InUse", "Current", ["other"])


def test_a_version_is_retired_only_when_nothing_known_is_under_it(service: KeyService) -> None:
    key = service.create_key()["KeyId"]
    ctx = {"encfs:volume": "aa"}
    blob = service.generate_data_key(key, ctx, encfs_internal=True).ciphertext_blob
    with pytest.raises(KeyStateError, match="current version"):
        service.retire_key_version(key, 1)
    service.rotate_key(key)
    with pytest.raises(KeyStateError, match="volume:aa"):
        service.retire_key_version(key, 1)
    with pytest.raises(UsageError, match="no version 7"):
        service.retire_key_version(key, 7)
    moved = service.re_encrypt(blob, ctx, key, encfs_internal=True)
    assert service.usage.forget("volume:aa", (key, 2)) == [(key, 1)]
    assert versions(service, key)[1]["KeyVersionState"] == "Unused"
    token_id = bytes.fromhex(service.store.load().keys[key].versions[0].token_id)
    assert service.token.has_object(token_id)
    out = service.retire_key_version(key, 1)
    assert out["KeyVersions"][0]["KeyVersionState"] == "Retired"
    assert not service.token.has_object(token_id)
    with pytest.raises(KeyStateError, match="retired"):
        service.decrypt(blob, ctx)
    assert len(service.decrypt(moved, ctx).plaintext) == 32
    service.retire_key_version(key, 1)  # again: nothing left to do, and no error


def test_blobs_of_other_callers_and_versions_from_before_the_ledger_keep_a_version(service: KeyService) -> None:
    key = service.create_key()["KeyId"]
    service.encrypt(key, b"x", {})
    service.rotate_key(key)
    assert service.usage.forget("other", (key, 2)) == []  # never forgotten: encfs cannot know
    with pytest.raises(KeyStateError, match="other"):
        service.retire_key_version(key, 1)
    with service.store.transaction() as db:  # as keys.json was before versions recorded their use
        for v in db.keys[key].versions:
            v.used_by = None
    assert versions(service, key)[1]["UsedBy"] == "unknown"
    with pytest.raises(KeyStateError, match="not known"):
        service.retire_key_version(key, 1)
    service.generate_data_key(key, {"encfs:fs": "f"}, encfs_internal=True)
    assert versions(service, key)[2]["UsedBy"] == "unknown"


def test_an_export_rewrap_does_not_forget_the_other_export_directories(service: KeyService) -> None:
    key = service.create_key()["KeyId"]
    service.generate_data_key(key, {"encfs:export": "aa"}, encfs_internal=True)
    service.rotate_key(key)
    assert service.usage.forget("export:aa", (key, 2)) == []
    assert versions(service, key)[1]["UsedBy"] == ["export:aa"]


def test_rotate_rekey_retire_a_volume_end_to_end(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    data = os.urandom(MiB)
    write(image, home, {0: data}, tmp_path)
    vid = json.loads(ok(home, "volume", "info", image, "--json"))["VolumeId"]
    ok(home, "key", "rotate", "a")
    assert f"used by volume:{vid}" in ok(home, "key", "describe", "a")
    assert f"volume:{vid}" in fails(home, "key", "retire-version", "a", "1")
    ok(home, "rekey", image)
    v1 = json.loads(ok(home, "key", "describe", "a", "--json"))["KeyVersions"][0]
    assert (v1["KeyVersionState"], v1["UsedBy"]) == ("Unused", [])
    assert "version 1 retired" in ok(home, "key", "retire-version", "a", "1")
    assert "retired" in ok(home, "key", "describe", "a")
    assert contents(image, home)[:MiB] == data


def test_rotate_rekey_retire_a_filesystem_end_to_end(home: Path, tmp_path: Path) -> None:
    cipher, plain, tree, xattrs = make(tmp_path, home, files=12)
    ok(home, "key", "rotate", "a")
    with Mount(cipher, plain, home):  # a new file's key under version 2, the rest under 1
        (plain / "new").write_bytes(b"under version 2")
    described = json.loads(ok(home, "key", "describe", "a", "--json"))["KeyVersions"]
    assert [v["KeyVersionState"] for v in described] == ["InUse", "Current"]
    assert described[0]["UsedBy"] == described[1]["UsedBy"] and described[0]["UsedBy"][0].startswith("fs:")
    fails(home, "key", "retire-version", "a", "1")
    ok(home, "rekey", cipher)
    ok(home, "key", "retire-version", "a", "1")
    with Mount(cipher, plain, home, "-o", "ro"):
        verify(plain, {**tree, "new": ("file", b"under version 2")}, xattrs)


def test_a_full_rekey_into_a_new_volume_id_forgets_the_old_one(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "8M", "--key", "a")
    old = json.loads(ok(home, "volume", "info", image, "--json"))["VolumeId"]
    ok(home, "key", "rotate", "a")
    new = json.loads(ok(home, "rekey", image, "--full", "--json"))["VolumeId"]
    used = [v["UsedBy"] for v in json.loads(ok(home, "key", "describe", "a", "--json"))["KeyVersions"]]
    assert new != old and used == [[], [f"volume:{new}"]]


def test_a_rotation_whose_keys_json_write_failed_leaves_the_next_one_usable(
        service: KeyService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails the keys.json write after the token made the new version's object: the
    next rotation must reuse that object, not make a second one with the same id (every use of
    the version then failed: "several token objects share id")."""
    from encfs.errors import StateError
    from encfs.keys.metadata import KeyStore

    key = service.create_key()["KeyId"]
    old = service.encrypt(key, b"before", {"app": "x"})
    real_save = KeyStore._save

    def full_disk(self: KeyStore, data: dict) -> None:
        raise StateError(f"cannot write key metadata {self.path}: No space left on device")

    monkeypatch.setattr(KeyStore, "_save", full_disk)
    for _ in range(2):
        with pytest.raises(StateError, match="No space left"):
            service.rotate_key(key)
    monkeypatch.setattr(KeyStore, "_save", real_save)
    assert service.rotate_key(key)["CurrentKeyVersion"] == 2
    blob = service.encrypt(key, b"after", {"app": "x"})
    assert service.decrypt(blob, {"app": "x"}).plaintext == b"after"
    assert service.decrypt(old, {"app": "x"}).plaintext == b"before"
