"""PKCS#11 token access: one code path for SoftHSM2 and vendor HSMs.

Invariants:
- Every call into a PKCS#11 module happens under ``_P11_LOCK``. python-pkcs11
  initialises modules without CKF_OS_LOCKING_OK, so SoftHSM2 runs without its
  own mutexes while python-pkcs11 releases the GIL around C_* calls; unlocked
  concurrent calls corrupt its heap (see docs/dev/pkcs11.md).
- A module is loaded (C_Initialize) once per process and re-initialised in a
  forked child before use, as PKCS#11 requires.
- Customer master keys are created sensitive, non-extractable token objects
  with only ENCRYPT/DECRYPT; nothing here ever reads CKA_VALUE of a CMK.
- Runs of encryptions (encrypt_gcm_many) may use a session-object copy of a
  CMK made inside the token (C_CopyObject keeps it sensitive and
  non-extractable). It has its own CKA_ID (never found by object id), lives
  only as long as this process's session, and destroy() destroys it with
  the token object.
- Sessions are opened read-write (CloudHSM has no read-only sessions).
- With the store lock held exclusively, the embedded token's files are checked before the
  module first reads them (a file a killed process left empty is put back) and copied after
  each call that wrote them (TokenSpec.store_copies: tokenguard.py).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import MGF, GCMParams
from pkcs11.util.rsa import encode_rsa_public_key

from encfs.errors import (
    ConfigError,
    InvalidCiphertext,
    ModuleNotFound,
    PinIncorrect,
    PinLocked,
    TokenError,
    TokenNotFound,
)
from encfs.keys.tokenguard import TokenFileCopies

_P11_LOCK = threading.RLock()
_COPY_PREFIX = b"encfs-session-copy:"  # CKA_ID of a session copy: the prefix, then the key's own id
_LIBS: dict[str, tuple[Any, int]] = {}  # module path -> (pkcs11.lib, pid that initialised it)

# Mechanisms the key service uses; `encfs hsm status` reports whether each is offered.
MECHANISMS_USED = {
    "CKM_AES_KEY_GEN": Mechanism.AES_KEY_GEN,
    "CKM_AES_GCM": Mechanism.AES_GCM,
    "CKM_RSA_PKCS_KEY_PAIR_GEN": Mechanism.RSA_PKCS_KEY_PAIR_GEN,
    "CKM_RSA_PKCS_OAEP": Mechanism.RSA_PKCS_OAEP,
}

# RSA-OAEP parameters for wrapped key import (AWS KMS RSAES_OAEP_SHA_1 / _SHA_256).
# SoftHSM 2.6 accepts only SHA-1 OAEP for C_UnwrapKey (SHA-256 gives ArgumentsBad).
OAEP_PARAMS = {
    "SHA_1": (Mechanism.SHA_1, MGF.SHA1, None),
    "SHA_256": (Mechanism.SHA256, MGF.SHA256, None),
}
IMPORT_RSA_BITS = 3072


class TagMismatch(InvalidCiphertext):
    """The token rejected a GCM tag (wrong key, AAD or tampered data)."""


@dataclass(frozen=True)
class PinSource:
    """Where a PIN comes from: a literal, a file, an environment variable, a prompt, or the
    embedded token's passphrase-sealed PIN file (encfs.keys.pinseal)."""

    kind: str  # "value" | "file" | "env" | "prompt" | "sealed"
    where: str = ""
    passphrase_file: str | None = None  # "sealed": where the passphrase comes from (None: prompt)

    @classmethod
    def parse(cls, spec: str) -> PinSource:
        """Parse ``file:PATH``, ``env:VAR`` or ``prompt``."""
        kind, _, where = spec.partition(":")
        if kind in ("file", "env") and where:
            return cls(kind, where)
        if spec == "prompt":
            return cls("prompt")
        raise ConfigError(f"PIN source must be file:PATH, env:VAR or prompt, got {spec!r}")

    def describe(self) -> str:
        return {"value": "a literal PIN", "prompt": "a prompt"}.get(self.kind, f"{self.kind}:{self.where}")

    def resolve(self, token_label: str) -> str:
        if self.kind == "value":
            return self.where
        if self.kind == "sealed":
            from pathlib import Path

            from encfs.keys import pinseal

            path = Path(self.where)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read sealed PIN file {path}: {e.strerror}") from None
            passphrase = pinseal.read_passphrase(self.passphrase_file, f"passphrase for token {token_label!r}")
            return pinseal.unseal(data, passphrase, path)["user"]
        if self.kind == "file":
            try:
                with open(self.where, encoding="utf-8") as f:
                    pin = f.read().strip("\r\n")
            except OSError as e:
                raise ConfigError(f"cannot read PIN file {self.where}: {e.strerror}") from None
            if not pin:
                raise ConfigError(f"PIN file {self.where} is empty")
            return pin
        if self.kind == "env":
            env_pin = os.environ.get(self.where)
            if not env_pin:
                raise ConfigError(f"PIN environment variable {self.where} is not set")
            return env_pin
        if not sys.stdin.isatty():
            raise ConfigError(
                f"no PIN for token {token_label!r}: give --pin-file, --pin-env or a pin-source"
            )
        return getpass.getpass(f"PIN for token {token_label!r}: ")


