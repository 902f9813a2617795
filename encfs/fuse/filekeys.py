"""Where a file's data key comes from (docs/FORMAT.md §6.4), for a mount, fsck and re-keys.

Two sources, told apart by the header's key-source byte (fileheader.py):

- **Wrapped**: a random key (or, with a recovery root, one derived from it: recoverykeys.py)
  wrapped by the CMK into the header, context {"encfs:fs": fs id, "encfs:file": file id}. New
  keys come from a DataKeyPool, a batch per pass through the key service; opening one is a
  Decrypt (cached for the mount).
- **Derived** (filesystems with DERIVED_FEATURE): HKDF-SHA256 of the file-key root (FsKeys,
  itself derived from the filesystem secret that the CMK wraps in the config) and the file id;
  the header carries no blob. Creating or opening such a file needs no token call: the model
  is S3's bucket keys, one CMK call per filesystem rather than per object.

Invariants:
- A new key is handed out once, with a new random file id: no key serves two files, nor two
  lives of one (a re-key gives the file a new id).
- A derived key is handed out or used only while the CMK is usable in the filesystem's
  context (KeyService.key_usable: Enabled, and through a key daemon the caller still allowed to
  decrypt), checked against fresh metadata at every create and every load, as a wrapped key's
  cache hit is: disabling the CMK stops new files and new opens at once. And at most
  TOKEN_RECHECK seconds after the token was last asked, the next create or load asks it again
  (the secret's Decrypt, audited): a wrapped key's cache entry lives as long, so a keys.json
  put back from before a disable, which the token's own key state refuses, stops derived keys
  as soon as it stops wrapped ones. Nothing else is audited per derived key.
- A derived key is kept in the mount's key cache (DataKeyCache: 300 s, bounded entries) like an
  unwrapped one; the CMK check above runs before every lookup, hit or miss.
- Without a key service (a mount by the recovery key, read-only) no key is ever new, and a
  wrapped key is derived from the recovery root (a file whose key was not fails its first
  block: EIO).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable

from encfs.errors import KeyStateError
from encfs.fuse.fileheader import FILE_ID_LEN, V2, FileHeader, HeaderError
from encfs.fuse.fsconfig import DERIVED_FEATURE, FsConfig, FsKeys
from encfs.fuse.recoverykeys import DerivedKeyPool, file_key
from encfs.keys.cache import MAX_AGE, DataKeyCache
from encfs.keys.context import EncryptionContext
from encfs.keys.pool import DataKeyPool
from encfs.keys.service import KeyService

TOKEN_RECHECK = MAX_AGE  # seconds; see the invariants
# A derived key's entry in the mount's key cache: (file id, DERIVED_TAG), beside the wrapped keys'
# (blob, encoded context). HKDF costs 10-16 us in a serving daemon, a hit about 1 (HISTORY, fifth round).
DERIVED_TAG = b"encfs derived file key"


class FileKeys:
    """The data keys of one filesystem's files: new ones, and the key of a file's header."""

    def __init__(self, config: FsConfig, keys: FsKeys | None, ks: KeyService | None,
                 recovery_root: bytes | None = None, cache: DataKeyCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._token_asked = clock()  # the caller has just opened the config: the secret's Decrypt
        self._token_lock = threading.Lock()  # one re-ask at a time: the others wait for its answer
        self.ks = ks
        self.recovery_root = recovery_root
        self.cache = cache
        # DERIVED_FEATURE (set only by `encfs init`): every file gets a derived key.
        self.derived_root = keys.file_root if keys is not None and DERIVED_FEATURE in config.features else None
        # The secret's context: what a derived key's CMK check is asked in.
        self._context = config.fs_context() if self.derived_root is not None else {}
        self._pool: DataKeyPool[bytes] | None = None
        if ks is not None and self.derived_root is None:
            if recovery_root is not None:
                self._pool = DerivedKeyPool(ks, config.key_id, self._new_file_id, root=recovery_root,
                                            fs_id=config.fs_id, cache=cache)
            else:
                self._pool = DataKeyPool(ks, config.key_id, self._new_file_id, cache=cache)

    def _new_file_id(self) -> tuple[bytes, EncryptionContext]:
        file_id = os.urandom(FILE_ID_LEN)
        return file_id, self.config.file_context(file_id)

    def check_usable(self) -> None:
        """KeyStateError (or the key service's errors) unless the CMK may still give this
        filesystem's derived keys out: Enabled, usable in the secret's context, and the token
        asked again at least every TOKEN_RECHECK seconds."""
        assert self.ks is not None
        if not self.ks.key_usable(self.config.key_id, self._context):
            raise KeyStateError(f"key {self.config.key_id} is not Enabled (or no longer usable here): "
                                "the filesystem's file keys need it")
        if self._clock() - self._token_asked >= TOKEN_RECHECK:
            with self._token_lock:
                if self._clock() - self._token_asked >= TOKEN_RECHECK:  # not asked meanwhile
                    self.ks.decrypt(self.config.wrapped_secret, self._context, key=self.config.key_id)
                    self._token_asked = self._clock()

    def new(self, version: int = V2) -> tuple[FileHeader, bytes]:
        """A header (content ``version``) for a new file id, and its data key. OSError EROFS
        without a key service; KeyStateError (or the key service's errors) if the CMK is not
        usable."""
        if self.ks is None:
            raise OSError(errno.EROFS, "mounted by its recovery key: no new data keys")
        if self.derived_root is not None:
            self.check_usable()
            file_id = os.urandom(FILE_ID_LEN)
            return FileHeader(file_id, b"", version), self._derive(file_id)
        assert self._pool is not None
        file_id, dk = self._pool.take()
        assert dk.plaintext is not None
        return FileHeader(file_id, dk.ciphertext_blob, version), dk.plaintext

    def key(self, header: FileHeader) -> bytes:
        """The data key of the file ``header`` heads (the key service's errors if its wrapped key
        does not unwrap, KeyStateError if a derived key's CMK is not usable)."""
        if header.derived:
            if self.derived_root is None:
                # The feature is what tells an older encfs to refuse the filesystem: a derived
                # header without it was not written by encfs.
                raise HeaderError(f"its header says its key is derived, which this filesystem's keys never are "
                                  f"(no {DERIVED_FEATURE!r} feature)")
            if self.ks is not None:
                self.check_usable()
            return self._derive(header.file_id)
        if self.ks is None:
            assert self.recovery_root is not None
            return file_key(self.recovery_root, self.config.fs_id, header.file_id)
        return self.ks.decrypt(header.wrapped_key, self.config.file_context(header.file_id),
                               key=self.config.key_id, cache=self.cache).plaintext

    def recovery_misses(self, header: FileHeader, key: bytes) -> bool:
        """Whether the recovery key would not open this file although the filesystem has one: a
        wrapped ``key`` that the recovery root does not derive (a file put back from before
        `encfs recovery-key add`, say). A derived key it opens through the secret."""
        return (self.ks is not None and self.recovery_root is not None and not header.derived
                and key != file_key(self.recovery_root, self.config.fs_id, header.file_id))

    def _derive(self, file_id: bytes) -> bytes:
        """The derived key of ``file_id``, through the key cache (seeded by new(), as the pool
        seeds it with wrapped keys): the cache's limits bound how long it stays in memory."""
        assert self.derived_root is not None
        hit = None if self.cache is None else self.cache.get(file_id, DERIVED_TAG)
        if hit is not None:
            return hit[0]
        key = file_key(self.derived_root, self.config.fs_id, file_id)
        if self.cache is not None:
            self.cache.put(file_id, DERIVED_TAG, key, self.config.key_id, 0)
        return key

    def clear(self) -> None:
        """Forget pooled keys (at unmount)."""
        if self._pool is not None:
            self._pool.clear()
