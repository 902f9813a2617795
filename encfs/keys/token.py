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

What lives where: tokenspec.py (PinSource, TokenSpec), pkcs11_module.py (module loading,
_P11_LOCK, the store lock), tokencrypto.py (AES-GCM and session copies: the mixin TokenCrypto),
tokenimport.py (wrapped import: the mixin TokenImport); here, Token's connection, objects and
introspection. Every name this module defined before is still importable from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from encfs.errors import ConfigError, PinIncorrect, PinLocked, TokenError, TokenNotFound
from encfs.keys.pkcs11_module import (
    _LIBS,
    _MODULE_EPOCH,
    _P11_LOCK,
    _STORE_LOCKS,
    _check_copies,
    _store_copies,
    _store_lock,
    check_store_files,
    load_module,
)
from encfs.keys.tokencrypto import _COPY_PREFIX, TagMismatch, TokenCrypto, _refused
from encfs.keys.tokenimport import IMPORT_RSA_BITS, OAEP_PARAMS, TokenImport, rsa_spki_pem
from encfs.keys.tokenspec import PinSource, TokenSpec

# Mechanisms the key service uses; `encfs hsm status` reports whether each is offered.
MECHANISMS_USED = {
    "CKM_AES_KEY_GEN": Mechanism.AES_KEY_GEN,
    "CKM_AES_GCM": Mechanism.AES_GCM,
    "CKM_RSA_PKCS_KEY_PAIR_GEN": Mechanism.RSA_PKCS_KEY_PAIR_GEN,
    "CKM_RSA_PKCS_OAEP": Mechanism.RSA_PKCS_OAEP,
}


def _p11_name(e: BaseException) -> str:
    return type(e).__name__


class Token(TokenCrypto, TokenImport):
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

    def login(self) -> None:
        """Log in now (every call logs in when it first needs to): a long-lived holder of the token
        (the key daemon) finds a wrong PIN at its start, not in each client's request."""
        with _P11_LOCK:
            self._open()

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
                    raise TokenError(f"PKCS#11 {what} failed on {self.spec.describe()}: "
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
            # Every match is read, which ends the search (C_FindObjectsFinal): python-pkcs11's get_key
            # leaves it open when it finds two, and the session then refuses every later search.
            found = list(session.get_objects({Attribute.CLASS: cls, Attribute.ID: obj_id}))
            if len(found) > 1:
                raise TokenError(f"several token objects share id {obj_id.hex()}")
            if found:
                key = found[0]
            elif attempt == 2:
                raise TokenError(f"key object {obj_id.hex()} is missing from the token")
            else:
                session = self._reload()  # perhaps another process created it (see _reload)
        self._handles[cache_id] = key
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


# Every name this module defined before the split stays importable here, the private ones too
# (softhsm.py reads _LIBS).
__all__ = ["IMPORT_RSA_BITS", "MECHANISMS_USED", "OAEP_PARAMS", "_COPY_PREFIX", "_LIBS", "_MODULE_EPOCH", "_P11_LOCK",
           "_STORE_LOCKS", "PinSource", "TagMismatch", "Token", "TokenSpec", "_check_copies", "_p11_name", "_refused",
           "_store_copies", "_store_lock", "check_store_files", "load_module", "rsa_spki_pem"]