@dataclass(frozen=True)
class TokenSpec:
    """Which module and token to use, and how to log in."""

    module: str
    label: str | None
    pin: PinSource
    serial: str | None = None
    slot_id: int | None = None
    # The embedded token's copies of its files (tokenguard.py): checked under the store's exclusive
    # lock before the module reads the store, brought up to date after each call that wrote it.
    store_copies: TokenFileCopies | None = field(default=None, compare=False)

    def describe(self) -> str:
        for name, value in (("token", self.label), ("serial", self.serial), ("slot", self.slot_id)):
            if value is not None:
                return f"{name} {value!r}"
        return "the only token"


def load_module(path: str) -> Any:
    """Return the process-wide ``pkcs11.lib`` for ``path``, initialised for this pid."""
    with _P11_LOCK:
        entry = _LIBS.get(path)
        if entry is not None:
            lib, pid = entry
            if pid != os.getpid():
                lib.reinitialize()  # a forked child must C_Initialize again
                _LIBS[path] = (lib, os.getpid())
            return lib
        if not os.path.exists(path):
            raise ModuleNotFound(f"PKCS#11 module not found: {path}")
        try:
            lib = pkcs11.lib(path)
        except p11e.PKCS11Error as e:
            # python-pkcs11's exceptions often carry no text: name the error, and SoftHSM2's config,
            # the usual cause of a failing C_Initialize.
            conf = os.environ.get("SOFTHSM2_CONF")
            hint = f" (SOFTHSM2_CONF={conf})" if conf and "softhsm" in os.path.basename(path) else ""
            raise ModuleNotFound(f"cannot load PKCS#11 module {path}: {str(e) or type(e).__name__}{hint}") from None
        _LIBS[path] = (lib, os.getpid())
        return lib


_STORE_LOCKS: dict[str, list[Any]] = {}  # module + conf -> [fd, pid that opened it, mode held: None|"sh"|"ex"]
_MODULE_EPOCH: dict[str, int] = {}  # module path -> number of reloads (sessions of older epochs are dead)


@contextmanager
def _store_lock(module: str, exclusive: bool) -> Iterator[bool]:
    """A lock shared by this user's processes using ``module`` (and the same SOFTHSM2_CONF).

    SoftHSM2's file store is not safe across processes: C_Login rewrites
    token.object in place and object creation writes files in several steps,
    while any call in another process may re-read the store; a process that
    reads a half-written file loses the token (TokenNotFound, GeneralError on
    login) or the new object ("missing from the token") until it exits. So
    calls that write the store (login, create, destroy) hold this lock
    exclusively and all other calls hold it shared. Caller holds _P11_LOCK;
    nesting is allowed (a shared hold is upgraded, then restored).
    The lock file sits next to SOFTHSM2_CONF if that is set and writable (for
    the embedded token: ``$ENCFS_HOME/softhsm/``), else in the temp directory.
    Best effort: without a usable lock file, calls run unlocked (and it yields False).
    """
    conf = os.environ.get("SOFTHSM2_CONF", "")
    key = f"{module}\0{conf}"
    entry = _STORE_LOCKS.get(key)
    if entry is None or entry[1] != os.getpid():  # a forked child needs its own open file
        paths = [os.path.join(os.path.dirname(os.path.abspath(conf)), "encfs-token.lock")] if conf else []
        digest = hashlib.sha256(f"{os.path.realpath(module)}\0{conf}".encode()).hexdigest()[:16]
        paths.append(os.path.join(tempfile.gettempdir(), f"encfs-pkcs11-{os.getuid()}-{digest}.lock"))
        for path in paths:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                break
            except OSError:
                continue
        else:
            yield False
            return
        entry = _STORE_LOCKS[key] = [fd, os.getpid(), None]
    fd, _pid, held = entry
    want = "ex" if exclusive else "sh"
    if held == "ex" or held == want:
        yield True
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    entry[2] = want
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH if held == "sh" else fcntl.LOCK_UN)
        entry[2] = held


