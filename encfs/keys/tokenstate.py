"""Key states recorded on the token itself, so that a restored keys.json cannot undo them.

keys.json (docs/FORMAT.md section 4) is a file in the state directory: restoring an old copy
of it would bring a Disabled key, or one pending deletion, back to Enabled. So those states
are also written onto every backing-key object of the CMK (docs/FORMAT.md section 3):

    CKA_LABEL   encfs-cmk:<uuid>:v<n>                                  Enabled
                encfs-cmk:<uuid>:v<n>:Disabled                         Disabled
                encfs-cmk:<uuid>:v<n>:PendingDeletion:<unix seconds>   PendingDeletion
    CKA_ENCRYPT, CKA_DECRYPT   true for Enabled, false otherwise

With CKA_ENCRYPT/CKA_DECRYPT false the token itself refuses the key, so the check costs
nothing on the hot path: when a token call fails, ``check`` reads the record and turns the
failure into one line naming the rollback. Destroyed material (deletion, deleted or expired
imported material) needs no record: the object is gone.

Invariants:
- A state change writes the token before keys.json (both inside the metadata transaction):
  an interrupted Disable leaves a key the token refuses; an interrupted Enable leaves a key
  keys.json refuses. Neither leaves a usable key that should not be.
- A new backing-key version (rotation) takes the token record of the current one, so a
  rotation due in a rolled-back keys.json does not create a usable version of a disabled key.
- A token that refuses C_SetAttributeValue still gets the state in keys.json; the caller
  warns that a restored keys.json would undo it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from encfs.errors import KeyStateError
from encfs.keys.audit import iso_time
from encfs.keys.metadata import DISABLED, ENABLED, PENDING_DELETION, KeyRecord, KeyVersion
from encfs.keys.token import Token

log = logging.getLogger("encfs.keys")
MISSING = "Destroyed"


def label(key_id: str, version: int, state: str = ENABLED, deletion_date: float | None = None) -> str:
    """CKA_LABEL of backing-key ``version`` of ``key_id`` in ``state``."""
    base = f"encfs-cmk:{key_id}:v{version}"
    if state == ENABLED:
        return base
    if state == PENDING_DELETION:
        return f"{base}:{PENDING_DELETION}:{int(deletion_date or 0)}"
    return f"{base}:{DISABLED}"


@dataclass(frozen=True)
class TokenState:
    """What the token says about one backing key: ENABLED, DISABLED, PENDING_DELETION or MISSING."""

    state: str
    deletion_date: float | None = None

    def describe(self) -> str:
        if self.state == MISSING:
            return "has no key material on the token (it was destroyed)"
        if self.state == PENDING_DELETION:
            return f"is pending deletion on the token (scheduled for {iso_time(self.deletion_date or 0)})"
        return f"is {self.state} on the token"


def read(token: Token, version: KeyVersion) -> TokenState:
    record = token.key_record(bytes.fromhex(version.token_id))
    if record is None:
        return TokenState(MISSING)
    text, usable = record
    parts = text.split(":")
    if len(parts) >= 5 and parts[3] == PENDING_DELETION:
        try:
            return TokenState(PENDING_DELETION, float(parts[4]))
        except ValueError:
            return TokenState(PENDING_DELETION)
    if not usable or (len(parts) >= 4 and parts[3] == DISABLED):
        return TokenState(DISABLED)  # a key the token refuses is not usable, whatever its label
    return TokenState(ENABLED)


def write(token: Token, rec: KeyRecord, state: str, deletion_date: float | None = None,
          versions: list[KeyVersion] | None = None) -> bool:
    """Record ``state`` on every backing key of ``rec`` that exists on the token. Returns False
    (after a warning) if the token would not record it."""
    recorded = True
    for v in rec.versions if versions is None else versions:
        tid = bytes.fromhex(v.token_id)
        if not token.has_object(tid):
            continue  # destroyed material: nothing to mark, and nothing to use
        recorded &= token.set_key_record(tid, label(rec.key_id, v.version, state, deletion_date), state == ENABLED)
    if not recorded:
        log.warning("token %s does not let encfs record that key %s is %s; the state is kept in keys.json "
                    "only, so restoring an older keys.json would undo it", token.spec.describe(), rec.key_id, state)
    return recorded


def rollback_error(rec: KeyRecord, version: KeyVersion, found: TokenState, operation: str) -> KeyStateError:
    return KeyStateError(
        f"key {rec.key_id} (version {version.version}) {found.describe()}, but keys.json says {rec.state}: "
        f"keys.json is older than the token (restored from a backup?): rollback detected, {operation} refused")


def check(token: Token, rec: KeyRecord, version: KeyVersion, operation: str) -> None:
    """After a failed token call: raise the rollback error if the token's record of ``version``
    is more restrictive than keys.json's (the caller re-raises its own error otherwise)."""
    found = read(token, version)
    if found.state != ENABLED and rec.state == ENABLED:
        raise rollback_error(rec, version, found, operation)
