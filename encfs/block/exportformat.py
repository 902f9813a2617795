"""The portable snapshot export format (docs/FORMAT.md §9): keys, objects, manifests, the key file.

Pure functions of bytes; export.py does the files and the key service. An export directory::

    DIR/key                      the export key, wrapped by the key service (JSON)
    DIR/objects/<2 hex>/<name>   one object per distinct non-zero 1 MiB chunk, named by its content
    DIR/manifests/<snapshot id>  one sealed manifest per snapshot: its chunks' object names, in order
    DIR/tmp/                     files being written (emptied by each export)

Keys, all derived from the export key K (32 random bytes from the key service) with HKDF-SHA256
(no salt): name key = HKDF(K, "encfs export names v1"), object key of name N = HKDF(K, "encfs export
object v1" || N), manifest key = HKDF(K, "encfs export manifest v1").

Invariants:
- An object's name is HMAC-SHA256(name key, its plaintext); its key is derived from the name and
  its nonce is zero. So a (key, nonce) pair seals one plaintext only (two plaintexts would need
  an HMAC-SHA256 collision), and sealing the same chunk again gives the same bytes.
- An object opens only under the name it was sealed for (key and AAD hold the name), and the
  name is recomputed from the plaintext it opens to.
- A manifest opens only with the volume id and snapshot id it was sealed for (AAD), under the
  manifest key with a random 96-bit nonce: one seal per export run.
- No exception message holds key material or plaintext: names, ids and sizes only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.errors import Busy, EncfsError

EXPORT_FORMAT = 1
SECTOR = 4096
CHUNK_SECTORS = 256
CHUNK_SIZE = CHUNK_SECTORS * SECTOR  # 1 MiB
KEY_FILE, OBJECTS, MANIFESTS, TMP = "key", "objects", "manifests", "tmp"
CONTEXT_KEY = "encfs:export"
NAME_INFO = b"encfs export names v1"
OBJECT_INFO = b"encfs export object v1"
MANIFEST_INFO = b"encfs export manifest v1"
MANIFEST_MAGIC = b"ENCX"
MANIFEST_HEADER = MANIFEST_MAGIC + bytes([EXPORT_FORMAT])
NONCE_LEN, TAG_LEN = 12, 16
ZERO_NONCE = bytes(NONCE_LEN)
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME = re.compile(r"[0-9a-f]{64}")


class ExportError(EncfsError):
    """A snapshot cannot be exported or imported (bad directory, source failure, disk error)."""


class ExportBusy(ExportError, Busy):
    """Another encfs process holds the export directory."""


class ExportDamaged(ExportError):
    """Something in an export directory fails verification: missing, tampered, damaged or foreign."""


def check_snapshot_id(snapshot_id: str) -> str:
    """``snapshot_id`` if it can name a manifest file (letters, digits, '.', '_', '-'; at most 128)."""
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise ExportError(f"snapshot id {snapshot_id!r} cannot name a manifest (letters, digits, '.', '_', '-')")
    return snapshot_id


def export_context(volume_id: bytes) -> dict[str, str]:
    """The encryption context the export key is wrapped with."""
    return {CONTEXT_KEY: volume_id.hex()}


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_SIZE)


def chunk_length(size: int, index: int) -> int:
    """Plaintext bytes of chunk ``index`` of a ``size``-byte snapshot (only the last may be short)."""
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(key)


class ExportKeys:
    """The keys derived from one export key, and the object and manifest sealing under them."""

    __slots__ = ("_key", "_manifest", "_names", "volume_id")

    def __init__(self, export_key: bytes, volume_id: bytes) -> None:
        if len(export_key) != 32 or len(volume_id) != 16:
            raise ValueError("an export key is 32 bytes and a volume id 16")
        self._key, self.volume_id = export_key, volume_id
        self._names = _hkdf(export_key, NAME_INFO)
        self._manifest = AESGCM(_hkdf(export_key, MANIFEST_INFO))

    def object_name(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        mac = hmac.HMAC(self._names, hashes.SHA256())
        mac.update(plaintext)
        return mac.finalize()

    def _object_aead(self, name: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._key, OBJECT_INFO + name))

    def object_aad(self, name: bytes) -> bytes:
        return self.volume_id + name

    def seal_object(self, name: bytes, plaintext: bytes | bytearray) -> bytes:
        """The object file of a chunk whose name (object_name) is ``name``: ciphertext || tag."""
        return self._object_aead(name).encrypt(ZERO_NONCE, bytes(plaintext), self.object_aad(name))

    def open_object(self, name_hex: str, sealed: bytes, length: int, where: str) -> bytes:
        """The plaintext of object ``name_hex``, which must hold ``length`` plaintext bytes; ExportDamaged
        (naming ``where``, the object's place) if it is the wrong size, fails authentication or does
        not hash to its name."""
        if len(sealed) != length + TAG_LEN:
            raise ExportDamaged(f"{where} is damaged: {len(sealed)} bytes, not {length + TAG_LEN}")
        name = bytes.fromhex(name_hex)
        try:
            plaintext = self._object_aead(name).decrypt(ZERO_NONCE, sealed, self.object_aad(name))
        except InvalidTag:
            raise ExportDamaged(f"{where} fails authentication (tampered, damaged, or from another export)") from None
        if not constant_time.bytes_eq(self.object_name(plaintext), name):
            raise ExportDamaged(f"{where} does not hash to its name")
        return plaintext

    def manifest_aad(self, snapshot_id: str) -> bytes:
        return MANIFEST_HEADER + self.volume_id + snapshot_id.encode()

    def seal_manifest(self, manifest: Manifest) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return MANIFEST_HEADER + nonce + self._manifest.encrypt(nonce, manifest.to_json(),
                                                                self.manifest_aad(manifest.snapshot_id))

    def open_manifest(self, snapshot_id: str, sealed: bytes) -> Manifest:
        where = f"manifest {snapshot_id}"
        if len(sealed) < len(MANIFEST_HEADER) + NONCE_LEN + TAG_LEN or not sealed.startswith(MANIFEST_MAGIC):
            raise ExportDamaged(f"{where} is not an encfs export manifest (damaged)")
        if sealed[len(MANIFEST_MAGIC)] != EXPORT_FORMAT:
            raise ExportError(f"{where} has format version {sealed[len(MANIFEST_MAGIC)]}, which this encfs "
                              f"does not read (a newer encfs wrote it, or it is damaged)")
        nonce, body = sealed[len(MANIFEST_HEADER):len(MANIFEST_HEADER) + NONCE_LEN], sealed[len(MANIFEST_HEADER)
                                                                                            + NONCE_LEN:]
        try:
            plaintext = self._manifest.decrypt(nonce, body, self.manifest_aad(snapshot_id))
        except InvalidTag:
            raise ExportDamaged(f"{where} fails authentication (tampered, damaged, renamed, or sealed under "
                                f"another export key)") from None
        return Manifest.from_json(plaintext, self.volume_id, snapshot_id)


@dataclass(frozen=True)
class Manifest:
    """A snapshot's export: its metadata and its chunks' object names (hex; None: all zeros)."""

    volume_id: bytes
    snapshot_id: str
    size: int
    description: str
    created: float
    chunks: tuple[str | None, ...]
    chunk_size: int = CHUNK_SIZE

    def chunk_length(self, index: int) -> int:
        return chunk_length(self.size, index)

    def to_json(self) -> bytes:
        return json.dumps({
            "format": EXPORT_FORMAT, "volume_id": self.volume_id.hex(), "snapshot_id": self.snapshot_id,
            "description": self.description, "created": self.created, "size": self.size,
            "chunk_size": self.chunk_size, "chunks": list(self.chunks),
        }, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, volume_id: bytes, snapshot_id: str) -> Manifest:
        """Parse an authenticated manifest; ExportDamaged if it does not follow the format or names
        another volume or snapshot than its AAD."""
        try:
            doc: Any = json.loads(data)
            if doc.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            m = cls(bytes.fromhex(doc["volume_id"]), doc["snapshot_id"], doc["size"], doc["description"],
                    float(doc["created"]), tuple(doc["chunks"]), doc["chunk_size"])
            m.check()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportDamaged(f"manifest {snapshot_id} is malformed ({type(e).__name__})") from None
        if m.volume_id != volume_id or m.snapshot_id != snapshot_id:
            raise ExportDamaged(f"manifest {snapshot_id} names another volume or snapshot than its file")
        return m

    def check(self) -> None:
        """ValueError unless every field is well-formed and the chunk list fits the size."""
        if len(self.volume_id) != 16 or not isinstance(self.description, str):
            raise ValueError("volume id or description")
        check_snapshot_id(self.snapshot_id)
        if type(self.size) is not int or self.size <= 0 or self.size % SECTOR:
            raise ValueError("size")
        if self.chunk_size != CHUNK_SIZE or len(self.chunks) != chunk_count(self.size):
            raise ValueError("chunks")
        if any(c is not None and not (isinstance(c, str) and _NAME.fullmatch(c)) for c in self.chunks):
            raise ValueError("object name")


@dataclass(frozen=True)
class KeyFile:
    """DIR/key: the volume an export directory belongs to and its export key, wrapped."""

    volume_id: bytes
    wrapped_key: bytes

    def pack(self) -> bytes:
        return json.dumps({"format": EXPORT_FORMAT, "volume_id": self.volume_id.hex(),
                           "wrapped_key": self.wrapped_key.hex()}, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, where: str) -> KeyFile:
        try:
            doc: Any = json.loads(data)
            fmt = doc["format"]
            if fmt == EXPORT_FORMAT:
                kf = cls(bytes.fromhex(doc["volume_id"]), bytes.fromhex(doc["wrapped_key"]))
                if len(kf.volume_id) == 16:
                    return kf
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        else:
            if fmt != EXPORT_FORMAT:
                raise ExportError(f"{where} has export format {fmt!r}, which this encfs does not read")
        raise ExportDamaged(f"{where} is not an encfs export key file (damaged)")
