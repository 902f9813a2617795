"""`encfs hsm backup FILE` / `encfs hsm restore FILE` (issue #23) through the real CLI: a real
SoftHSM2 token, a real FUSE mount, the archive of docs/FORMAT.md section 10.

One module-scoped store (``world``) is backed up once under a passphrase and once under a recovery
key; each test restores into homes of its own."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import fail, ok, ok_json
from fuse_helpers import Mount

PASS = "backup passphrase for tests"


def snapshot_tree(root: Path) -> dict[str, bytes]:
    """Every file under root (what a refused restore must leave alone); lock files excluded."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with keys 'a' and 'b', a blob under 'a', a filesystem under 'a' holding a file;
    its backups under a passphrase and a recovery key; then key 'late' created after them."""
    base = tmp_path_factory.mktemp("backup")
    home = base / "home"
    ok("hsm", "init", home=home)
    key_a = ok("key", "create", "--alias", "a", home=home).decode().strip()
    ok("key", "create", "--alias", "b", home=home)
    blob = ok("key", "encrypt", "a", "--context", "app=x", home=home, input=b"secret")
    cipher, plain = base / "cipher", base / "plain"
    plain.mkdir()
    ok("init", str(cipher), "--key", "a", home=home)
    with Mount(cipher, plain, home):
        (plain / "made-before-backup.txt").write_bytes(b"still here\n" * 1000)
    passfile = base / "pass"
    passfile.write_text(PASS + "\n")
    archive = base / "store.bk"
    out = ok("hsm", "backup", str(archive), "--passphrase-file", str(passfile), home=home).decode()
    assert str(archive) in out and "sealed under a passphrase" in out
    rk_archive, rk = base / "store-rk.bk", base / "recovery.key"
    ok("hsm", "backup", str(rk_archive), "--new-recovery-key", str(rk), home=home)
    late = ok("key", "create", "--alias", "late", home=home).decode().strip()
    return {"base": base, "home": home, "key_a": key_a, "blob": blob, "cipher": cipher, "archive": archive,
            "pass": passfile, "rk_archive": rk_archive, "rk": rk, "late": late}


def test_wipe_then_restore_opens_the_filesystem_and_the_blob(world: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"  # another path: the restored softhsm2.conf must name this one
    shutil.copytree(world["home"], home)
    describe = ok_json("key", "describe", "a", "--json", home=home)
    shutil.rmtree(home)  # the disk died
    fail("key", "list", home=home, needles=("no key store", str(home)), exit_code=66)
    out = ok("hsm", "restore", str(world["archive"]), "--passphrase-file", str(world["pass"]), home=home).decode()
    assert "restored" in out and str(home) in out
    assert ok_json("key", "describe", "a", "--json", home=home) == describe
    assert ok("key", "decrypt", "--context", "app=x", home=home, input=world["blob"]) == b"secret"
    fail("key", "describe", world["late"], home=home, needles=(world["late"],))  # made after the backup
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in home.rglob("*"))
    assert not list(home.glob(".restore-*"))
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    shutil.copytree(world["cipher"], cipher)
    plain.mkdir()
    with Mount(cipher, plain, home):
        assert (plain / "made-before-backup.txt").read_bytes() == b"still here\n" * 1000
    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    restored = [r for r in audit if r["operation"] == "RestoreKeyStore"]
    assert len(restored) == 1 and restored[0]["archive"] == str(world["archive"])
    backed = [json.loads(line) for line in (world["home"] / "audit.log").read_text().splitlines()
              if '"BackupKeyStore"' in line]
    assert [r["sealed_with"] for r in backed] == ["passphrase", "recovery key"]
    for log in (home / "audit.log", world["home"] / "audit.log"):
        assert PASS not in log.read_text()


def test_recovery_key(world: dict[str, Any], tmp_path: Path) -> None:
    rk: Path = world["rk"]
    assert stat.S_IMODE(rk.stat().st_mode) == 0o600 and len(bytes.fromhex(rk.read_text())) == 32
    home = tmp_path / "home"
    fail("hsm", "restore", str(world["rk_archive"]), "--passphrase-file", str(world["pass"]), home=home,
         needles=("recovery key",), exit_code=2)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)  # else a warning line too
    fail("hsm", "restore", str(world["rk_archive"]), "--recovery-key", str(other), home=home,
         needles=("wrong recovery key",), exit_code=77)
    assert not home.exists()
    ok("hsm", "restore", str(world["rk_archive"]), "--recovery-key", str(rk), home=home)
    assert ok("key", "decrypt", "--context", "app=x", home=home, input=world["blob"]) == b"secret"


def test_wrong_passphrase_writes_nothing(world: dict[str, Any], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    for home in (tmp_path / "absent", tmp_path / "empty"):
        if home.name == "empty":
            home.mkdir()
        fail("hsm", "restore", str(world["archive"]), "--passphrase-file", str(wrong), home=home,
             needles=("wrong passphrase", str(world["archive"])), exit_code=77)
        assert (list(home.iterdir()) == []) if home.exists() else home.name == "absent"
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("where", ["body", "tag", "header-nonce", "truncated", "magic"])
def test_tampered_archive_is_refused_and_nothing_written(world: dict[str, Any], tmp_path: Path, where: str) -> None:
    data = bytearray(world["archive"].read_bytes())
    if where == "body":
        data[200] ^= 0x01
    elif where == "tag":
        data[-1] ^= 0x80
    elif where == "header-nonce":
        data[30] ^= 0x01  # the nonce is in the AAD: the tag fails
    elif where == "truncated":
        data = data[:40]
    else:
        data[0] ^= 0x20
    bad = tmp_path / "bad.bk"
    bad.write_bytes(bytes(data))
    home = tmp_path / "home"
    msg = fail("hsm", "restore", str(bad), "--passphrase-file", str(world["pass"]), home=home, exit_code=65)
    assert str(bad) in msg
    assert not home.exists()


def test_restore_over_a_store_needs_force(world: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("hsm", "init", home=home)
    mine = ok("key", "create", "--alias", "mine", home=home).decode().strip()
    before = snapshot_tree(home / "softhsm"), (home / "keys.json").read_bytes()
    fail("hsm", "restore", str(world["archive"]), "--passphrase-file", str(world["pass"]), home=home,
         needles=("key store exists", str(home), "--force"))
    assert (snapshot_tree(home / "softhsm"), (home / "keys.json").read_bytes()) == before
    out = ok("hsm", "restore", str(world["archive"]), "--passphrase-file", str(world["pass"]), "--force",
             home=home).decode()
    assert "replaced" in out
    assert ok("key", "decrypt", "--context", "app=x", home=home, input=world["blob"]) == b"secret"
    fail("key", "describe", mine, home=home, needles=(mine,))
    assert not list(home.glob(".restore-*"))
    ops = [json.loads(line)["operation"] for line in (home / "audit.log").read_text().splitlines()]
    assert ops.index("CreateKey") < ops.index("RestoreKeyStore")  # the audit trail is kept, not restored


def test_archive_reveals_no_pin_and_backup_refusals(world: dict[str, Any], tmp_path: Path) -> None:
    home: Path = world["home"]
    data = world["archive"].read_bytes()
    assert data.startswith(b"ENCFSBAK\x01\x01")
    for secret in ((home / "softhsm" / "user.pin").read_bytes(), (home / "softhsm" / "so.pin").read_bytes(),
                   world["key_a"].encode(), b"keys.json"):
        assert secret not in data
    fail("hsm", "backup", str(world["archive"]), "--passphrase-file", str(world["pass"]), home=home,
         needles=("exists",), exit_code=2)
    short = tmp_path / "short"
    short.write_text("short\n")
    fail("hsm", "backup", str(tmp_path / "x.bk"), "--passphrase-file", str(short), home=home,
         needles=("shorter",), exit_code=2)
    assert not (tmp_path / "x.bk").exists()
    fail("hsm", "backup", str(tmp_path / "x.bk"), home=home, needles=("--passphrase-file",))  # no terminal


def test_secrets_and_the_key_daemons_policies_and_grants_are_in_the_backup(tmp_path: Path) -> None:
    """A restore that lost them would lose every secret (their values exist nowhere else) and every
    policy and grant a key daemon decides by."""
    from encfs.keyd.acl import AccessControl
    from encfs.keyd.principal import Principal
    from encfs.keyd.roles import Roles

    home = tmp_path / "home"
    ok("hsm", "init", home=home)
    key = ok("key", "create", "--alias", "s", home=home).decode().strip()
    ok("secret", "put", "db/password", "--kms-key-id", "s", home=home, input=b"hunter2")
    access = AccessControl(home / "keyd", Roles())
    access.on_key_created(key, Principal.from_certificate("CN=owner,O=example"))
    grant = access.create_grant(key, "user:bob", ["Decrypt"], None, None, None,
                                Principal.from_certificate("CN=owner,O=example"))["GrantId"]
    (home / "keyd.toml").write_text('[roles]\nofficers = ["user:carol"]\n')
    passfile = tmp_path / "pass"
    passfile.write_text(PASS + "\n")
    ok("hsm", "backup", str(tmp_path / "store.bk"), "--passphrase-file", str(passfile), home=home)
    target = tmp_path / "restored"
    ok("hsm", "restore", str(tmp_path / "store.bk"), "--passphrase-file", str(passfile), home=target)
    assert ok("secret", "get", "db/password", home=target) == b"hunter2"
    again = AccessControl(target / "keyd", Roles())
    assert again.get_policy(key) == access.get_policy(key)
    assert [g["GrantId"] for g in again.list_grants(key)] == [grant]
    assert (target / "keyd.toml").read_text() == (home / "keyd.toml").read_text()
