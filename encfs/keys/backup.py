"""Backups of the embedded key store: one sealed archive (docs/FORMAT.md section 10).

The embedded SoftHSM2 token holds the only copy of every CMK's backing keys: losing the state
directory loses every filesystem and volume under them. ``encfs hsm backup FILE`` seals what a
fresh machine needs to open them again (the token's object files, its PINs or sealed PINs,
keys.json and keys.json.bak) under a passphrase or a 32-byte recovery key:

    master    = scrypt(passphrase, salt, 2^log2_n, r, p, 32)       (passphrase archives)
              | HKDF-SHA256(recovery key, salt, "encfs backup v1 recovery key", 32)
    aead_key  = HKDF-SHA256(master, no salt, "encfs backup v1 aead", 32)
    check     = HKDF-SHA256(master, no salt, "encfs backup v1 check", 16)   (in the header)
    archive   = header (57 bytes) || AES-256-GCM(aead_key, nonce, payload JSON, AAD = header)

The check value tells a wrong passphrase (WrongPassphrase) from a damaged or tampered archive
(ArchiveDamaged): it lets a guess be tested without the AEAD, which the tag allows anyway, and
costs the same scrypt.

Invariants:
- The passphrase or recovery key comes from a terminal or a file named on the command line;
  never argv, the environment, the audit log or an error message.
- Backup copies under the key metadata lock (the lock every keys.json writer takes) and
  re-reads every file until two reads agree, so a store in use is copied consistently.
- Restore opens and checks the whole archive before it writes anything; it writes the new
  store beside the old (``.restore-*`` in the state directory), fsyncs it, and renames it
  into place with the token directory last (its softhsm2.conf is what makes a store exist);
  it refuses an existing store unless forced.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from encfs.diskio import fsync_dir
from encfs.errors import ArchiveDamaged, ConfigError, ModuleNotFound, StateError, UsageError, WrongPassphrase
from encfs.keys.audit import iso_time
from encfs.keys.metadata import KeyStore
from encfs.keys.softhsm import EmbeddedSoftHSM, conf_text
from encfs.keys.token import check_store_files
from encfs.keys.tokenguard import emptied_message

MAGIC = b"ENCFSBAK"
VERSION = 1
KIND_PASSPHRASE, KIND_RECOVERY_KEY = 1, 2
HEADER = struct.Struct(">8sBBBBB16s12s16s")  # magic version kind log2_n r p salt nonce check
SCRYPT_LOG2N, SCRYPT_R, SCRYPT_P = 17, 8, 1  # as pins.sealed: 128 MiB, 0.35 s on the 2-core VM
_MAX_MEMORY = 4 << 30
MAX_ARCHIVE = 1 << 30
# Paths an archive may hold, relative to the state directory (nothing else is ever written).
_PATH = re.compile(r"keys\.json(\.bak)?|softhsm/(user\.pin|so\.pin|pins\.sealed)"
                   r"|softhsm/tokens/[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*"
                   r"|secrets/[0-9a-f]{64}\.json|keyd/(policies|grants)/[0-9a-f-]{36}\.json|keyd\.toml")
# What a restore replaces; the key daemon's state and the secrets (issue #24) go with the keys they
# name: a backup without them would lose every secret, and every policy and grant, on a restore.
# In the order a restore places them: the token directory last (until softhsm/ appears, there is
# no store to open, so none is seen half-placed).
STORE_NAMES = ("keys.json", "keys.json.bak", "secrets", "keyd", "keyd.toml", "softhsm")
_STATE_DIRS = ("secrets", "keyd/policies", "keyd/grants")


@dataclass(frozen=True)
class Secret:
    """What seals an archive: a passphrase (UTF-8 bytes) or a 32-byte recovery key."""

    kind: int
    value: bytes

    def __repr__(self) -> str:  # never the secret
        return f"Secret(kind={self.kind})"


def _hkdf(key: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=salt, info=info).derive(key)


def derive(secret: Secret, log2_n: int, r: int, p: int, salt: bytes) -> tuple[bytes, bytes]:
    """(aead_key, check) for ``secret`` and the header's parameters."""
    if secret.kind == KIND_PASSPHRASE:
        master = Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(secret.value)
    else:
        master = _hkdf(secret.value, salt, b"encfs backup v1 recovery key", 32)
    return _hkdf(master, None, b"encfs backup v1 aead", 32), _hkdf(master, None, b"encfs backup v1 check", 16)


def seal(payload: bytes, secret: Secret, *, salt: bytes | None = None, nonce: bytes | None = None,
         log2_n: int = SCRYPT_LOG2N) -> bytes:
    """The archive of ``payload`` (salt and nonce random unless given: test vectors only)."""
    salt = os.urandom(16) if salt is None else salt
    nonce = os.urandom(12) if nonce is None else nonce
    params = (log2_n, SCRYPT_R, SCRYPT_P) if secret.kind == KIND_PASSPHRASE else (0, 0, 0)
    aead_key, check = derive(secret, *params, salt)
    header = HEADER.pack(MAGIC, VERSION, secret.kind, *params, salt, nonce, check)
    return header + AESGCM(aead_key).encrypt(nonce, payload, header)


