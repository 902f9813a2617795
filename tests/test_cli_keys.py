"""The ``encfs`` CLI end to end: real subprocesses, real SoftHSM2 tokens, no mocks.

This module: the embedded token (`hsm init`, `hsm status`, exit codes, global options, a missing
store, a wrong PIN) and key management (create, list, describe, aliases, states, rotation).
Cryptographic operations, the one-line error contract and BYOK are in test_cli_keys_crypto.py,
the "vendor HSM" tests in test_cli_keys_vendor.py; the shared helpers in cli_helpers.py.

Error contract (issue): every failure prints exactly one line ``encfs: <cause>``
on stderr, exits non-zero, shows no traceback and leaves no half-created state.

Most tests share one provisioned embedded home per module (``shared_home``) and
create their own keys there; tests that need a pristine home get their own.

Not tested: a locked token. SoftHSM2 2.6.1 never sets CKF_USER_PIN_LOCKED
(20 wrong C_Login calls in one process and 12 across processes all gave
CKR_PIN_INCORRECT, and the right PIN still worked afterwards), so the
PinLocked path cannot be reached without faking the token.
"""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

from cli_helpers import (
    BINARY,
    MODULE,
    blob_key_version,
    create_key,
    fail,
    ok,
    ok_json,
    shared_home,
    state,
    token_objects,
)
from conftest import run_encfs

__all__ = ["shared_home"]  # the fixture, used by name


def roundtrip(home: Path, key: str, *opts: str, env: dict[str, str] | None = None) -> None:
    """encrypt then decrypt BINARY under ``key``; the blob must name that key."""
    blob = ok("key", "encrypt", key, *opts, home=home, input=BINARY, env=env)
    assert blob_key_version(blob)[0] == key
    assert BINARY not in blob
    assert ok("key", "decrypt", *opts, home=home, input=blob, env=env) == BINARY


# -- embedded token ------------------------------------------------------------------------


def test_hsm_init_creates_private_token_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = ok("hsm", "init", home=home).decode()
    assert "'encfs'" in out and "created" in out
    d = home / "softhsm"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for pin in ("user.pin", "so.pin"):
        st = (d / pin).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, pin
        assert st.st_size >= 16
    assert (d / "user.pin").read_bytes() != (d / "so.pin").read_bytes()
    pins = [(d / p).read_bytes() for p in ("user.pin", "so.pin")]
    tokens_before = sorted(p.name for p in (d / "tokens").iterdir())
    assert len(tokens_before) == 1

    again = ok("hsm", "init", home=home).decode()
    assert "already initialised" in again
    assert [(d / p).read_bytes() for p in ("user.pin", "so.pin")] == pins
    assert sorted(p.name for p in (d / "tokens").iterdir()) == tokens_before


def test_hsm_status_json(shared_home: Path) -> None:
    status = ok_json("hsm", "status", "--json", home=shared_home)
    assert status["Module"] == MODULE
    assert status["Token"] == "encfs"
    assert status["Mechanisms"]["CKM_AES_GCM"] is True
    assert all(status["Mechanisms"].values()), status["Mechanisms"]
    assert status["StateDirectory"] == str(shared_home)
    text = ok("hsm", "status", home=shared_home).decode()
    assert "CKM_AES_GCM: offered" in text


def test_hsm_status_without_token_fails_and_provisions_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fail("hsm", "status", home=home, needles=("hsm init",))
    assert not (home / "softhsm").exists()


def test_exit_codes_tell_the_kinds_of_failure_apart(shared_home: Path) -> None:
    """README "Exit codes": not found 66, key state 78, integrity 65, usage 2 (wrong PIN 77: above)."""
    key = create_key(shared_home)
    blob = bytearray(ok("key", "encrypt", key, home=shared_home, input=b"x"))
    fail("key", "describe", "no-such-key", home=shared_home, exit_code=66)
    blob[-1] ^= 1
    fail("key", "decrypt", home=shared_home, input=bytes(blob), exit_code=65)
    ok("key", "disable", key, home=shared_home)
    fail("key", "encrypt", key, home=shared_home, input=b"x", exit_code=78)
    proc = run_encfs("key", "create", "--no-such-flag", home=shared_home)
    assert proc.returncode == 2


