"""Key administration for KeyService (service.py): creating, listing and describing CMKs, their
aliases, their state changes (enable, disable, scheduled deletion and its cancellation) and
their rotation (on demand, the automatic schedule, retiring an old backing-key version; the
scheduled rotations themselves run in KeyService._run_due_transitions). KeyService takes these
methods from KeyAdministration. Of service.py's invariants, these methods keep:

- Backing keys are made on the token (KeyService._add_version) and never leave it; a key whose
  keys.json record fails to commit has its new material destroyed again.
- Disabled and PendingDeletion are written to the token (tokenstate) before keys.json records
  them, and a change keys.json allows but the token's record refuses is reported as a rollback.
  A state change whose keys.json write fails (a full disk) gives the token back its state.
- Only a version no known blob is under (encfs.keys.usage) is retired, and keys.json marks it
  retired before the token destroys it.
- Every call is audited (KeyService._audited), success or failure, and a state change first
  applies any transition that is due (KeyService._db).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from encfs.errors import KeyStateError, UsageError
from encfs.keys import tokenstate
from encfs.keys.describe import key_metadata_json, key_state_error
from encfs.keys.metadata import (
    DISABLED,
    ENABLED,
    ORIGIN_EXTERNAL,
    ORIGIN_TOKEN,
    PENDING_DELETION,
    PENDING_IMPORT,
    ImportState,
    KeyRecord,
    normalize_alias,
)
from encfs.keys.servicefields import ServiceFields
from encfs.keys.usage import still_used

log = logging.getLogger("encfs.keys")

DELETION_WINDOW_DAYS = (7, 30)
ROTATION_PERIOD_DAYS = (90, 2560)


class KeyAdministration(ServiceFields):
    """The key-management operations of service.KeyService (a mixin: the service's state)."""

    def create_key(self, description: str = "", alias: str | None = None,
                   origin: str = ORIGIN_TOKEN) -> dict[str, Any]:
        """Create a CMK (on the token, or PendingImport for origin EXTERNAL)."""
        with self._audited("CreateKey") as info:
            if origin not in (ORIGIN_TOKEN, ORIGIN_EXTERNAL):
                raise UsageError(f"origin must be {ORIGIN_TOKEN} or {ORIGIN_EXTERNAL}, not {origin!r}")
            alias_name = normalize_alias(alias) if alias else None
            if alias_name:
                info["alias"] = alias_name  # the trail finds a deleted key by its former alias too
            if alias_name in self._db().aliases:  # also makes sure the key store is not a lost one
                raise UsageError(f"alias {alias_name} already exists")
            now = self.clock()
            rec = KeyRecord(key_id=str(uuid.uuid4()), created=now, description=description, origin=origin,
                            state=ENABLED if origin == ORIGIN_TOKEN else PENDING_IMPORT)
            info["key_id"] = rec.key_id
            if origin == ORIGIN_TOKEN:
                info["key_version"] = self._add_version(rec, now)
            else:
                rec.imported = ImportState()
            try:
                with self.store.transaction() as db:
                    if alias_name:
                        if alias_name in db.aliases:
                            raise UsageError(f"alias {alias_name} already exists")
                        db.aliases[alias_name] = rec.key_id
                    db.keys[rec.key_id] = rec
                    result = key_metadata_json(rec, db)
            except BaseException:
                self._destroy_material(rec, versions=True, wrapping=False)
                raise
            return result

    def list_keys(self) -> list[dict[str, Any]]:
        with self._audited("ListKeys"):
            db = self._db()
            return [key_metadata_json(r, db) for r in sorted(db.keys.values(), key=lambda r: r.created)]

    def describe_key(self, key: str) -> dict[str, Any]:
        with self._audited("DescribeKey") as info:
            db = self._db()
            rec = db.resolve(key)
            info["key_id"] = rec.key_id
            out = key_metadata_json(rec, db)
            if rec.versions and rec.state != PENDING_IMPORT:
                found = tokenstate.read(self.token, rec.current)
                out["TokenState"] = found.state  # differs from KeyState after a rollback of keys.json
                if found.state != tokenstate.MISSING:
                    out["TokenAttributes"] = self.token.key_attributes(bytes.fromhex(rec.current.token_id))
            return out

    def list_aliases(self) -> dict[str, str]:
        with self._audited("ListAliases"):
            return dict(self._db().aliases)

    def update_alias(self, alias: str, key: str) -> str:
        """Point ``alias`` at ``key``, creating the alias if needed. Returns the key id."""
        with self._audited("UpdateAlias") as info:
            name = normalize_alias(alias)
            info["alias"] = name
            with self.store.transaction() as db:
                rec = db.resolve(key)
                info["key_id"] = rec.key_id
                db.aliases[name] = rec.key_id
            return rec.key_id

    def delete_alias(self, alias: str) -> None:
        with self._audited("DeleteAlias") as info:
            name = normalize_alias(alias)
            info["alias"] = name
            with self.store.transaction() as db:
                if name not in db.aliases:
                    raise UsageError(f"alias {name} does not exist")
                info["key_id"] = db.aliases.pop(name)

    def _transition(self, operation: str, key: str, change: Callable[[KeyRecord, float], None],
                    on_token: bool = False) -> dict[str, Any]:
        """A change of ``key``'s record. ``on_token``: a state change, written on the token first (a
        crash before keys.json is written leaves the token the more restrictive, which refuses the
        key as rolled back), then in keys.json. If it fails after the token was written (keys.json
        cannot be written on a full disk, or the token took one version's state and refused the
        next), each version gets back what the token said before, under the same lock as the change:
        the command failed, and the key stays as it was."""
        with self._audited(operation) as info:
            self._db()  # apply anything due first
            with self.store.locked():
                before: dict[str, tokenstate.TokenState] = {}
                prior: dict[str, Any] | None = None
                rec: KeyRecord | None = None
                try:
                    with self.store.transaction() as db:
                        rec = db.resolve(key)
                        info["key_id"] = rec.key_id
                        if on_token:
                            prior = asdict(rec)
                            before = {v.token_id: tokenstate.read(self.token, v) for v in rec.versions}
                        change(rec, self.clock())
                        return key_metadata_json(rec, db)
                except Exception:
                    if before and rec is not None and prior is not None:
                        info["token_state_restored"] = self._put_back(operation, rec, prior, before)
                    raise

    def _put_back(self, operation: str, rec: KeyRecord, prior: dict[str, Any],
                  before: dict[str, tokenstate.TokenState]) -> bool:
        """Give every version of ``rec``'s key back the token state ``before`` it had, unless
        keys.json holds the change after all (its write failed after the rename: a directory
        sync); False (and a warning) if the token would not take it back."""
        try:
            stored = self.store.load().keys.get(rec.key_id)
            if stored is not None and asdict(stored) != prior:
                return True  # keys.json has the change: the token agrees with it
            for v in rec.versions:
                old = before.get(v.token_id)
                if old is None or old.state == tokenstate.MISSING:
                    continue
                now = tokenstate.read(self.token, v)
                if (now.state, now.deletion_date) != (old.state, old.deletion_date):
                    tokenstate.write(self.token, rec, old.state, old.deletion_date, versions=[v])
            return True
        except Exception as e:  # noqa: BLE001 - the command's own error is the one to report
            log.warning("key %s: %s failed, and the token keeps the state it gave the key (%s); "
                        "`encfs key enable` or `encfs key cancel-deletion` puts it right", rec.key_id,
                        operation, e)
            return False

    def _token_says(self, rec: KeyRecord) -> tokenstate.TokenState | None:
        """The token's record of the current backing key (None: no material was ever made)."""
        return tokenstate.read(self.token, rec.current) if rec.versions else None

    def enable_key(self, key: str) -> dict[str, Any]:
        def change(rec: KeyRecord, now: float) -> None:
            if rec.state not in (ENABLED, DISABLED):
                raise key_state_error(rec, "EnableKey")
            found = self._token_says(rec)
            if found is not None and found.state == PENDING_DELETION:
                raise KeyStateError(f"key {rec.key_id} {found.describe()}, but keys.json says {rec.state}: keys.json "
                                    f"was restored from an older copy; run `encfs key cancel-deletion` first")
            tokenstate.write(self.token, rec, ENABLED)
            rec.state = ENABLED
        return self._transition("EnableKey", key, change, on_token=True)

    def disable_key(self, key: str) -> dict[str, Any]:
        def change(rec: KeyRecord, now: float) -> None:
            if rec.state not in (ENABLED, DISABLED):
                raise KeyStateError(f"key {rec.key_id} is {rec.state}: only Enabled keys can be disabled")
            found = self._token_says(rec)
            if found is not None and found.state == PENDING_DELETION:
                raise tokenstate.rollback_error(rec, rec.current, found, "DisableKey")
            tokenstate.write(self.token, rec, DISABLED)
            rec.state = DISABLED
        return self._transition("DisableKey", key, change, on_token=True)

    def schedule_key_deletion(self, key: str, days: int = 30) -> dict[str, Any]:
        lo, hi = DELETION_WINDOW_DAYS

        def change(rec: KeyRecord, now: float) -> None:
            if not lo <= days <= hi:
                raise UsageError(f"deletion waiting period must be {lo} to {hi} days, not {days}")
            if rec.state == PENDING_DELETION:
                raise KeyStateError(f"key {rec.key_id} is already pending deletion")
            found = self._token_says(rec)
            if found is not None and found.state == PENDING_DELETION:
                raise tokenstate.rollback_error(rec, rec.current, found, "ScheduleKeyDeletion")
            deletion_date = now + days * 86400
            tokenstate.write(self.token, rec, PENDING_DELETION, deletion_date)
            rec.pre_deletion_state = rec.state
            rec.state = PENDING_DELETION
            rec.deletion_date = deletion_date
        return self._transition("ScheduleKeyDeletion", key, change, on_token=True)

    def cancel_key_deletion(self, key: str) -> dict[str, Any]:
        def change(rec: KeyRecord, now: float) -> None:
            found = self._token_says(rec)
            rolled_back = rec.state != PENDING_DELETION and found is not None and found.state == PENDING_DELETION
            if rec.state != PENDING_DELETION and not rolled_back:
                raise KeyStateError(f"key {rec.key_id} is {rec.state}, not pending deletion")
            # As in AWS KMS: a key whose deletion is cancelled comes back Disabled
            # (or PendingImport if it has no key material).
            if rolled_back:  # keys.json lost the deletion, the token did not: it says what was before
                rec.pre_deletion_state = PENDING_IMPORT if rec.state == PENDING_IMPORT else DISABLED
            tokenstate.write(self.token, rec, DISABLED)
            rec.state = PENDING_IMPORT if rec.pre_deletion_state == PENDING_IMPORT else DISABLED
            rec.deletion_date = rec.pre_deletion_state = None
        return self._transition("CancelKeyDeletion", key, change, on_token=True)

    # -- rotation -----------------------------------------------------------

    def rotate_key(self, key: str) -> dict[str, Any]:
        """On-demand rotation: a new backing-key version becomes current."""
        with self._audited("RotateKeyOnDemand") as info:
            self._db()
            with self.store.transaction() as db:
                rec = db.resolve(key)
                info["key_id"] = rec.key_id
                self._require(rec, "RotateKeyOnDemand")
                if rec.origin == ORIGIN_EXTERNAL:
                    raise KeyStateError(f"key {rec.key_id} has imported key material and cannot be rotated")
                found = self._token_says(rec)
                if found is not None and found.state != ENABLED:
                    info["rollback_detected"] = True
                    raise tokenstate.rollback_error(rec, rec.current, found, "RotateKeyOnDemand")
                info["key_version"] = self._add_version(rec, self.clock(), "RotateKeyOnDemand")
                return key_metadata_json(rec, db)

    def retire_key_version(self, key: str, number: int) -> dict[str, Any]:
        """Destroy an old backing-key version that no known blob needs (usage.py): keys.json
        marks it retired first, so that nothing unwraps under it even if the token call fails;
        a second call destroys what is left."""
        with self._audited("RetireKeyVersion") as info:
            self._db()
            with self.store.transaction() as db:
                rec = db.resolve(key)
                info["key_id"], info["key_version"] = rec.key_id, number
                version = rec.version(number)
                if version is None:
                    raise UsageError(f"key {rec.key_id} has no version {number}")
                if version is rec.current:
                    raise KeyStateError(f"version {number} is key {rec.key_id}'s current version: rotate the key "
                                        f"(`encfs key rotate`) and move its blobs (`encfs rekey TARGET`) first")
                if version.retired is None:
                    why = still_used(version)
                    if why is not None:
                        raise KeyStateError(f"version {number} of key {rec.key_id} cannot be retired: {why}; "
                                            f"`encfs rekey TARGET` moves a target to the current version")
                    version.retired = self.clock()
                result = key_metadata_json(rec, db)
            self.token.destroy(bytes.fromhex(version.token_id))
            return result

    def enable_key_rotation(self, key: str, period_days: int = 365) -> dict[str, Any]:
        lo, hi = ROTATION_PERIOD_DAYS

        def change(rec: KeyRecord, now: float) -> None:
            if not lo <= period_days <= hi:
                raise UsageError(f"rotation period must be {lo} to {hi} days, not {period_days}")
            self._require(rec, "EnableKeyRotation")
            if rec.origin == ORIGIN_EXTERNAL:
                raise KeyStateError(f"key {rec.key_id} has imported key material and cannot be rotated")
            rec.rotation_period_days = period_days
            rec.last_rotation = now
        return self._transition("EnableKeyRotation", key, change)

    def disable_key_rotation(self, key: str) -> dict[str, Any]:
        def change(rec: KeyRecord, now: float) -> None:
            rec.rotation_period_days = None
            rec.last_rotation = None
        return self._transition("DisableKeyRotation", key, change)
