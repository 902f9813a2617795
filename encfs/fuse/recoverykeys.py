"""A filesystem's recovery key (issue #23; docs/FORMAT.md §6.10): its keys without the HSM.

With the feature ``recovery-key`` the config holds a 32-byte recovery root ``R``, wrapped by
the CMK like the filesystem secret (context {"encfs:fs": fs id, "encfs:purpose": "recovery
root"}), and, while a recovery key is set, the secret and ``R`` sealed under a key derived
from the recovery key. Every file's data key is then derived from ``R`` and the file's id
(file_key), and wrapped by the CMK in the file header as before (DerivedKeyPool), so a normal
mount reads it exactly as a random one, and the holder of the recovery key derives every file
key with no per-file storage.

Invariants:
- A data key derived here is handed out once, for a new random file id (a re-keyed file gets
  a new id: rekeyfile.py): no key is used for two files, nor twice for one.
- The recovery key, R, the secret and the keys derived from them never reach a log line, an
  exception message or the audit trail; the audit trail shows one Encrypt per file key, with
  its context, where random keys showed GenerateDataKey.
- A recovery wrapping opens only under its own filesystem's id (it is the AAD and the salt).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.blocks import OVERHEAD, BlockAuthError, BlockCipher
from encfs.fuse.fileheader import HEADER_LEN, STATE_XATTR, FileHeader, FileState, state_file
from encfs.keys.cache import DataKeyCache
from encfs.keys.context import EncryptionContext
from encfs.keys.pool import DataKeyPool
from encfs.keys.service import DataKey, KeyService

KEK_INFO = b"encfs fs recovery v1"
FILE_KEY_INFO = b"encfs file key v1"
ROOT_LEN = 32
SECRET_LEN = 32
NONCE_LEN = 12
WRAPPED_LEN = NONCE_LEN + SECRET_LEN + ROOT_LEN + 16  # nonce, sealed secret and root, tag


class WrongKey(Exception):
    """The recovery key does not open this wrapping (or the wrapping is damaged)."""


def _hkdf(ikm: bytes, fs_id: str, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=info).derive(ikm)


def recovery_kek(recovery_key: bytes, fs_id: str) -> bytes:
    """HKDF-SHA256(recovery key, salt = fs id bytes, info "encfs fs recovery v1")."""
    return _hkdf(recovery_key, fs_id, KEK_INFO)


def seal_keys(recovery_key: bytes, fs_id: str, secret: bytes, root: bytes, nonce: bytes | None = None) -> bytes:
    """nonce(12) ‖ AES-256-GCM(KEK, secret ‖ R, AAD = "encfs fs recovery v1" ‖ fs id bytes)."""
    assert len(secret) == SECRET_LEN and len(root) == ROOT_LEN
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    aad = KEK_INFO + bytes.fromhex(fs_id)
    return nonce + AESGCM(recovery_kek(recovery_key, fs_id)).encrypt(nonce, secret + root, aad)


def open_keys(recovery_key: bytes, fs_id: str, wrapped: bytes) -> tuple[bytes, bytes]:
    """(secret, R) from a recovery wrapping; WrongKey if it does not open."""
    if len(wrapped) != WRAPPED_LEN:
        raise WrongKey("not a recovery wrapping")
    aad = KEK_INFO + bytes.fromhex(fs_id)
    try:
        plain = AESGCM(recovery_kek(recovery_key, fs_id)).decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], aad)
    except InvalidTag:
        raise WrongKey("it does not open") from None
    return plain[:SECRET_LEN], plain[SECRET_LEN:]


def file_key(root: bytes, fs_id: str, file_id: bytes) -> bytes:
    """A file's data key: HKDF-SHA256(R, salt = fs id bytes, info "encfs file key v1" ‖ file id)."""
    return _hkdf(root, fs_id, FILE_KEY_INFO + file_id)


class DerivedKeyPool(DataKeyPool[bytes]):
    """DataKeyPool whose keys are derived from R and their file id, then wrapped by the CMK in a
    batch (KeyService.encrypt_many): same labels, contexts, expiry and checks as random keys."""

    def __init__(self, service: KeyService, key: str, new_label: Callable[[], tuple[bytes, EncryptionContext]],
                 *, root: bytes, fs_id: str, cache: DataKeyCache | None = None) -> None:
        super().__init__(service, key, new_label, cache=cache)
        self._root, self._fs_id = root, fs_id

    def _generate(self) -> list[tuple[float, bytes, DataKey]]:
        labels = [self._new_label() for _ in range(self.batch)]
        keys = self.service.encrypt_many(self.key, [file_key(self._root, self._fs_id, fid) for fid, _ in labels],
                                         [context for _, context in labels], cache=self._cache,
                                         encfs_internal=True)
        born = self._clock()
        return [(born, fid, dk) for (fid, _context), dk in zip(labels, keys)]


def key_opens_file(fd: int, root_dir: bytes, header: FileHeader, key: bytes, block_size: int) -> bool:
    """Whether ``key`` is the data key of the backing file ``fd`` (whose header is ``header``):
    its state, or else its first block, opens under it. A file with neither has never sealed
    anything under its key, which any key then serves. Used before a header is re-wrapped by
    the recovery key, so that a key it does not derive never replaces the right one."""
    cipher = BlockCipher(key, header.file_id, block_size)
    sealed = None
    try:
        sealed = os.getxattr(fd, STATE_XATTR)
    except OSError:
        try:
            with open(state_file(root_dir, header.file_id), "rb") as f:
                sealed = f.read(1 << 16)
        except OSError:
            pass
    if sealed:
        try:
            FileState.open(cipher, sealed)
            return True
        except (BlockAuthError, struct.error, ValueError):
            pass  # a damaged state: the first block decides
    size = os.fstat(fd).st_size
    if size <= HEADER_LEN:
        return not sealed
    try:
        cipher.open(0, os.pread(fd, min(block_size + OVERHEAD, size - HEADER_LEN), HEADER_LEN))
        return True
    except BlockAuthError:
        return False
