"""AES-GCM under token keys: the cryptographic operations of token.Token (the mixin TokenCrypto),
the session copies of keys that runs of encryptions use, and TagMismatch. The invariants these
keep (a copy stays sensitive, non-extractable and this process's only) are in token.py's module
docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from encfs.errors import InvalidCiphertext, TokenError

_COPY_PREFIX = b"encfs-session-copy:"  # CKA_ID of a session copy: the prefix, then the key's own id


class TagMismatch(InvalidCiphertext):
    """The token rejected a GCM tag (wrong key, AAD or tampered data)."""


def _refused(operation: str, obj_id: bytes) -> TokenError:
    return TokenError(f"token refuses to {operation} under key object {obj_id.hex()} "
                      f"(CKA_{operation.upper()} is false)")


class TokenCrypto:
    """The cryptographic operations of token.Token (a mixin: the token's session and key handles)."""

    if TYPE_CHECKING:  # defined by Token
        _handles: dict[bytes, Any]

        def _locked(self, what: str, exclusive: bool = False) -> AbstractContextManager[Any]: ...
        def _key(self, session: Any, obj_id: bytes, cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any: ...
        def usable_for_encrypt(self, session: Any, obj_id: bytes) -> bool: ...

    def _capable_key(self, session: Any, obj_id: bytes, operation: str) -> Any:
        """The secret key ``obj_id``, if it may ``operation`` ("encrypt"/"decrypt").

        python-pkcs11 gives a key object those methods only if CKA_ENCRYPT/CKA_DECRYPT were
        set when it was found, and encfs.keys.tokenstate clears them on a key that is not
        usable: a cached handle without the method is looked up again (the key may have been
        enabled since, by another process), a fresh one without it is refused."""
        key = self._key(session, obj_id)
        if not hasattr(key, operation):
            self._handles.pop(bytes([int(ObjectClass.SECRET_KEY)]) + obj_id, None)
            key = self._key(session, obj_id)
            if not hasattr(key, operation):
                raise _refused(operation, obj_id)
        return key

    def _working_copy(self, session: Any, obj_id: bytes) -> Any:
        """A session-object copy of the secret key ``obj_id``, or the key itself where the token
        refuses copies (CKA_COPYABLE false, or no C_CopyObject).

        Why: SoftHSM2 re-reads a token object's files under fcntl locks on every use, to
        notice changes by other processes (two opens per C_EncryptInit); a session object
        lives in memory. Per data key that halves the cost of a wrap."""
        cache_id = _COPY_PREFIX + obj_id
        copy = self._handles.get(cache_id)
        if copy is None:
            key = self._key(session, obj_id)
            try:
                copy = key.copy({Attribute.TOKEN: False, Attribute.ID: cache_id,
                                 Attribute.LABEL: "encfs-session-copy"})
            except p11e.PKCS11Error:
                copy = key
            self._handles[cache_id] = copy
        return copy

    def random(self, nbytes: int) -> bytes:
        with self._locked("C_GenerateRandom") as session:
            return bytes(session.generate_random(nbytes * 8))

    def encrypt_gcm(self, obj_id: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AES-GCM under a token key; returns ciphertext || 16-byte tag."""
        with self._locked("C_Encrypt") as session:
            key = self._capable_key(session, obj_id, "encrypt")
            return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(nonce, aad, 128)))

    def encrypt_gcm_many(self, obj_id: bytes, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """encrypt_gcm for each (nonce, aad, plaintext), in one hold of the token, under this
        session's working copy of the key (_working_copy): the same key, so the same results."""
        with self._locked("C_Encrypt") as session:
            if not self.usable_for_encrypt(session, obj_id):
                # The copy would still encrypt: it kept the attributes the key had when copied.
                copy = self._handles.pop(_COPY_PREFIX + obj_id, None)
                if copy is not None and copy is not self._key(session, obj_id):
                    copy.destroy()
                raise _refused("encrypt", obj_id)
            key = self._working_copy(session, obj_id)
            if not hasattr(key, "encrypt"):
                raise _refused("encrypt", obj_id)
            try:
                return [bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                          mechanism_param=GCMParams(nonce, aad, 128)))
                        for nonce, aad, plaintext in items]
            except p11e.PKCS11Error:
                self._handles.pop(_COPY_PREFIX + obj_id, None)  # the next run makes a fresh copy
                raise

    def decrypt_gcm(self, obj_id: bytes, nonce: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Inverse of encrypt_gcm; raise TagMismatch when authentication fails."""
        with self._locked("C_Decrypt") as session:
            key = self._capable_key(session, obj_id, "decrypt")
            try:
                return bytes(key.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad, 128)))
            except (p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange,
                    p11e.FunctionFailed):
                # SoftHSM2 reports a bad GCM tag as CKR_GENERAL_ERROR.
                raise TagMismatch("ciphertext failed authentication") from None
