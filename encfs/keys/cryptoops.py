"""Cryptographic operations for KeyService (service.py): generating data keys, encrypting,
decrypting and re-encrypting blobs under a CMK, and the unaudited checks of whether a key or
a data key may still be used. KeyService takes these methods from CryptographicOperations.
Of service.py's invariants, these methods keep:

- Data keys come from the token's RNG, and every blob is sealed with AES-256-GCM computed by
  the token under the key's current backing-key version (the key material stays there).
- Every operation requires the key to be Enabled, against fresh metadata (KeyService._db),
  also on a data-key cache hit; a token call that fails on a key keys.json calls Enabled is
  reported as a rollback (KeyService._token_use).
- Every call that reaches the token is audited with ids, versions and contexts, never with
  key material or plaintext; cache hits reach no token and are not audited.
- Encryption-context keys starting with ``encfs:`` are refused for encrypt, generate_data_key(s)
  and the destination of re_encrypt unless ``encfs_internal``; decrypt accepts them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from encfs.errors import ContextMismatch, EncfsError, InvalidCiphertext, KeyStateError, UsageError
from encfs.keys.audit import iso_time
from encfs.keys.blob import NONCE_LEN, BlobHeader, CiphertextBlob
from encfs.keys.cache import DataKeyCache
from encfs.keys.context import EncryptionContext, context_digest, encode_context
from encfs.keys.metadata import ENABLED, KeyDB, KeyRecord
from encfs.keys.servicefields import ServiceFields
from encfs.keys.token import TagMismatch

MAX_ENCRYPT_PLAINTEXT = 4096
MAX_DATA_KEY_BYTES = 1024
RESERVED_CONTEXT_PREFIX = "encfs:"


@dataclass(frozen=True)
class DataKey:
    """Result of generate_data_key; ``plaintext`` is None for the WithoutPlaintext form."""

    key_id: str
    key_version: int
    plaintext: bytes | None
    ciphertext_blob: bytes


@dataclass(frozen=True)
class Decrypted:
    key_id: str
    key_version: int
    plaintext: bytes


def _check_context(context: EncryptionContext, encfs_internal: bool, what: str = "encryption context") -> None:
    """Refuse the reserved ``encfs:`` keys unless encfs itself is the caller."""
    if encfs_internal:
        return
    for name in context:
        if name.startswith(RESERVED_CONTEXT_PREFIX):
            raise UsageError(f"{what} key {name!r}: keys starting with {RESERVED_CONTEXT_PREFIX!r} are reserved "
                             f"for encfs's own file headers and volume keys")


def _names_key(db: KeyDB, ref: str, key_id: str) -> bool:
    """Whether the id or alias ``ref`` currently names ``key_id``."""
    try:
        return db.resolve(ref).key_id == key_id
    except EncfsError:
        return False


class CryptographicOperations(ServiceFields):
    """The cryptographic operations of service.KeyService (a mixin: the service's state)."""

    # -- sealing and opening one blob ---------------------------------------

    def _seal(self, rec: KeyRecord, plaintext: bytes, encoded_context: bytes, operation: str,
              info: dict[str, Any]) -> bytes:
        version = rec.current
        header = BlobHeader(uuid.UUID(rec.key_id), version.version,
                            context_digest(encoded_context), os.urandom(NONCE_LEN))
        with self._token_use(rec, version, operation, info):
            sealed = self.token.encrypt_gcm(bytes.fromhex(version.token_id), header.nonce,
                                            header.pack() + encoded_context, plaintext)
        return CiphertextBlob(header, sealed).pack()

    def _open_blob(self, db: KeyDB, blob: CiphertextBlob, encoded_context: bytes,
                   operation: str, info: dict[str, Any], expected_key: str | None) -> bytes:
        key_id = str(blob.header.key_id)
        info["key_id"], info["key_version"] = key_id, blob.header.key_version
        if key_id not in db.keys and key_id not in db.deleted:
            # Never a key here: a corrupt blob (or one from another key store), not a lookup miss.
            raise InvalidCiphertext(f"ciphertext blob names key {key_id}, which does not exist")
        rec = db.resolve(key_id)
        if expected_key is not None:
            want = db.resolve(expected_key).key_id
            if want != key_id:
                raise InvalidCiphertext(f"ciphertext blob was encrypted under key {key_id}, not {want}")
        self._require(rec, operation)
        version = rec.version(blob.header.key_version)
        if version is None:
            raise InvalidCiphertext(
                f"ciphertext blob names version {blob.header.key_version} of key {key_id}, which does not exist")
        if version.retired is not None:
            raise KeyStateError(f"ciphertext blob names version {version.version} of key {key_id}, which was "
                                f"retired on {iso_time(version.retired)} (its backing key is destroyed)")
        try:
            with self._token_use(rec, version, operation, info):
                return self.token.decrypt_gcm(bytes.fromhex(version.token_id), blob.header.nonce,
                                              blob.aad(encoded_context), blob.sealed)
        except TagMismatch:
            if blob.header.context_digest != context_digest(encoded_context):
                raise ContextMismatch(
                    "encryption context does not match the one the blob was encrypted with") from None
            raise InvalidCiphertext("ciphertext blob failed authentication: it is corrupt or was tampered with") from None

    # -- cryptographic operations -------------------------------------------

    def generate_data_key(self, key: str, context: EncryptionContext | None = None,
                          number_of_bytes: int = 32, with_plaintext: bool = True,
                          cache: DataKeyCache | None = None, encfs_internal: bool = False) -> DataKey:
        """A fresh random data key, returned in plaintext (optionally) and sealed under ``key``.

        With ``cache``, the new key is entered as if just decrypted, so the
        caller's next decrypt of this blob (same context) needs no token call.
        """
        context = dict(context or {})
        op = "GenerateDataKey" if with_plaintext else "GenerateDataKeyWithoutPlaintext"
        with self._audited(op, context=context) as info:
            if not 1 <= number_of_bytes <= MAX_DATA_KEY_BYTES:
                raise UsageError(f"data key size must be 1 to {MAX_DATA_KEY_BYTES} bytes")
            _check_context(context, encfs_internal)
            encoded = encode_context(context)
            rec = self._db().resolve(key)
            info["key_id"] = rec.key_id
            self._require(rec, op)
            rec = self.budget.spend(rec, 1, op)
            self.usage.note(rec, [context])
            info["key_version"] = rec.current.version
            plaintext = self.token.random(number_of_bytes)
            blob = self._seal(rec, plaintext, encoded, op, info)
            if cache is not None and with_plaintext:
                cache.put(blob, encoded, plaintext, rec.key_id, rec.current.version)
            return DataKey(rec.key_id, rec.current.version, plaintext if with_plaintext else None, blob)

    def generate_data_keys(self, key: str, contexts: Sequence[EncryptionContext],
                           number_of_bytes: int = 32, cache: DataKeyCache | None = None,
                           encfs_internal: bool = False,
                           principals: Sequence[dict[str, Any]] | None = None) -> list[DataKey]:
        """generate_data_key for each context (with plaintext), in one pass.

        One metadata check, one request to the token's RNG and one hold of the
        token for all the seals; the audit trail still gets one GenerateDataKey
        record per key, with its context, exactly as separate calls would give.
        With ``cache``, each key is entered as if just decrypted (as generate_data_key does).
        ``principals`` (the key daemon's batch of several clients' requests) names each record's.
        """
        return self._seal_many("GenerateDataKey", key, contexts, None, number_of_bytes, cache, encfs_internal,
                               principals)

    def encrypt_many(self, key: str, plaintexts: Sequence[bytes], contexts: Sequence[EncryptionContext],
                     cache: DataKeyCache | None = None, encfs_internal: bool = False) -> list[DataKey]:
        """encrypt of each plaintext (a key the caller derived) under its context, in one pass as
        generate_data_keys does: one Encrypt audit record per plaintext. Returned as DataKeys,
        and with ``cache`` entered as if just decrypted."""
        assert len(plaintexts) == len(contexts)
        return self._seal_many("Encrypt", key, contexts, list(plaintexts), 0, cache, encfs_internal)

    def _seal_many(self, op: str, key: str, contexts: Sequence[EncryptionContext], given: list[bytes] | None,
                   number_of_bytes: int, cache: DataKeyCache | None, encfs_internal: bool,
                   principals: Sequence[dict[str, Any]] | None = None) -> list[DataKey]:
        encoded = [encode_context(dict(c)) for c in contexts]
        info: dict[str, Any] = {}
        try:
            if given is None and not 1 <= number_of_bytes <= MAX_DATA_KEY_BYTES:
                raise UsageError(f"data key size must be 1 to {MAX_DATA_KEY_BYTES} bytes")
            for c in contexts:
                _check_context(c, encfs_internal)
            if given is not None and any(len(p) > MAX_ENCRYPT_PLAINTEXT for p in given):
                raise UsageError(f"encrypt takes at most {MAX_ENCRYPT_PLAINTEXT} bytes per plaintext")
            rec = self._db().resolve(key)
            info["key_id"] = rec.key_id
            self._require(rec, op)
            rec = self.budget.spend(rec, len(contexts), op)
            self.usage.note(rec, contexts)
            version = rec.current
            info["key_version"] = version.version
            if given is None:
                material = self.token.random(number_of_bytes * len(contexts))
                plaintexts = [material[i * number_of_bytes:(i + 1) * number_of_bytes] for i in range(len(contexts))]
            else:
                plaintexts = given
            key_uuid = uuid.UUID(rec.key_id)
            nonces = os.urandom(NONCE_LEN * len(encoded))
            headers = [BlobHeader(key_uuid, version.version, context_digest(e),
                                  nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN]) for i, e in enumerate(encoded)]
            with self._token_use(rec, version, op, info):
                sealed = self.token.encrypt_gcm_many(bytes.fromhex(version.token_id), [
                    (h.nonce, h.pack() + e, p) for h, e, p in zip(headers, encoded, plaintexts)])
        except EncfsError as e:
            self.audit.record_many(op, contexts, principals, outcome="failure", error=e.message, now=self.clock(),
                                   **info)
            raise
        self.audit.record_many(op, contexts, principals, now=self.clock(), **info)
        keys = [DataKey(rec.key_id, version.version, p, CiphertextBlob(h, s).pack())
                for p, h, s in zip(plaintexts, headers, sealed)]
        if cache is not None:
            for dk, enc in zip(keys, encoded):
                cache.put(dk.ciphertext_blob, enc, dk.plaintext, dk.key_id, dk.key_version)  # type: ignore[arg-type]
        return keys

    def resolve_key_id(self, ref: str) -> str:
        """The id of the key ``ref`` (an id or alias) names now; KeyNotFound otherwise. Not audited:
        the key daemon asks it to decide a policy before the audited call."""
        return self._db().resolve(ref).key_id

    def key_enabled(self, key_id: str) -> bool:
        """Whether the key exists and is Enabled (fresh metadata; not audited)."""
        rec = self._db().keys.get(key_id)
        return rec is not None and rec.state == ENABLED

    def key_usable(self, key_id: str, context: EncryptionContext) -> bool:
        """Whether data protected under ``key_id`` in ``context`` by keys derived outside the
        service (a filesystem's derived file keys) may still be used: the key Enabled (fresh
        metadata; no token call, nothing audited; a key daemon also asks its policy)."""
        return self.key_enabled(key_id)

    def data_key_usable(self, key_id: str, key_version: int) -> bool:
        """Whether a data key generated under (key_id, key_version) may still protect new data:
        the CMK is Enabled and that version is still its current one (checked against fresh
        metadata; no token call, nothing audited)."""
        rec = self._db().keys.get(key_id)
        return rec is not None and rec.state == ENABLED and rec.current.version == key_version

    def encrypt(self, key: str, plaintext: bytes, context: EncryptionContext | None = None,
                encfs_internal: bool = False) -> bytes:
        context = dict(context or {})
        with self._audited("Encrypt", context=context) as info:
            _check_context(context, encfs_internal)
            if len(plaintext) > MAX_ENCRYPT_PLAINTEXT:
                raise UsageError(f"plaintext is {len(plaintext)} bytes; encrypt takes at most "
                                 f"{MAX_ENCRYPT_PLAINTEXT} (encrypt larger data under a data key)")
            encoded = encode_context(context)
            rec = self._db().resolve(key)
            info["key_id"] = rec.key_id
            self._require(rec, "Encrypt")
            rec = self.budget.spend(rec, 1, "Encrypt")
            self.usage.note(rec, [context])
            info["key_version"] = rec.current.version
            return self._seal(rec, plaintext, encoded, "Encrypt", info)

    def decrypt(self, blob: bytes, context: EncryptionContext | None = None, key: str | None = None,
                cache: DataKeyCache | None = None) -> Decrypted:
        """Open a blob. ``key`` (optional) insists on the CMK; ``cache`` skips the token on repeats."""
        context = dict(context or {})
        encoded = encode_context(context)
        if cache is not None:

            def usable(key_id: str) -> bool:  # Enabled, not deleted, and the key that ``key`` names
                db = self._db()
                rec = db.keys.get(key_id)
                return rec is not None and rec.state == ENABLED and (key is None or _names_key(db, key, key_id))

            hit = cache.get_usable(blob, encoded, usable)
            if hit is not None:
                return Decrypted(hit[1], hit[2], hit[0])
        with self._audited("Decrypt", context=context) as info:
            parsed = CiphertextBlob.parse(blob)
            plaintext = self._open_blob(self._db(), parsed, encoded, "Decrypt", info, key)
            result = Decrypted(str(parsed.header.key_id), parsed.header.key_version, plaintext)
        if cache is not None:
            cache.put(blob, encoded, plaintext, result.key_id, result.key_version)
        return result

    def re_encrypt(self, blob: bytes, context: EncryptionContext | None, dest_key: str,
                   dest_context: EncryptionContext | None = None, encfs_internal: bool = False) -> bytes:
        """Move a blob under ``dest_key`` without the plaintext leaving the service."""
        context = dict(context or {})
        dest_context = dict(context if dest_context is None else dest_context)
        with self._audited("ReEncrypt", context=context, destination_context=dest_context) as info:
            _check_context(dest_context, encfs_internal, "destination encryption context")
            parsed = CiphertextBlob.parse(blob)
            db = self._db()
            plaintext = self._open_blob(db, parsed, encode_context(context), "ReEncrypt", info, None)
            dest = db.resolve(dest_key)
            info["destination_key_id"] = dest.key_id
            self._require(dest, "ReEncrypt")
            dest = self.budget.spend(dest, 1, "ReEncrypt")
            self.usage.note(dest, [dest_context])
            info["destination_key_version"] = dest.current.version
            return self._seal(dest, plaintext, encode_context(dest_context), "ReEncrypt", info)