def check_store_files(spec: TokenSpec) -> None:
    """Put back token files a killed process left empty and bring their copies up to date
    (before a copy of the store is taken: ``encfs hsm backup``)."""
    with _P11_LOCK, _store_lock(spec.module, exclusive=True) as locked:
        _check_copies(spec, locked)


def _store_copies(spec: TokenSpec, locked: bool) -> TokenFileCopies | None:
    """The token files' copies, if kept and the caller holds _P11_LOCK and the store lock
    exclusively (``locked``): else a write of another process may be in progress."""
    return spec.store_copies if locked else None


def _check_copies(spec: TokenSpec, locked: bool) -> None:
    copies = _store_copies(spec, locked)
    if copies is not None:
        copies.check()


def _p11_name(e: BaseException) -> str:
    return type(e).__name__


def _refused(operation: str, obj_id: bytes) -> TokenError:
    return TokenError(f"token refuses to {operation} under key object {obj_id.hex()} "
                      f"(CKA_{operation.upper()} is false)")


class Token:
    """A logged-in connection to one token. Thread-safe; one session per process.

    Object ids (CKA_ID) are chosen by the caller and identify objects uniquely.
    """

    def __init__(self, spec: TokenSpec) -> None:
        self.spec = spec
        self._session: Any = None
        self._pid = 0
        self._token: Any = None
        self._slot: Any = None
        self._handles: dict[bytes, Any] = {}
        self._epoch = 0
        self._pin: str | None = None  # a PIN that was asked for, once logged in

    # -- connection ---------------------------------------------------------

    @property
    def logged_in(self) -> bool:
        """Whether this process holds a session (a failed call got past the login)."""
        return self._session is not None and self._pid == os.getpid()

    def _find_token(self, lib: Any) -> tuple[Any, Any]:
        spec = self.spec
        try:
            slots = lib.get_slots(token_present=True)
        except p11e.PKCS11Error as e:
            raise TokenError(f"cannot list slots of {spec.module}: {_p11_name(e)}") from None
        matches = []
        for slot in slots:
            if spec.slot_id is not None and slot.slot_id != spec.slot_id:
                continue
            try:
                tok = slot.get_token()
            except p11e.PKCS11Error:
                continue
            if not tok.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                continue
            if spec.label is not None and tok.label != spec.label:
                continue
            if spec.serial is not None and tok.serial.decode(errors="replace").strip() != spec.serial:
                continue
            matches.append((slot, tok))
        if not matches:
            raise TokenNotFound(f"no PKCS#11 token matches {spec.describe()} in {spec.module}")
        if len(matches) > 1:
            raise ConfigError(f"several PKCS#11 tokens match {spec.describe()}: name one by label or serial")
        return matches[0]

    def _open(self, copies_checked: bool = False) -> Any:
        """Return a logged-in session (caller holds _P11_LOCK; ``copies_checked``: the caller
        checked the token's files under the store lock it holds: _reload)."""
        if (self._session is not None and self._pid == os.getpid()
                and self._epoch == _MODULE_EPOCH.get(self.spec.module, 0)):
            return self._session
        with _store_lock(self.spec.module, exclusive=True) as locked:
            if not copies_checked:
                _check_copies(self.spec, locked)
            lib = load_module(self.spec.module)
            self._handles.clear()
            self._slot, self._token = self._find_token(lib)
        pin = self._pin if self._pin is not None else self.spec.pin.resolve(self._token.label)
        try:
            with _store_lock(self.spec.module, exclusive=True):
                self._session = self._token.open(rw=True, user_pin=pin)
        except p11e.PinIncorrect:
            raise PinIncorrect(f"wrong PIN for token {self._token.label!r}") from None
        except p11e.PinLenRange:
            raise PinIncorrect(f"wrong PIN for token {self._token.label!r} (bad length)") from None
        except p11e.PinLocked:
            raise PinLocked(f"token {self._token.label!r} is locked after too many wrong PINs") from None
        except p11e.UserAlreadyLoggedIn:
            # Another session of this process logged in already; login is per application.
            with _store_lock(self.spec.module, exclusive=True):
                self._session = self._token.open(rw=True)
        except p11e.PKCS11Error as e:
            raise TokenError(f"cannot log in to token {self._token.label!r}: {_p11_name(e)}") from None
        if self.spec.pin.kind in ("prompt", "sealed"):
            self._pin = pin  # a reconnection (_reload) must not ask again
        self._pid = os.getpid()
        self._epoch = _MODULE_EPOCH.get(self.spec.module, 0)
        return self._session

    def _reload(self) -> Any:
        """Make the module re-read its tokens (C_Finalize, C_Initialize), log in again.

        SoftHSM2 can miss objects that other processes created or destroyed: when
        this process's own C_GenerateKey/C_DestroyObject bumps the token's
        generation counter, it also absorbs the bumps of other processes and never
        re-indexes their objects. Used when an object looked for is not found.
        Returns the new session (the caller's old session is dead).
        """
        with _store_lock(self.spec.module, exclusive=True) as locked:
            _check_copies(self.spec, locked)
            load_module(self.spec.module).reinitialize()
            _MODULE_EPOCH[self.spec.module] = _MODULE_EPOCH.get(self.spec.module, 0) + 1
            self._session = None
            return self._open(copies_checked=True)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the token's locks across several calls (the key daemon's batch): one round of
        _P11_LOCK and the shared store lock per batch instead of per call (both nest)."""
        with _P11_LOCK, _store_lock(self.spec.module, False):
            yield

    @contextmanager
    def _locked(self, what: str, exclusive: bool = False) -> Iterator[Any]:
        """Run one PKCS#11 operation; ``exclusive`` if it writes the token store."""
        with _P11_LOCK:
            session = self._open()
            with _store_lock(self.spec.module, exclusive) as locked:
                try:
                    yield session
                    copies = _store_copies(self.spec, locked) if exclusive else None
                    if copies is not None:
                        copies.record()  # never fails the call that succeeded
                except (TagMismatch, TokenError, ConfigError):
                    raise
                except p11e.PKCS11Error as e:
                    if isinstance(e, (p11e.SessionHandleInvalid, p11e.SessionClosed, p11e.DeviceRemoved,
                                      p11e.TokenNotPresent, p11e.UserNotLoggedIn)):
                        self._session = None  # reconnect on the next call
                    raise TokenError(f"PKCS#11 {what} failed on token {self.spec.describe()}: "
                                     f"{_p11_name(e)}") from None

    def close(self) -> None:
        with _P11_LOCK:
            if self._session is not None and self._pid == os.getpid():
                try:
                    with _store_lock(self.spec.module, exclusive=True):  # the last close logs out
                        self._session.close()
                except p11e.PKCS11Error:
                    pass
            self._session = None
            self._handles.clear()

    # -- objects ------------------------------------------------------------

    def _key(self, session: Any, obj_id: bytes, cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
        cache_id = bytes([int(cls)]) + obj_id
        key = self._handles.get(cache_id)
        for attempt in (1, 2):
            if key is not None:
                break
            try:
                key = session.get_key(object_class=cls, id=obj_id)
            except p11e.NoSuchKey:
                if attempt == 2:
                    raise TokenError(f"key object {obj_id.hex()} is missing from the token") from None
                session = self._reload()  # perhaps another process created it (see _reload)
            except p11e.MultipleObjectsReturned:
                raise TokenError(f"several token objects share id {obj_id.hex()}") from None
        self._handles[cache_id] = key
        return key

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

    def has_object(self, obj_id: bytes) -> bool:
        with self._locked("find") as session:
            if any(True for _ in session.get_objects({Attribute.ID: obj_id})):
                return True
            session = self._reload()  # perhaps another process created it (see _reload)
            return any(True for _ in session.get_objects({Attribute.ID: obj_id}))

    def generate_aes_key(self, obj_id: bytes, label: str) -> None:
        """Create a 256-bit AES token key usable only for encrypt/decrypt."""
        with self._locked("C_GenerateKey", exclusive=True) as session:
            session.generate_key(
                KeyType.AES, 256, id=obj_id, label=label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.PRIVATE: True, Attribute.TOKEN: True},
            )

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

    def destroy(self, obj_id: bytes) -> int:
        """Destroy every token object whose CKA_ID is ``obj_id`` (and this session's copy of it);
        return how many token objects."""
        with self._locked("C_DestroyObject", exclusive=True) as session:
            copy = self._handles.pop(_COPY_PREFIX + obj_id, None)
            if copy is not None and copy is not self._handles.get(bytes([int(ObjectClass.SECRET_KEY)]) + obj_id):
                copy.destroy()  # a real copy, not the key itself (a token that refused to copy it)
            objs = list(session.get_objects({Attribute.ID: obj_id}))
            if not objs:
                session = self._reload()  # perhaps another process created it (see _reload)
                objs = list(session.get_objects({Attribute.ID: obj_id}))
            for obj in objs:
                obj.destroy()
            self._handles = {k: v for k, v in self._handles.items() if k[1:] != obj_id}
            return len(objs)

    def key_record(self, obj_id: bytes) -> tuple[str, bool] | None:
        """The state a secret key carries on the token: (CKA_LABEL, whether both CKA_ENCRYPT and
        CKA_DECRYPT are set); None when no such object exists."""
        with self._locked("C_GetAttributeValue") as session:
            try:
                key = self._key(session, obj_id)
            except TokenError:
                if self.has_object(obj_id):
                    raise
                return None
            label = key[Attribute.LABEL]
            usable = bool(key[Attribute.ENCRYPT]) and bool(key[Attribute.DECRYPT])
            return (label if isinstance(label, str) else ""), usable

    def set_key_record(self, obj_id: bytes, label: str, usable: bool) -> bool:
        """Record a key's state on the token: relabel it and set CKA_ENCRYPT/CKA_DECRYPT to
        ``usable`` (so the token itself refuses a key that is not usable). This process's
        session copy of the key (_working_copy) is destroyed: it kept the old attributes.
        Returns False if the token refuses to modify the attributes (CKA_MODIFIABLE false, or
        a token without C_SetAttributeValue); TokenError if the object is missing."""
        with self._locked("C_SetAttributeValue", exclusive=True) as session:
            copy = self._handles.pop(_COPY_PREFIX + obj_id, None)
            key = self._key(session, obj_id)
            if copy is not None and copy is not key:
                try:
                    copy.destroy()
                except p11e.PKCS11Error:
                    pass
            try:
                # Usable last when enabling, first when disabling: an interrupted change leaves
                # the key refused, never usable under a label that says otherwise.
                if usable:
                    key[Attribute.LABEL] = label
                key[Attribute.ENCRYPT] = usable
                key[Attribute.DECRYPT] = usable
                if not usable:
                    key[Attribute.LABEL] = label
            except (p11e.AttributeReadOnly, p11e.FunctionNotSupported, p11e.AttributeValueInvalid,
                    p11e.TemplateInconsistent, p11e.TokenWriteProtected):
                return False
            return True

    def usable_for_encrypt(self, session: Any, obj_id: bytes) -> bool:
        """Whether the token object (not this session's copy of it) still allows encryption."""
        return bool(self._key(session, obj_id)[Attribute.ENCRYPT])

    def count_encfs_objects(self) -> int:
        """How many token objects carry an encfs label (``encfs-cmk:``, ``encfs-import:``;
        docs/FORMAT.md section 3): keys some encfs key store made on this token."""
        with self._locked("C_FindObjects") as session:
            count = 0
            for obj in session.get_objects({Attribute.TOKEN: True}):
                try:
                    label = obj[Attribute.LABEL]
                except p11e.PKCS11Error:
                    continue
                count += isinstance(label, str) and label.startswith(("encfs-cmk:", "encfs-import:"))
            return count

    def key_attributes(self, obj_id: bytes) -> dict[str, Any]:
        """Non-secret attributes of a secret key, for describe/status."""
        with self._locked("C_GetAttributeValue") as session:
            key = self._key(session, obj_id)
            out: dict[str, Any] = {}
            for name, attr in (("sensitive", Attribute.SENSITIVE),
                               ("extractable", Attribute.EXTRACTABLE),
                               ("never_extractable", Attribute.NEVER_EXTRACTABLE),
                               ("value_len", Attribute.VALUE_LEN)):
                try:
                    out[name] = key[attr]
                except p11e.PKCS11Error:
                    out[name] = None
            return out

    # -- crypto -------------------------------------------------------------

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

    # -- imported key material ---------------------------------------------

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

    # -- introspection ------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self._locked("C_GetTokenInfo") as session:
            del session
            tok, slot = self._token, self._slot
            lib = load_module(self.spec.module)
            try:
                offered = set(slot.get_mechanisms())
            except p11e.PKCS11Error:
                offered = set()
            return {
                "module": self.spec.module,
                "library": lib.library_description,
                "library_manufacturer": lib.manufacturer_id,
                "slot": slot.slot_id,
                "token": tok.label,
                "serial": tok.serial.decode(errors="replace").strip(),
                "manufacturer": tok.manufacturer_id,
                "model": tok.model,
                "mechanisms": {name: (mech in offered) for name, mech in MECHANISMS_USED.items()},
            }


def rsa_spki_pem(pkcs1_der: bytes) -> bytes:
    """Convert a PKCS#1 RSAPublicKey (as python-pkcs11 encodes it) to SPKI PEM."""
    from asn1crypto.keys import RSAPublicKey
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    parsed = RSAPublicKey.load(pkcs1_der)
    key = RSAPublicNumbers(parsed["public_exponent"].native, parsed["modulus"].native).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