def test_global_options_before_the_command(shared_home: Path, tmp_path: Path) -> None:
    """`encfs --home H --json key describe K` as `aws --profile P kms ...`: the same as after it."""
    nowhere = tmp_path / "not-a-home"  # ENCFS_HOME points here: only --home can find the store
    ok("key", "create", "--alias", "global-opts", home=shared_home)
    after = ok_json("key", "describe", "global-opts", "--home", str(shared_home), "--json", home=nowhere)
    before = ok_json("--home", str(shared_home), "--json", "key", "describe", "global-opts", home=nowhere)
    equals = ok_json(f"--home={shared_home}", "key", "describe", "global-opts", "--json", home=nowhere)
    assert before == after == equals and before["KeyId"]
    made = ok_json("--json", "init", str(tmp_path / "c"), "--key", "global-opts", home=shared_home)
    assert made["KeyId"] == before["KeyId"] and made["CipherDir"] == str(tmp_path / "c")  # every command: --json
    proc = run_encfs("--pin-file", str(tmp_path / "pin"), "umount", str(tmp_path / "c"), home=shared_home)
    assert proc.returncode == 2 and b"unrecognized arguments: --pin-file" in proc.stderr  # as if it came after


def test_missing_store_is_refused_and_nothing_created(tmp_path: Path) -> None:
    """A mistyped --home: every command but `hsm init` names the path it looked at, creates nothing."""
    home, empty = tmp_path / "mistyped-home", tmp_path / "empty-home"
    empty.mkdir()
    commands: list[tuple[str, ...]] = [
        ("key", "create", "--alias", "first"), ("key", "list"), ("key", "describe", "first"),
        ("key", "decrypt"), ("hsm", "status"), ("hsm", "protect-pin"), ("hsm", "backup", str(tmp_path / "b.bk")),
        ("init", str(tmp_path / "cipher"), "--key", "first")]
    for args in commands:
        msg = fail(*args, home=home, input=b"x", exit_code=66)
        assert msg == f"no key store at {home} (run 'encfs hsm init' to create one)", (args, msg)
    msg = fail("key", "create", home=empty, exit_code=66)  # an existing directory without a token
    assert msg == f"no key store at {empty} (run 'encfs hsm init' to create one)"
    assert not home.exists() and list(empty.iterdir()) == []
    assert not (tmp_path / "cipher").exists() and not (tmp_path / "b.bk").exists()
    out = ok("hsm", "init", home=home).decode()
    key = create_key(home, "--alias", "first")
    assert stat.S_IMODE((home / "softhsm" / "user.pin").stat().st_mode) == 0o600
    assert len(token_objects(home / "softhsm" / "tokens")) == 1
    assert f"back up the state directory {home}" in out
    proc = run_encfs("key", "create", "--alias", "second", home=home)  # each new key: one line
    assert proc.returncode == 0 and proc.stderr.decode() == f"encfs: note: back up the state directory {home}: " \
        "it holds the only copy of the token's keys (`encfs hsm backup FILE`)\n"
    roundtrip(home, key)


