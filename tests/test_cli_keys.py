"""The ``encfs`` CLI end to end: real subprocesses, real SoftHSM2 tokens, no mocks.

Error contract (issue): every failure prints exactly one line ``encfs: <cause>``
on stderr, exits non-zero, shows no traceback and leaves no half-created state.

Most tests share one provisioned embedded home (``shared_home``) and create
their own keys there; tests that need a pristine home get their own. The
"vendor HSM" tests point the real-HSM code path (--pkcs11-module, --token,
--pin-file/--pin-env, pkcs11: URIs, config files) at a separate SoftHSM2 token
provisioned by the test itself.

Not tested: a locked token. SoftHSM2 2.6.1 never sets CKF_USER_PIN_LOCKED
(20 wrong C_Login calls in one process and 12 across processes all gave
CKR_PIN_INCORRECT, and the right PIN still worked afterwards), so the
PinLocked path cannot be reached without faking the token.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs.keys.softhsm import EmbeddedSoftHSM, softhsm_module
from conftest import run_encfs

MODULE = softhsm_module()
HEADER_LEN = 45  # docs/FORMAT.md "Ciphertext blob v1"
EMPTY_CONTEXT = b"\x00\x00"
BINARY = bytes(range(256)) * 3 + b"\x00\x00\x00end\x00"


# -- helpers -------------------------------------------------------------------------


def ok(*args: str, home: Path, input: bytes = b"", env: dict[str, str] | None = None) -> bytes:
    """Run encfs, insist on success, return stdout."""
    proc = run_encfs(*args, home=home, input=input, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode(errors="replace"))
    assert b"Traceback" not in proc.stderr
    return proc.stdout


def ok_json(*args: str, home: Path, input: bytes = b"", env: dict[str, str] | None = None) -> Any:
    return json.loads(ok(*args, home=home, input=input, env=env))


def fails(proc: subprocess.CompletedProcess[bytes], *needles: str, exit_code: int | None = None) -> str:
    """Assert the one-line error contract; return the message (without 'encfs: ')."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"expected failure, got success; stdout={proc.stdout[:200]!r}"
    if exit_code is not None:
        assert proc.returncode == exit_code, (proc.returncode, err)
    assert "Traceback" not in err and b"Traceback" not in proc.stdout, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line: {err!r}"
    assert err.startswith("encfs: "), err
    assert "internal error" not in err, err
    msg = err[len("encfs: "):].rstrip("\n")
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


def fail(*args: str, home: Path, needles: tuple[str, ...] = (), input: bytes = b"",
         env: dict[str, str] | None = None, exit_code: int | None = None) -> str:
    return fails(run_encfs(*args, home=home, input=input, env=env), *needles, exit_code=exit_code)


def token_objects(tokendir: Path) -> list[str]:
    """Names of the token objects SoftHSM2 stores on disk (one file per object)."""
    return sorted(p.name for p in tokendir.glob("*/*.object") if p.name != "token.object")


def state(home: Path, tokendir: Path | None = None) -> tuple[bytes | None, list[str]]:
    """Everything a failed command must leave alone: key metadata and token objects."""
    keys = home / "keys.json"
    return (keys.read_bytes() if keys.exists() else None,
            token_objects(tokendir or home / "softhsm" / "tokens"))


