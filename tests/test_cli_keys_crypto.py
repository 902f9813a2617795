"""The ``encfs key`` cryptographic commands end to end (encrypt, decrypt, generate-data-key,
re-encrypt, audit), the one-line error contract, and BYOK import: real subprocesses, a real
SoftHSM2 token, no mocks.

Error contract (issue): every failure prints exactly one line ``encfs: <cause>``
on stderr, exits non-zero, shows no traceback and leaves no half-created state.

Most tests share one provisioned embedded home per module (``shared_home``, cli_helpers.py)
and create their own keys there; tests that need a pristine home get their own.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

from cli_helpers import (
    BINARY,
    EMPTY_CONTEXT,
    HEADER_LEN,
    audit_lines,
    blob_key_version,
    create_key,
    fail,
    fails,
    ok,
    ok_json,
    shared_home,
    state,
)
from conftest import run_encfs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["shared_home"]  # the fixture, used by name


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