def test_embedded_wrong_pin(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("hsm", "init", home=home)
    key = create_key(home)
    blob = ok("key", "encrypt", key, home=home, input=b"x")
    pin = home / "softhsm" / "user.pin"
    good = pin.read_text()
    pin.write_text("not-the-pin")
    before = state(home)
    fail("key", "decrypt", home=home, input=blob, needles=("wrong PIN", "encfs"), exit_code=77)
    fail("key", "create", "--alias", "nope", home=home, needles=("wrong PIN",), exit_code=77)
    assert state(home) == before
    pin.write_text(good)
    assert ok("key", "decrypt", home=home, input=blob) == b"x"


# -- key management ---------------------------------------------------------------------------


def test_create_list_describe(shared_home: Path) -> None:
    meta = ok_json("key", "create", "--alias", "cld", "--description", "my first key", "--json",
                   home=shared_home)
    key = meta["KeyId"]
    assert str(uuid.UUID(key)) == key
    assert meta["Aliases"] == ["alias/cld"]
    assert meta["Description"] == "my first key"
    assert meta["KeyState"] == "Enabled" and meta["Origin"] == "TOKEN"
    assert meta["CurrentKeyVersion"] == 1

    plain = ok("key", "create", home=shared_home).decode()
    key2 = plain.strip()
    assert str(uuid.UUID(key2)) == key2 and plain.count("\n") == 1

    listed = ok_json("key", "list", "--json", home=shared_home)["Keys"]
    by_id = {k["KeyId"]: k for k in listed}
    assert by_id[key]["Description"] == "my first key" and by_id[key]["Aliases"] == ["alias/cld"]
    assert key2 in by_id
    text = ok("key", "list", home=shared_home).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(key))
    assert "Enabled" in line and "cld" in line and "my first key" in line

    desc = ok_json("key", "describe", "cld", "--json", home=shared_home)
    assert desc["KeyId"] == key
    assert desc["TokenAttributes"]["Sensitive"] is True  # PascalCase at every depth (docs/dev/cli.md)
    assert desc["TokenAttributes"]["Extractable"] is False
    assert ok_json("key", "describe", "alias/cld", "--json", home=shared_home)["KeyId"] == key
    text = ok("key", "describe", key, home=shared_home).decode()
    assert "KeyState" in text and "Enabled" in text and "my first key" in text


def test_create_with_taken_alias_creates_nothing(shared_home: Path) -> None:
    create_key(shared_home, "--alias", "taken")
    before = state(shared_home)
    listing = ok("key", "list", "--json", home=shared_home)
    fail("key", "create", "--alias", "taken", home=shared_home, needles=("alias/taken", "already exists"))
    fail("key", "create", "--alias", "bad alias!", home=shared_home, needles=("invalid alias",), exit_code=2)
    assert state(shared_home) == before
    assert ok("key", "list", "--json", home=shared_home) == listing


def test_alias_move_keeps_old_blobs_decryptable(shared_home: Path) -> None:
    k1, k2 = create_key(shared_home), create_key(shared_home)
    assert ok("key", "alias", "mover", k1, home=shared_home).decode().strip() == f"alias/mover -> {k1}"
    blob = ok("key", "encrypt", "mover", home=shared_home, input=b"aliased")
    assert blob_key_version(blob)[0] == k1
    ok("key", "alias", "alias/mover", k2, home=shared_home)
    aliases = ok_json("key", "aliases", "--json", home=shared_home)["Aliases"]
    assert {"AliasName": "alias/mover", "TargetKeyId": k2} in aliases
    # The blob names the key, not the alias: it still decrypts under k1.
    assert ok("key", "decrypt", home=shared_home, input=blob) == b"aliased"
    assert ok("key", "decrypt", "--key", k1, home=shared_home, input=blob) == b"aliased"
    # ...and insisting on the alias (now k2) is a mismatch naming both keys.
    msg = fail("key", "decrypt", "--key", "mover", home=shared_home, input=blob)
    assert k1 in msg and k2 in msg
    new = ok("key", "encrypt", "mover", home=shared_home, input=b"n")
    assert blob_key_version(new)[0] == k2
    ok("key", "alias", "--delete", "mover", home=shared_home)
    assert "alias/mover" not in {a["AliasName"] for a in
                                 ok_json("key", "aliases", "--json", home=shared_home)["Aliases"]}
    fail("key", "encrypt", "mover", home=shared_home, input=b"n", needles=("mover",))