def create_key(home: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    meta = ok_json("key", "create", "--json", *extra, home=home, env=env)
    return str(meta["KeyId"])


def blob_key_version(blob: bytes) -> tuple[str, int]:
    return str(uuid.UUID(bytes=blob[5:21])), int.from_bytes(blob[21:25], "big")


def audit_lines(home: Path) -> list[str]:
    return (home / "audit.log").read_text().splitlines()


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("shared") / "home"
    out = ok("hsm", "init", home=home).decode()
    assert "created" in out
    return home


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A SoftHSM2 token encfs did not provision itself: the stand-in for a vendor HSM."""
    base = tmp_path_factory.mktemp("vendor")
    emb = EmbeddedSoftHSM(base)
    assert emb.provision()  # C_InitToken in a child process; this process never loads SoftHSM2
    pin = emb.user_pin.read_text().strip()
    return {"conf": str(emb.conf), "pin_file": str(emb.user_pin), "pin": pin, "tokendir": emb.tokendir,
            "env": {"SOFTHSM2_CONF": str(emb.conf)}}


def vendor_args(v: dict[str, Any]) -> tuple[str, ...]:
    return ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", v["pin_file"])


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


# -- cryptographic operations ---------------------------------------------------------------


def test_encrypt_decrypt_binary_raw_and_base64(shared_home: Path) -> None:
    key = create_key(shared_home, "--alias", "bin")
    blob = ok("key", "encrypt", "bin", home=shared_home, input=BINARY)
    assert blob[:3] == b"EKB" and len(blob) == HEADER_LEN + len(BINARY) + 16
    assert ok("key", "decrypt", home=shared_home, input=blob) == BINARY
    assert ok("key", "decrypt", "--key", "bin", home=shared_home, input=blob) == BINARY

    b64 = ok("key", "encrypt", key, "--base64", home=shared_home, input=BINARY)
    assert b64.endswith(b"\n") and b64.count(b"\n") == 1
    assert ok("key", "decrypt", "--base64", home=shared_home, input=b64) == BINARY
    out = ok("key", "decrypt", "--base64", "--base64-out", home=shared_home, input=b64)
    assert base64.b64decode(out) == BINARY
    # Empty plaintext and exactly 4096 bytes are fine.
    assert ok("key", "decrypt", home=shared_home,
              input=ok("key", "encrypt", key, home=shared_home, input=b"")) == b""
    big = os.urandom(4096)
    assert ok("key", "decrypt", home=shared_home,
              input=ok("key", "encrypt", key, home=shared_home, input=big)) == big


def test_encryption_context(shared_home: Path) -> None:
    key = create_key(shared_home)
    ctx = ("--context", "purpose=test", "--context", "user=alice")
    blob = ok("key", "encrypt", key, *ctx, home=shared_home, input=b"ctx data")
    # Order of pairs does not matter.
    assert ok("key", "decrypt", "--context", "user=alice", "--context", "purpose=test",
              home=shared_home, input=blob) == b"ctx data"
    fail("key", "decrypt", home=shared_home, input=blob, needles=("context",))
    fail("key", "decrypt", "--context", "purpose=test", "--context", "user=bob",
         home=shared_home, input=blob, needles=("context",))
    fail("key", "decrypt", "--context", "novalue", home=shared_home, input=blob,
         needles=("KEY=VALUE",), exit_code=2)


def test_generate_data_key(shared_home: Path) -> None:
    key = create_key(shared_home)
    dk = ok_json("key", "generate-data-key", key, "--context", "file=a", home=shared_home)
    assert dk["KeyId"] == key and dk["KeyVersion"] == 1
    plaintext = base64.b64decode(dk["Plaintext"], validate=True)
    assert len(plaintext) == 32
    blob = base64.b64decode(dk["CiphertextBlob"], validate=True)
    assert plaintext not in blob
    got = ok("key", "decrypt", "--base64", "--context", "file=a", home=shared_home,
             input=dk["CiphertextBlob"].encode())
    assert got == plaintext
    fail("key", "decrypt", "--base64", home=shared_home, input=dk["CiphertextBlob"].encode(),
         needles=("context",))

    wp = ok_json("key", "generate-data-key", key, "--without-plaintext", home=shared_home)
    assert "Plaintext" not in wp and wp["KeyId"] == key
    hidden = ok("key", "decrypt", home=shared_home, input=base64.b64decode(wp["CiphertextBlob"]))
    assert len(hidden) == 32 and hidden != plaintext

    n16 = ok_json("key", "generate-data-key", key, "--number-of-bytes", "16", home=shared_home)
    assert len(base64.b64decode(n16["Plaintext"])) == 16


def test_re_encrypt(shared_home: Path) -> None:
    k1, k2 = create_key(shared_home), create_key(shared_home)
    blob = ok("key", "encrypt", k1, "--context", "a=1", home=shared_home, input=BINARY)
    moved = ok("key", "re-encrypt", "--to", k2, "--context", "a=1", home=shared_home, input=blob)
    assert blob_key_version(moved)[0] == k2 and BINARY not in moved
    assert ok("key", "decrypt", "--key", k2, "--context", "a=1", home=shared_home, input=moved) == BINARY
    fail("key", "decrypt", "--key", k1, "--context", "a=1", home=shared_home, input=moved,
         needles=(k1, k2))

    b64 = ok("key", "re-encrypt", "--to", k2, "--context", "a=1", "--to-context", "b=2", "--base64-out",
             home=shared_home, input=blob)
    assert ok("key", "decrypt", "--base64", "--context", "b=2", home=shared_home, input=b64) == BINARY
    fail("key", "decrypt", "--base64", "--context", "a=1", home=shared_home, input=b64, needles=("context",))
    fail("key", "re-encrypt", "--to", k2, home=shared_home, input=blob, needles=("context",))
    fail("key", "re-encrypt", "--to", "no-such-key", "--context", "a=1", home=shared_home, input=blob,
         needles=("no-such-key",))


def test_audit_trail(shared_home: Path) -> None:
    key = create_key(shared_home)
    dk = ok_json("key", "generate-data-key", key, "--context", "who=audit", home=shared_home)
    secret = base64.b64decode(dk["Plaintext"])
    ok("key", "decrypt", "--base64", "--context", "who=audit", home=shared_home,
       input=dk["CiphertextBlob"].encode())
    fail("key", "decrypt", "--base64", home=shared_home, input=dk["CiphertextBlob"].encode())

    records = ok_json("key", "audit", "--json", "--key", key, home=shared_home)["Records"]
    assert records and all(key in (r.get("KeyId"), r.get("DestinationKeyId")) for r in records)
    ops = [(r["Operation"], r["Outcome"]) for r in records]
    assert ops[0] == ("CreateKey", "success")
    assert ("GenerateDataKey", "success") in ops
    assert ("Decrypt", "success") in ops and ("Decrypt", "failure") in ops
    gdk = next(r for r in records if r["Operation"] == "GenerateDataKey")
    assert gdk["EncryptionContext"] == {"who": "audit"} and gdk["KeyVersion"] == 1
    assert gdk["Principal"]["Uid"] == os.getuid()
    failure = next(r for r in records if r["Outcome"] == "failure")
    assert "context" in failure["Error"]

    text = ok("key", "audit", "--key", key, home=shared_home).decode()
    assert "GenerateDataKey" in text and "who=audit" in text
    assert len(ok_json("key", "audit", "--json", "--tail", "2", home=shared_home)["Records"]) == 2
    # Never the data key: not raw, not base64, not hex, neither in output nor in the log file.
    raw_log = (shared_home / "audit.log").read_bytes()
    for haystack in (raw_log, text.encode(), json.dumps(records).encode()):
        assert secret not in haystack
        assert base64.b64encode(secret) not in haystack
        assert secret.hex().encode() not in haystack


# -- the one-line error contract ----------------------------------------------------------------


def test_unknown_key_or_alias(shared_home: Path) -> None:
    before = state(shared_home)
    listing = ok("key", "list", "--json", home=shared_home)
    ghost = str(uuid.uuid4())
    fail("key", "describe", "nosuchalias", home=shared_home, needles=("nosuchalias",))
    fail("key", "encrypt", "alias/nosuchalias", home=shared_home, input=b"x", needles=("nosuchalias",))
    fail("key", "encrypt", ghost, home=shared_home, input=b"x", needles=(ghost, "does not exist"))
    fail("key", "generate-data-key", ghost, home=shared_home, needles=(ghost,))
    fail("key", "disable", ghost, home=shared_home, needles=(ghost,))
    fail("key", "alias", "orphan", ghost, home=shared_home, needles=(ghost,))
    fail("key", "alias", "--delete", "nosuchalias", home=shared_home, needles=("nosuchalias", "does not exist"))
    fail("key", "audit", "--key", "nosuchalias", home=shared_home, needles=("nosuchalias",))
    # A well-formed blob naming a key this home never had.
    other = shared_home.parent / "other"
    ok("hsm", "init", home=other)
    blob = ok("key", "encrypt", create_key(other), home=other, input=b"elsewhere")
    fail("key", "decrypt", home=shared_home, input=blob, needles=("does not exist",))
    assert state(shared_home) == before
    assert ok("key", "list", "--json", home=shared_home) == listing


def test_tampered_and_truncated_blobs(shared_home: Path) -> None:
    key = create_key(shared_home)
    blob = ok("key", "encrypt", key, home=shared_home, input=b"precious bytes")
    assert ok("key", "decrypt", home=shared_home, input=blob) == b"precious bytes"
    before = state(shared_home)

    def flipped(i: int) -> bytes:
        b = bytearray(blob)
        b[i] ^= 0x01
        return bytes(b)

    fail("key", "decrypt", home=shared_home, input=flipped(len(blob) - 20), needles=("tampered",))  # ciphertext
    fail("key", "decrypt", home=shared_home, input=flipped(len(blob) - 1), needles=("tampered",))  # tag
    fail("key", "decrypt", home=shared_home, input=flipped(40), needles=("tampered",))  # nonce
    fail("key", "decrypt", home=shared_home, input=blob + b"\x00", needles=("tampered",))
    fail("key", "decrypt", home=shared_home, input=blob[:-1], needles=("tampered",))
    fail("key", "decrypt", home=shared_home, input=flipped(0), needles=("not an encfs ciphertext blob",))
    fail("key", "decrypt", home=shared_home, input=flipped(3), needles=("version",))
    fail("key", "decrypt", home=shared_home, input=flipped(4), needles=("algorithm",))
    fail("key", "decrypt", home=shared_home, input=flipped(22), needles=("version",))  # key version
    for n in (0, 10, HEADER_LEN, HEADER_LEN + 15):
        fail("key", "decrypt", home=shared_home, input=blob[:n], needles=("truncated",))
    fail("key", "decrypt", "--base64", home=shared_home, input=b"not base64!!", needles=("base64",), exit_code=2)
    fail("key", "re-encrypt", "--to", key, home=shared_home, input=blob[:30], needles=("truncated",))
    assert state(shared_home) == before
    assert ok("key", "decrypt", home=shared_home, input=blob) == b"precious bytes"


def test_plaintext_over_4kib(shared_home: Path) -> None:
    key = create_key(shared_home)
    lines_before = len(audit_lines(shared_home))
    before = state(shared_home)
    proc = run_encfs("key", "encrypt", key, home=shared_home, input=os.urandom(4097))
    fails(proc, "4096", exit_code=2)
    assert proc.stdout == b""
    fail("key", "encrypt", key, home=shared_home, input=b"\x00" * 100_000, needles=("4096",), exit_code=2)
    assert state(shared_home) == before
    assert len(audit_lines(shared_home)) == lines_before  # rejected before the service was opened


def test_invalid_arguments_are_one_line(shared_home: Path) -> None:
    key = create_key(shared_home)
    fail("key", "generate-data-key", key, "--number-of-bytes", "0", home=shared_home, needles=("1024",),
         exit_code=2)
    fail("key", "import", key, "--wrapped-material", str(shared_home / "missing.bin"), "--import-token", "x",
         home=shared_home, needles=("missing.bin",), exit_code=2)
    fail("key", "get-parameters-for-import", key, "--public-key-out", str(shared_home / "p.pem"),
         home=shared_home, needles=("EXTERNAL",))
    assert not (shared_home / "p.pem").exists()
    # An unwritable public-key file is a usage error, reported before new import parameters exist.
    ext = create_key(shared_home, "--origin", "external")
    before = state(shared_home)
    nowhere = str(shared_home / "no-such-dir" / "p.pem")
    fail("key", "get-parameters-for-import", ext, "--public-key-out", nowhere, home=shared_home,
         needles=(nowhere,), exit_code=2)
    assert state(shared_home) == before


def test_state_directory_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    for home in (blocker, blocker / "sub"):
        for args in (("hsm", "init"), ("key", "create"), ("key", "list")):
            fail(*args, home=home, needles=("state directory", str(home)))
    assert blocker.read_text() == "not a directory"


# -- BYOK -----------------------------------------------------------------------------------------


def _wrap(pem_path: Path, material: bytes) -> bytes:
    pub = serialization.load_pem_public_key(pem_path.read_bytes())
    return pub.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),
                                              label=None))


def test_byok_import(shared_home: Path, tmp_path: Path) -> None:
    meta = ok_json("key", "create", "--origin", "external", "--alias", "byok", "--json", home=shared_home)
    key = meta["KeyId"]
    assert meta["Origin"] == "EXTERNAL" and meta["KeyState"] == "PendingImport"
    fail("key", "encrypt", key, home=shared_home, input=b"x", needles=("pending import",))

    pem = tmp_path / "wrapping.pem"
    params = ok_json("key", "get-parameters-for-import", "byok", "--public-key-out", str(pem), home=shared_home)
    assert params["KeyId"] == key and params["WrappingAlgorithm"] == "RSAES_OAEP_SHA_1"
    assert params["ImportToken"] and params["PublicKeyFile"] == str(pem)
    material = os.urandom(32)
    wrapped = tmp_path / "wrapped.bin"
    wrapped.write_bytes(_wrap(pem, material))

    before = state(shared_home)
    fail("key", "import", key, "--wrapped-material", str(wrapped), "--import-token", "0" * 32,
         home=shared_home, needles=("import token",))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(384))
    fail("key", "import", key, "--wrapped-material", str(junk), "--import-token", params["ImportToken"],
         home=shared_home, needles=("unwrap",))
    short = tmp_path / "short.bin"
    short.write_bytes(_wrap(pem, os.urandom(16)))
    fail("key", "import", key, "--wrapped-material", str(short), "--import-token", params["ImportToken"],
         home=shared_home, needles=("16 bytes", "32"))
    fail("key", "import", key, "--wrapped-material", str(wrapped), "--import-token", params["ImportToken"],
         "--valid-to", "yesterday", home=shared_home, needles=("ISO 8601",), exit_code=2)
    assert state(shared_home) == before
    assert ok_json("key", "describe", key, "--json", home=shared_home)["KeyState"] == "PendingImport"

    meta = ok_json("key", "import", key, "--wrapped-material", str(wrapped), "--import-token",
                   params["ImportToken"], "--valid-to", "2999-01-01T00:00:00Z", "--json", home=shared_home)
    assert meta["KeyState"] == "Enabled"
    assert meta["ExpirationModel"] == "KEY_MATERIAL_EXPIRES" and meta["ValidTo"].startswith("2999-01-01")

    blob = ok("key", "encrypt", "byok", home=shared_home, input=BINARY)
    assert ok("key", "decrypt", home=shared_home, input=blob) == BINARY
    # The token really uses *our* material: open the blob with it in this process.
    nonce = blob[33:HEADER_LEN]
    assert AESGCM(material).decrypt(nonce, blob[HEADER_LEN:], blob[:HEADER_LEN] + EMPTY_CONTEXT) == BINARY
    # The import token is single-use.
    fail("key", "import", key, "--wrapped-material", str(wrapped), "--import-token", params["ImportToken"],
         home=shared_home, needles=("import",))
    fail("key", "rotate", key, home=shared_home, needles=("imported",))
    audit = ok_json("key", "audit", "--json", "--key", key, home=shared_home)["Records"]
    ops = {r["Operation"] for r in audit}
    assert {"CreateKey", "GetParametersForImport", "ImportKeyMaterial", "Encrypt", "Decrypt"} <= ops
    raw_log = (shared_home / "audit.log").read_bytes()
    assert material not in raw_log and material.hex().encode() not in raw_log
    assert base64.b64encode(material) not in raw_log


# -- a real-HSM code path: SoftHSM2 as the vendor module --------------------------------------------


def _vendor_roundtrip(home: Path, v: dict[str, Any], *sel: str, env: dict[str, str] | None = None) -> None:
    env = {**v["env"], **(env or {})}
    objects_before = token_objects(v["tokendir"])
    ok("hsm", "init", *sel, home=home, env=env)  # a module's key store (keys.json) is made here only
    key = create_key(home, "--alias", "vendor", *sel, env=env)
    assert len(token_objects(v["tokendir"])) == len(objects_before) + 1  # the CMK is on the vendor token
    assert not (home / "softhsm").exists()  # and the embedded token was never provisioned
    blob = ok("key", "encrypt", "vendor", *sel, home=home, input=BINARY, env=env)
    assert blob_key_version(blob)[0] == key
    assert ok("key", "decrypt", *sel, home=home, input=blob, env=env) == BINARY
    dk = ok_json("key", "generate-data-key", "vendor", *sel, home=home, env=env)
    assert len(base64.b64decode(dk["Plaintext"])) == 32


def test_vendor_module_pin_file(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    _vendor_roundtrip(home, vendor, *vendor_args(vendor))
    status = ok_json("hsm", "status", "--json", *vendor_args(vendor), home=home, env=vendor["env"])
    assert status["Module"] == MODULE and status["Token"] == "encfs"
    assert "reachable" in ok("hsm", "init", *vendor_args(vendor), home=home, env=vendor["env"]).decode()
    assert not (home / "softhsm").exists()


def test_vendor_module_pin_env(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    sel = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-env", "MY_HSM_PIN")
    _vendor_roundtrip(home, vendor, *sel, env={"MY_HSM_PIN": vendor["pin"]})
    fail("key", "encrypt", "vendor", *sel, home=home, input=b"x", env=vendor["env"],
         needles=("MY_HSM_PIN", "not set"))
    fail("key", "encrypt", "vendor", *sel, home=home, input=b"x",
         env={**vendor["env"], "MY_HSM_PIN": "wrong-pin"}, needles=("wrong PIN",))


def test_vendor_pkcs11_uri(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    uri = f"pkcs11:token=encfs?module-path={MODULE}&pin-source=file:{vendor['pin_file']}"
    _vendor_roundtrip(home, vendor, "--pkcs11-uri", uri)
    # A bare path as pin-source means a file (RFC 7512); percent-encoding is decoded.
    uri2 = f"pkcs11:token=%65ncfs?module-path={MODULE}&pin-source={vendor['pin_file']}"
    assert ok_json("hsm", "status", "--json", "--pkcs11-uri", uri2, home=home, env=vendor["env"])["Token"] == "encfs"


def test_vendor_config_file_in_home(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[hsm]\nmodule = "{MODULE}"\ntoken = "encfs"\npin-file = "{vendor["pin_file"]}"\n')
    _vendor_roundtrip(home, vendor)


def test_vendor_config_file_explicit(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text(f'[hsm]\nuri = "pkcs11:token=encfs?module-path={MODULE}"\npin-env = "CFG_PIN"\n')
    _vendor_roundtrip(home, vendor, "--config", str(cfg), env={"CFG_PIN": vendor["pin"]})
    fail("key", "list", "--config", str(tmp_path / "nope.toml"), home=home, env=vendor["env"],
         needles=("config file not found", "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[hsm]\nmodule = "x"\npassword = "1234"\n')
    fail("key", "list", "--config", str(bad), home=home, needles=("password",))
    bad.write_text("[hsm\n")
    fail("key", "list", "--config", str(bad), home=home, needles=("bad.toml",))


def vendor_home(tmp_path: Path, v: dict[str, Any]) -> Path:
    """A home whose key store lives on the vendor token (`encfs hsm init` made its keys.json)."""
    home = tmp_path / "home"
    assert "created" in ok("hsm", "init", *vendor_args(v), home=home, env=v["env"]).decode()
    return home


def test_vendor_wrong_pin_changes_nothing(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    sel = vendor_args(vendor)
    key = create_key(home, "--alias", "v", *sel, env=vendor["env"])
    blob = ok("key", "encrypt", key, *sel, home=home, input=b"vendor secret", env=vendor["env"])
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000\n")
    bad = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", str(wrong))
    before = state(home, vendor["tokendir"])
    for args, stdin in ((("key", "create", "--alias", "w"), b""), (("key", "encrypt", key), b"x"),
                        (("key", "decrypt"), blob), (("key", "rotate", key), b""),
                        (("hsm", "status"), b"")):
        msg = fail(*args, *bad, home=home, input=stdin, env=vendor["env"], needles=("wrong PIN", "'encfs'"))
        assert "0000" not in msg
    assert state(home, vendor["tokendir"]) == before
    fail("key", "decrypt", "--pkcs11-module", MODULE, "--token", "encfs", "--pin-file",
         str(tmp_path / "absent.pin"), home=home, input=blob, env=vendor["env"], needles=("absent.pin",))
    assert ok("key", "decrypt", *sel, home=home, input=blob, env=vendor["env"]) == b"vendor secret"


def test_vendor_missing_module(tmp_path: Path, vendor: dict[str, Any]) -> None:
    """A module that is gone (README "Exit codes": a PKCS#11 module not found is 66)."""
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    missing = str(tmp_path / "libvendor-pkcs11.so")
    fail("key", "create", "--pkcs11-module", missing, "--token", "encfs", "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("PKCS#11 module not found", missing), exit_code=66)
    fail("key", "create", "--pkcs11-uri", f"pkcs11:token=encfs?module-path={missing}",
         "--pin-file", vendor["pin_file"], home=home, env=vendor["env"], needles=("PKCS#11 module not found",),
         exit_code=66)
    notlib = tmp_path / "notalib.so"
    notlib.write_bytes(b"this is not an ELF file")
    fail("key", "create", "--pkcs11-module", str(notlib), "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("notalib.so",))
    # `hsm init` makes nothing either when the module cannot be loaded.
    fail("hsm", "init", "--pkcs11-module", missing, "--pin-file", vendor["pin_file"], home=tmp_path / "new",
         env=vendor["env"], needles=(missing,), exit_code=66)
    assert state(home, vendor["tokendir"]) == before and not (home / "softhsm").exists()
    assert not (tmp_path / "new" / "keys.json").exists()


def test_vendor_unknown_token_label(tmp_path: Path, vendor: dict[str, Any]) -> None:
    """A label no token has (README "Exit codes": a token not found is 66)."""
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    fail("key", "create", "--pkcs11-module", MODULE, "--token", "prod-hsm-7", "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("prod-hsm-7",), exit_code=66)
    fail("hsm", "status", "--pkcs11-uri", f"pkcs11:token=nope;serial=1?module-path={MODULE}",
         "--pin-file", vendor["pin_file"], home=home, env=vendor["env"], needles=("nope",), exit_code=66)
    fail("hsm", "init", "--pkcs11-module", MODULE, "--token", "prod-hsm-7", "--pin-file", vendor["pin_file"],
         home=tmp_path / "new", env=vendor["env"], needles=("prod-hsm-7",), exit_code=66)
    assert state(home, vendor["tokendir"]) == before
    assert not (tmp_path / "new" / "keys.json").exists()


def test_vendor_bad_uris(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    cases = {
        "token=encfs": "pkcs11:",
        f"pkcs11:token=encfs?module-path={MODULE}&color=blue": "color",
        f"pkcs11:token=encfs;flavour=x?module-path={MODULE}": "flavour",
        f"pkcs11:token?module-path={MODULE}": "without '='",
        f"pkcs11:token=a;token=b?module-path={MODULE}": "twice",
        f"pkcs11:slot-id=one?module-path={MODULE}": "slot-id",
        "pkcs11:token=encfs?module-name=softhsm2": "module-path",
        f"pkcs11:token=encfs?module-path={MODULE}&pin-source=ftp:x": "PIN file ftp:x",
    }
    for uri, needle in cases.items():
        fail("key", "create", "--pkcs11-uri", uri, home=home, env=vendor["env"], needles=(needle,))
    fail("key", "create", "--token", "encfs", "--pin-file", vendor["pin_file"], home=home, env=vendor["env"],
         needles=("--pkcs11-module",))
    assert state(home, vendor["tokendir"]) == before and not (home / "softhsm").exists()


def test_vendor_no_pin_source_without_tty(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    keys = (home / "keys.json").read_bytes()
    before = token_objects(vendor["tokendir"])
    fail("key", "create", "--pkcs11-module", MODULE, "--token", "encfs", home=home, env=vendor["env"],
         needles=("--pin-file", "'encfs'"))
    fail("key", "create", "--pkcs11-uri", f"pkcs11:token=encfs?module-path={MODULE}", home=home,
         env=vendor["env"], needles=("--pin-file",))
    assert token_objects(vendor["tokendir"]) == before
    assert (home / "keys.json").read_bytes() == keys
