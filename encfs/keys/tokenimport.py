"""Importing key material wrapped with RSA-OAEP: the operations of token.Token that make the
wrapping key pair and unwrap into a token key (the mixin TokenImport), and rsa_spki_pem for the
public key given out. As every token key, the unwrapped key is sensitive and non-extractable.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import MGF
from pkcs11.util.rsa import encode_rsa_public_key

from encfs.errors import TokenError
from encfs.keys.tokencrypto import TagMismatch
from encfs.keys.tokenspec import TokenSpec

# RSA-OAEP parameters for wrapped key import (AWS KMS RSAES_OAEP_SHA_1 / _SHA_256).
# SoftHSM 2.6 accepts only SHA-1 OAEP for C_UnwrapKey (SHA-256 gives ArgumentsBad).
OAEP_PARAMS = {
    "SHA_1": (Mechanism.SHA_1, MGF.SHA1, None),
    "SHA_256": (Mechanism.SHA256, MGF.SHA256, None),
}
IMPORT_RSA_BITS = 3072


class TokenImport:
    """The wrapped-import operations of token.Token (a mixin: the token's session and key handles)."""

    if TYPE_CHECKING:  # defined by Token
        spec: TokenSpec
        _session: Any

        def _locked(self, what: str, exclusive: bool = False) -> AbstractContextManager[Any]: ...
        def _key(self, session: Any, obj_id: bytes, cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any: ...

    def generate_import_keypair(self, obj_id: bytes, label: str) -> bytes:
        """Create an RSA key pair for wrapped import; return the public key (PKCS#1 DER)."""
        with self._locked("C_GenerateKeyPair", exclusive=True) as session:
            pub, _priv = session.generate_keypair(
                KeyType.RSA, IMPORT_RSA_BITS, id=obj_id, label=label, store=True,
                public_template={Attribute.TOKEN: True},
                private_template={Attribute.TOKEN: True, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True},
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
                | MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            )
            return bytes(encode_rsa_public_key(pub))

    def import_public_key(self, obj_id: bytes) -> bytes:
        with self._locked("C_GetAttributeValue") as session:
            return bytes(encode_rsa_public_key(self._key(session, obj_id, ObjectClass.PUBLIC_KEY)))

    def unwrap_aes_oaep(self, wrapping_id: bytes, wrapped: bytes, obj_id: bytes, label: str,
                        hash_name: str) -> int:
        """Unwrap RSA-OAEP key material into a non-extractable AES token key.

        ``hash_name`` is ``SHA_1`` or ``SHA_256`` (OAEP digest and MGF1).
        Returns the key length in bytes as the token reports it or, when it reports 0
        (SoftHSM2 does for unwrapped keys), as measured by ``_measure_unwrapped``
        (0 when that is impossible too).
        Raises TagMismatch when the token cannot unwrap ``wrapped``.
        """
        with self._locked("C_UnwrapKey", exclusive=True) as session:
            priv = self._key(session, wrapping_id, ObjectClass.PRIVATE_KEY)
            try:
                key = priv.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped, id=obj_id, label=label,
                    store=True, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_PARAMS[hash_name],
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.PRIVATE: True, Attribute.TOKEN: True},
                )
            except (p11e.GeneralError, p11e.WrappedKeyInvalid, p11e.WrappedKeyLenRange,
                    p11e.EncryptedDataInvalid, p11e.FunctionFailed):
                raise TagMismatch("the token could not unwrap the key material") from None
            except (p11e.ArgumentsBad, p11e.MechanismParamInvalid, p11e.MechanismInvalid):
                raise TokenError(f"token {self.spec.describe()} does not support RSA-OAEP with {hash_name} "
                                 f"for unwrapping; use another wrapping algorithm") from None
            length = int(key[Attribute.VALUE_LEN])
            return length or self._measure_unwrapped(self._session, priv, wrapped, hash_name)

    @staticmethod
    def _measure_unwrapped(session: Any, priv: Any, wrapped: bytes, hash_name: str) -> int:
        """Length of the key material in ``wrapped``, measured without it leaving the token.

        Unwraps a temporary extractable session copy and wraps that (RFC 5649) under an
        ephemeral session key: the result is 8 bytes longer than the material rounded up
        to a multiple of 8 (a length that is not a multiple of 8 is no AES key size, and
        SoftHSM2 then refuses AES operations with it). Both objects are destroyed.
        Returns 0 if the token does not support the measurement.
        """
        probe = kek = None
        try:
            probe = priv.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped, label="encfs-import-probe", store=False,
                mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_PARAMS[hash_name], capabilities=0,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                          Attribute.PRIVATE: True, Attribute.TOKEN: False},
            )
            kek = session.generate_key(
                KeyType.AES, 256, label="encfs-import-probe-kek", store=False, capabilities=MechanismFlag.WRAP,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: False},
            )
            return len(kek.wrap_key(probe, mechanism=Mechanism.AES_KEY_WRAP_PAD)) - 8
        except p11e.PKCS11Error:
            return 0
        finally:
            for obj in (probe, kek):
                if obj is not None:
                    try:
                        obj.destroy()
                    except p11e.PKCS11Error:
                        pass


def rsa_spki_pem(pkcs1_der: bytes) -> bytes:
    """Convert a PKCS#1 RSAPublicKey (as python-pkcs11 encodes it) to SPKI PEM."""
    from asn1crypto.keys import RSAPublicKey
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    parsed = RSAPublicKey.load(pkcs1_der)
    key = RSAPublicNumbers(parsed["public_exponent"].native, parsed["modulus"].native).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
