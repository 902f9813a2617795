"""docs/FORMAT.md section 10 vectors: key store backup archives under a passphrase and under a recovery
key, checked against encfs.keys.backup and against cryptography directly (the spec's own words)."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.errors import ArchiveDamaged, WrongPassphrase
from encfs.keys import backup
from encfs.keys.backup import KIND_PASSPHRASE, KIND_RECOVERY_KEY, Secret

BK = {v["vector"]: v for v in parse_vectors(DOC.split("## 10. Key store backups", 1)[1].split("## 11. ", 1)[0])}


def hkdf(key: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=salt, info=info).derive(key)


def secret_of(v: dict[str, str]) -> Secret:
    if "passphrase" in v:
        return Secret(KIND_PASSPHRASE, v["passphrase"].encode())
    return Secret(KIND_RECOVERY_KEY, hexbytes(v["recovery_key"]))


def test_the_vectors_are_all_there() -> None:
    assert set(BK) == {"backup-passphrase", "backup-recovery-key"}
    assert hexbytes(BK["backup-recovery-key"]["recovery_key"]) == \
        hashlib.sha256(b"encfs FORMAT.md test vector recovery key").digest()


@pytest.mark.parametrize("name", ["backup-passphrase", "backup-recovery-key"])
def test_archive_vector(name: str) -> None:
    v = BK[name]
    salt, nonce, header, body = (hexbytes(v[k]) for k in ("salt", "nonce", "header", "body"))
    payload = v["payload"].encode()
    secret = secret_of(v)
    # the spec's words, with cryptography alone
    if secret.kind == KIND_PASSPHRASE:
        assert header[9:13] == bytes([KIND_PASSPHRASE, 10, 8, 1])
        master = Scrypt(salt=salt, length=32, n=1 << 10, r=8, p=1).derive(secret.value)
    else:
        assert header[9:13] == bytes([KIND_RECOVERY_KEY, 0, 0, 0])
        master = hkdf(secret.value, salt, b"encfs backup v1 recovery key", 32)
    check = hkdf(master, None, b"encfs backup v1 check", 16)
    assert header == b"ENCFSBAK\x01" + header[9:13] + salt + nonce + check and len(header) == 57
    aead_key = hkdf(master, None, b"encfs backup v1 aead", 32)
    assert AESGCM(aead_key).decrypt(nonce, body, header) == payload
    # the code writes and reads exactly this archive
    assert backup.seal(payload, secret, salt=salt, nonce=nonce, log2_n=10) == header + body
    assert backup.open_archive(header + body, secret, "v") == payload
    files, meta = backup.unpack_payload(payload, "v")
    assert files == {"keys.json": b'{"aliases":{},"format":1,"keys":{}}\n',
                     "softhsm/tokens/t/token.object": b"token object bytes", "softhsm/user.pin": b"user-pin"}
    assert backup.pack_payload(files, 1700000000.0, meta["source"]) == payload


def test_wrong_secret_and_damage_are_told_apart() -> None:
    v = BK["backup-passphrase"]
    archive = hexbytes(v["header"]) + hexbytes(v["body"])
    with pytest.raises(WrongPassphrase):
        backup.open_archive(archive, Secret(KIND_PASSPHRASE, b"not the passphrase"), "v")
    for at in (29, 57, len(archive) - 1):  # nonce, body, tag
        bad = bytearray(archive)
        bad[at] ^= 1
        with pytest.raises(ArchiveDamaged, match="failed authentication"):
            backup.open_archive(bytes(bad), secret_of(v), "v")


@pytest.mark.parametrize("path", ["../keys.json", "/etc/passwd", "softhsm/tokens/../../x", "softhsm/tokens/.a/b",
                                  "softhsm/tokens/a/b/c", "softhsm/softhsm2.conf", "audit.log"])
def test_payload_paths_outside_the_store_are_refused(path: str) -> None:
    payload = json.dumps({"format": 1, "files": [{"path": "softhsm/tokens/t/token.object", "data": ""},
                                                 {"path": "softhsm/user.pin", "data": ""},
                                                 {"path": path, "data": ""}]}).encode()
    with pytest.raises(ArchiveDamaged, match="unexpected path"):
        backup.unpack_payload(payload, "v")


def test_payload_without_a_token_or_its_pin_is_refused() -> None:
    for files, why in (([{"path": "keys.json", "data": ""}, {"path": "softhsm/user.pin", "data": ""}], "no token"),
                       ([{"path": "softhsm/tokens/t/token.object", "data": ""}], "no PIN")):
        with pytest.raises(ArchiveDamaged, match=why):
            backup.unpack_payload(json.dumps({"format": 1, "files": files}).encode(), "v")