def test_disable_enable(shared_home: Path) -> None:
    key, other = create_key(shared_home), create_key(shared_home)
    blob = ok("key", "encrypt", key, home=shared_home, input=b"state")
    other_blob = ok("key", "encrypt", other, home=shared_home, input=b"y")
    meta = ok_json("key", "disable", key, "--json", home=shared_home)
    assert meta["KeyState"] == "Disabled"
    assert ok_json("key", "describe", key, "--json", home=shared_home)["KeyState"] == "Disabled"
    before = state(shared_home)
    fail("key", "encrypt", key, home=shared_home, input=b"x", needles=("disabled", key))
    fail("key", "decrypt", home=shared_home, input=blob, needles=("disabled",))
    fail("key", "generate-data-key", key, home=shared_home, needles=("disabled",))
    fail("key", "rotate", key, home=shared_home, needles=("disabled",))
    fail("key", "enable-rotation", key, home=shared_home, needles=("disabled",))
    fail("key", "re-encrypt", "--to", key, home=shared_home, input=other_blob, needles=("disabled",))
    assert state(shared_home) == before
    assert ok("key", "enable", key, home=shared_home).decode().strip() == f"{key}: Enabled"
    assert ok("key", "decrypt", home=shared_home, input=blob) == b"state"


def test_schedule_and_cancel_deletion(shared_home: Path) -> None:
    key = create_key(shared_home, "--alias", "doomed")
    blob = ok("key", "encrypt", key, home=shared_home, input=b"bye")
    before = state(shared_home)
    fail("key", "schedule-deletion", key, "--days", "6", home=shared_home, needles=("7", "30", "6"), exit_code=2)
    fail("key", "schedule-deletion", key, "--days", "31", home=shared_home, exit_code=2)
    assert state(shared_home) == before
    meta = ok_json("key", "schedule-deletion", key, "--days", "7", "--json", home=shared_home)
    assert meta["KeyState"] == "PendingDeletion" and "DeletionDate" in meta
    fail("key", "encrypt", "doomed", home=shared_home, input=b"x", needles=("pending deletion",))
    fail("key", "decrypt", home=shared_home, input=blob, needles=("pending deletion",))
    fail("key", "schedule-deletion", key, "--days", "7", home=shared_home, needles=("already pending deletion",))
    meta = ok_json("key", "cancel-deletion", key, "--json", home=shared_home)
    assert meta["KeyState"] == "Disabled" and "DeletionDate" not in meta
    fail("key", "cancel-deletion", key, home=shared_home, needles=("not pending deletion",))
    ok("key", "enable", key, home=shared_home)
    assert ok("key", "decrypt", home=shared_home, input=blob) == b"bye"


def test_rotate_and_enable_rotation(shared_home: Path) -> None:
    key = create_key(shared_home)
    old = ok("key", "encrypt", key, home=shared_home, input=b"v1 data")
    assert blob_key_version(old) == (key, 1)
    out = ok("key", "rotate", key, home=shared_home).decode().strip()
    assert out == f"{key}: current version 2"
    meta = ok_json("key", "describe", key, "--json", home=shared_home)
    assert meta["CurrentKeyVersion"] == 2 and [v["Version"] for v in meta["KeyVersions"]] == [1, 2]
    new = ok("key", "encrypt", key, home=shared_home, input=b"v2 data")
    assert blob_key_version(new) == (key, 2)
    assert ok("key", "decrypt", home=shared_home, input=old) == b"v1 data"
    assert ok("key", "decrypt", home=shared_home, input=new) == b"v2 data"

    before = state(shared_home)
    fail("key", "enable-rotation", key, "--period-days", "89", home=shared_home, needles=("90",), exit_code=2)
    assert state(shared_home) == before
    meta = ok_json("key", "enable-rotation", key, "--period-days", "90", "--json", home=shared_home)
    assert meta["KeyRotationEnabled"] is True and meta["RotationPeriodInDays"] == 90
    assert "NextRotationDate" in meta
    meta = ok_json("key", "disable-rotation", key, "--json", home=shared_home)
    assert meta["KeyRotationEnabled"] is False
