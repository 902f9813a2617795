"""Imported key material (BYOK) for KeyService (service.py): the import parameters (a wrapping
key pair made on the token), the unwrap of 256-bit material into the token as version 1 of an
EXTERNAL key, and its deletion. KeyService takes these methods from KeyMaterialImport.
Of service.py's invariants, these methods keep:

- The material is unwrapped by the token into a backing key that never leaves it; a
  re-import must be the same material (a check blob sealed at the first import), and
  material that fails a check is destroyed again.
- Imported material may expire (``valid_to``): the first call that finds it due deletes it
  (KeyService._run_due_transitions), as delete_imported_key_material does on demand, and the
  key becomes PendingImport.
- Every call is audited (KeyService._audited), success or failure, never with key material.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import Any

from encfs.errors import KeyImportError, KeyStateError, UsageError
from encfs.keys.blob import NONCE_LEN
from encfs.keys.describe import WRAPPING_PAIR_VERSION, key_metadata_json, key_state_error, token_object_id
from encfs.keys.metadata import (
    ENABLED,
    ORIGIN_EXTERNAL,
    PENDING_DELETION,
    PENDING_IMPORT,
    KeyRecord,
    KeyVersion,
)
from encfs.keys.servicefields import ServiceFields
from encfs.keys.token import TagMismatch, rsa_spki_pem

IMPORT_PARAMETERS_TTL = 24 * 3600
WRAPPING_ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
_IMPORT_CHECK_AAD = b"encfs import check v1"


@dataclass(frozen=True)
class ImportParameters:
    key_id: str
    wrapping_algorithm: str
    public_key_pem: bytes
    import_token: str
    valid_to: float


class KeyMaterialImport(ServiceFields):
    """The key-material import operations of service.KeyService (a mixin: the service's state)."""

    def get_parameters_for_import(self, key: str, wrapping_algorithm: str = "RSAES_OAEP_SHA_1") -> ImportParameters:
        with self._audited("GetParametersForImport", wrapping_algorithm=wrapping_algorithm) as info:
            if wrapping_algorithm not in WRAPPING_ALGORITHMS:
                raise UsageError(f"wrapping algorithm must be one of {', '.join(WRAPPING_ALGORITHMS)}")
            self._db()
            with self.store.transaction() as db:
                rec = db.resolve(key)
                info["key_id"] = rec.key_id
                if rec.origin != ORIGIN_EXTERNAL or rec.imported is None:
                    raise KeyStateError(f"key {rec.key_id} has origin {rec.origin}: only EXTERNAL keys import material")
                if rec.state == PENDING_DELETION:
                    raise key_state_error(rec, "GetParametersForImport")
                pair_id = token_object_id(rec.key_id, WRAPPING_PAIR_VERSION)
                self.token.destroy(pair_id)
                der = self.token.generate_import_keypair(pair_id, f"encfs-import:{rec.key_id}")
                now = self.clock()
                rec.imported.wrapping_algorithm = wrapping_algorithm
                rec.imported.wrapping_token_id = pair_id.hex()
                rec.imported.import_token = secrets.token_hex(16)
                rec.imported.parameters_valid_to = now + IMPORT_PARAMETERS_TTL
                return ImportParameters(rec.key_id, wrapping_algorithm, rsa_spki_pem(der),
                                        rec.imported.import_token, rec.imported.parameters_valid_to)

    def import_key_material(self, key: str, wrapped: bytes, import_token: str,
                            valid_to: float | None = None) -> dict[str, Any]:
        """Unwrap 256-bit key material into the token as version 1 of an EXTERNAL key."""
        with self._audited("ImportKeyMaterial") as info:
            self._db()
            now = self.clock()
            if valid_to is not None and valid_to <= now:
                raise UsageError("--valid-to must be in the future")
            with self.store.transaction() as db:
                rec = db.resolve(key)
                info["key_id"] = rec.key_id
                imp = rec.imported
                if rec.origin != ORIGIN_EXTERNAL or imp is None:
                    raise KeyStateError(f"key {rec.key_id} has origin {rec.origin}: only EXTERNAL keys import material")
                if rec.state == PENDING_DELETION:
                    raise key_state_error(rec, "ImportKeyMaterial")
                if imp.import_token is None or imp.wrapping_token_id is None or imp.wrapping_algorithm is None:
                    raise KeyImportError(f"no import parameters for key {rec.key_id}: run get-parameters-for-import")
                if not secrets.compare_digest(import_token, imp.import_token):
                    raise KeyImportError("import token does not match the latest get-parameters-for-import")
                if imp.parameters_valid_to is None or imp.parameters_valid_to <= now:
                    raise KeyImportError("import parameters expired: run get-parameters-for-import again")
                tid = token_object_id(rec.key_id, 1)
                self.token.destroy(tid)  # material of an earlier (expired or deleted) import
                hash_name = imp.wrapping_algorithm.removeprefix("RSAES_OAEP_")
                try:
                    length = self.token.unwrap_aes_oaep(bytes.fromhex(imp.wrapping_token_id), wrapped, tid,
                                                        f"encfs-cmk:{rec.key_id}:v1", hash_name)
                except TagMismatch:
                    raise KeyImportError(
                        f"the token could not unwrap the key material with {imp.wrapping_algorithm}") from None
                try:
                    if length not in (0, 32):  # 0: the token can tell neither CKA_VALUE_LEN nor measure it
                        raise KeyImportError(f"key material is {length} bytes; it must be 32 (AES-256)")
                    self._check_import(rec, tid, now)
                except BaseException:
                    self.token.destroy(tid)
                    raise
                self.token.destroy(bytes.fromhex(imp.wrapping_token_id))
                imp.import_token = imp.wrapping_token_id = imp.parameters_valid_to = None
                imp.valid_to = valid_to
                rec.versions = [KeyVersion(1, now, tid.hex(), used_by=[])]
                if rec.state == PENDING_IMPORT:
                    rec.state = ENABLED
                info["key_version"] = 1
                return key_metadata_json(rec, db)

    def _check_import(self, rec: KeyRecord, tid: bytes, now: float) -> None:
        """First import: record a check blob. Re-import: insist on the same material."""
        imp = rec.imported
        assert imp is not None
        if imp.check_sealed is None:
            nonce, probe = os.urandom(NONCE_LEN), os.urandom(32)
            imp.check_nonce = nonce.hex()
            imp.check_sealed = self.token.encrypt_gcm(tid, nonce, _IMPORT_CHECK_AAD, probe).hex()
            imp.check_digest = hashlib.sha256(probe).hexdigest()
            return
        try:
            probe = self.token.decrypt_gcm(tid, bytes.fromhex(imp.check_nonce or ""), _IMPORT_CHECK_AAD,
                                           bytes.fromhex(imp.check_sealed))
        except TagMismatch:
            probe = b""
        if hashlib.sha256(probe).hexdigest() != imp.check_digest:
            raise KeyImportError(f"key material differs from the material first imported into key {rec.key_id}")

    def delete_imported_key_material(self, key: str) -> dict[str, Any]:
        def change(rec: KeyRecord, now: float) -> None:
            if rec.origin != ORIGIN_EXTERNAL or rec.imported is None:
                raise KeyStateError(f"key {rec.key_id} has origin {rec.origin}, not EXTERNAL")
            self._destroy_material(rec, versions=True, wrapping=False)
            rec.imported.valid_to = None
            if rec.state == PENDING_DELETION:
                rec.pre_deletion_state = PENDING_IMPORT
            else:
                rec.state = PENDING_IMPORT
        return self._transition("DeleteImportedKeyMaterial", key, change)