def archive_kind(data: bytes, where: object) -> int:
    """KIND_PASSPHRASE or KIND_RECOVERY_KEY; ArchiveDamaged if the header is not one of ours."""
    if len(data) < HEADER.size + 16 or data[:8] != MAGIC:
        raise ArchiveDamaged(f"{where} is not an encfs key store backup (or it is truncated)")
    _magic, version, kind, log2_n, r, p, *_ = HEADER.unpack_from(data)
    if version != VERSION:
        raise ArchiveDamaged(f"{where} is an encfs backup of version {version}; this encfs reads version {VERSION}")
    if kind == KIND_PASSPHRASE:
        if not (10 <= log2_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16) or 128 * r * p << log2_n > _MAX_MEMORY:
            raise ArchiveDamaged(f"backup {where} is damaged: its key derivation parameters are out of range")
    elif kind != KIND_RECOVERY_KEY or (log2_n, r, p) != (0, 0, 0):
        raise ArchiveDamaged(f"backup {where} is damaged: unknown key kind {kind}")
    return int(kind)


def open_archive(data: bytes, secret: Secret, where: object) -> bytes:
    """The payload; WrongPassphrase if the check value differs, ArchiveDamaged if the tag fails."""
    kind = archive_kind(data, where)
    if kind != secret.kind:
        raise UsageError(f"backup {where} is sealed under a "
                         f"{'passphrase' if kind == KIND_PASSPHRASE else 'recovery key'}: give "
                         f"{'--passphrase-file FILE (or type it)' if kind == KIND_PASSPHRASE else '--recovery-key FILE'}")
    _magic, _version, _kind, log2_n, r, p, salt, nonce, check = HEADER.unpack_from(data)
    aead_key, expected = derive(secret, log2_n, r, p, salt)
    if not secrets.compare_digest(check, expected):
        raise WrongPassphrase(f"wrong {'passphrase' if kind == KIND_PASSPHRASE else 'recovery key'} "
                              f"for backup {where} (or its header is damaged)")
    try:
        return AESGCM(aead_key).decrypt(nonce, data[HEADER.size:], data[:HEADER.size])
    except InvalidTag:
        raise ArchiveDamaged(f"backup {where} failed authentication: it is damaged or was tampered with") from None


# -- payload ------------------------------------------------------------------------------------

