"""KMS-style key service: customer master keys on a PKCS#11 token, envelope encryption.

Layers: ``context`` and ``blob`` (pure formats) -> ``token`` (PKCS#11) ->
``metadata`` (key states, versions, aliases) -> ``service`` (KMS operations,
audit, data-key cache) -> ``cli``.
"""

from encfs.keys.cache import DataKeyCache
from encfs.keys.config import HsmOptions
from encfs.keys.service import DataKey, Decrypted, KeyService

__all__ = ["DataKey", "DataKeyCache", "Decrypted", "HsmOptions", "KeyService"]