def pack_payload(files: dict[str, bytes], created: float, source: str) -> bytes:
    doc = {"format": 1, "created": iso_time(created), "source": source,
           "files": [{"path": p, "data": base64.b64encode(files[p]).decode()} for p in sorted(files)]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def unpack_payload(payload: bytes, where: object) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Files by path, and the rest of the document; ArchiveDamaged for anything unexpected
    (an authenticated archive was still written by someone holding the passphrase)."""
    try:
        doc = json.loads(payload)
        if doc.get("format") != 1:
            raise ValueError("unknown payload format")
        files: dict[str, bytes] = {}
        for entry in doc["files"]:
            path = entry["path"]
            if not isinstance(path, str) or not _PATH.fullmatch(path) or path in files:
                raise ValueError(f"unexpected path {path!r}")
            files[path] = base64.b64decode(entry["data"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArchiveDamaged(f"backup {where} is damaged: {e}") from None
    if not any(p.startswith("softhsm/tokens/") for p in files):
        raise ArchiveDamaged(f"backup {where} is damaged: it holds no token")
    if "softhsm/pins.sealed" not in files and "softhsm/user.pin" not in files:
        raise ArchiveDamaged(f"backup {where} is damaged: it holds no PIN for its token")
    return files, {k: v for k, v in doc.items() if k != "files"}


# -- backup -------------------------------------------------------------------------------------

def _read_store(home: Path, emb: EmbeddedSoftHSM) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    names = ["keys.json", "keys.json.bak", "softhsm/user.pin", "softhsm/so.pin", "softhsm/pins.sealed"]
    try:
        for entry in sorted(os.scandir(emb.tokendir), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                raise StateError(f"unexpected entry {entry.path} in the token directory")
            for obj in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if not obj.is_file(follow_symlinks=False):
                    raise StateError(f"unexpected entry {obj.path} in the token directory")
                if obj.name.endswith(".object") and obj.stat(follow_symlinks=False).st_size == 0:
                    raise StateError(f"{emptied_message(obj.path)} and encfs could not put its copy back: "
                                     f"a backup would not restore it")
                names.append(f"softhsm/tokens/{entry.name}/{obj.name}")
        names.append("keyd.toml")
        for directory in _STATE_DIRS:  # secrets and the daemon's policies and grants: their .json files
            try:
                found = sorted(e.name for e in os.scandir(home / directory)
                               if e.name.endswith(".json") and e.is_file(follow_symlinks=False))
            except FileNotFoundError:
                continue
            names.extend(f"{directory}/{n}" for n in found)
        for name in names:
            if not _PATH.fullmatch(name):
                raise StateError(f"cannot back up {home / name}: the name is not one encfs writes")
            try:
                files[name] = (home / name).read_bytes()
            except FileNotFoundError:
                continue
    except OSError as e:
        raise StateError(f"cannot read the key store in {home}: {e.filename}: {e.strerror}") from None
    return files


def snapshot(home: Path) -> dict[str, bytes]:
    """The store's files, consistent: under the metadata lock, read until two reads agree (a
    token object SoftHSM2 writes outside that lock, e.g. a key being created, is re-read)."""
    emb = EmbeddedSoftHSM(home)
    if emb.provisioned:  # a token file a killed process left empty is put back first (tokenguard.py)
        try:
            emb.activate()
            check_store_files(emb.spec())
        except (ModuleNotFound, StateError, ConfigError):
            pass  # no usable SoftHSM2 here: _read_store still refuses an empty object file
    with KeyStore(home).locked():
        files = _read_store(home, emb)
        for _ in range(10):
            again = _read_store(home, emb)
            if again == files:
                return files
            files = again
            time.sleep(0.05)
    raise StateError(f"the key store in {home} kept changing while it was copied; try again")


def write_archive(out: Path, data: bytes) -> None:
    """``out`` created (mode 0600), never replaced: an old backup may be the only good one."""
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, out)  # fails if out exists, unlike rename
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # no hard links (vfat on a USB stick, some FUSE file systems): check, then rename
                if os.path.lexists(out):
                    raise FileExistsError(errno.EEXIST, "exists", str(out)) from None
                os.rename(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(str(out.parent))
    except FileExistsError:
        raise UsageError(f"{out} exists: a backup never replaces a file (choose another name)") from None
    except OSError as e:
        raise StateError(f"cannot write backup {out}: {e.strerror}") from None


# -- restore ------------------------------------------------------------------------------------

def existing_store(home: Path) -> list[str]:
    return [n for n in STORE_NAMES if os.path.lexists(home / n)]


def _write_tree(stage: Path, home: Path, files: dict[str, bytes]) -> None:
    for path in sorted(files):
        target = stage / path
        for depth in range(1, len(Path(path).parts)):  # mkdir(parents=True) would give parents 0777 & ~umask
            (stage / Path(*Path(path).parts[:depth])).mkdir(exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(files[path])
            f.flush()
            os.fsync(f.fileno())
    # softhsm2.conf names the token directory by absolute path: this home's, not the source's.
    softhsm = stage / "softhsm"
    fd = os.open(softhsm / "softhsm2.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(conf_text(home / "softhsm" / "tokens"))
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in stage.rglob("*")}, key=lambda p: -len(p.parts)):
        fsync_dir(str(d))


def restore(home: Path, files: dict[str, bytes], force: bool) -> list[str]:
    """Write ``files`` as the store of ``home``; return the names of the store it replaced."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with KeyStore(home).locked():
        replaced = existing_store(home)
        if replaced and not force:
            raise StateError(f"a key store exists at {home} ({', '.join(replaced)}); restoring would replace "
                             f"it: give --force")
        tag = secrets.token_hex(4)
        stage, old = home / f".restore-{tag}", home / f".restore-{tag}.old"
        try:
            stage.mkdir(mode=0o700)
            _write_tree(stage, home, files)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            raise StateError(f"cannot write the restored key store in {stage}: {e.strerror}") from None
        moved: list[str] = []
        placed: list[str] = []
        try:
            if replaced:
                old.mkdir(mode=0o700)
                for name in reversed(replaced):  # the token directory first: then there is no store
                    os.rename(home / name, old / name)
                    moved.append(name)
            for name in STORE_NAMES:  # the token directory last: until it appears there is no store
                if (stage / name).exists():
                    os.rename(stage / name, home / name)
                    placed.append(name)
            fsync_dir(str(home))
        except OSError as e:
            try:  # put the old store back: nothing half-restored survives
                for name in reversed(placed):  # the token directory first, back last
                    os.rename(home / name, stage / name)
                for name in reversed(moved):
                    os.rename(old / name, home / name)
                old.rmdir() if replaced else None
                where = f"nothing changed; the unpacked copy is in {stage}"
            except OSError:
                where = f"the previous store is in {old}, the unpacked copy in {stage}"
            raise StateError(f"cannot restore the key store into {home}: {e.strerror} ({where})") from None
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return replaced
