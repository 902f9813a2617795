"""The nonce budget of each CMK backing-key version (docs/FORMAT.md §2, "Nonce policy").

Every blob draws a random 96-bit GCM nonce under the current backing key, and NIST SP
800-38D §8.3 allows 2^32 such seals per key. keys.json counts them per version (``sealed``).

Invariants:
- A process reserves seals in keys.json before it makes them (one metadata transaction per
  reservation; reservations double from the first request's size up to MAX_CHUNK, so a
  one-blob command writes the count once and a mount making files writes it rarely), and
  gives back what it did not use when it closes. A crash keeps its unused reservation
  counted: the count only errs high.
- No reservation takes a version past ROTATE_AT: a key with token material first gets a new
  backing-key version (automatic rotation, audited with trigger "nonce budget"); a key with
  imported material, which cannot rotate, refuses new blobs once its count would pass
  SEAL_LIMIT (re-import under a new key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from encfs.errors import KeyStateError
from encfs.keys.metadata import ORIGIN_EXTERNAL, KeyRecord, KeyStore

ROTATE_AT = 1 << 31
SEAL_LIMIT = (1 << 32) - (1 << 24)
MAX_CHUNK = 1 << 20
log = logging.getLogger("encfs.keys")


class SealBudget:
    """This process's reservations of seals, per (key id, backing-key version)."""

    def __init__(self, store: KeyStore, ready: Callable[[KeyRecord], object],
                 check: Callable[[KeyRecord, str], None], rotate: Callable[[KeyRecord], int],
                 audit_rotation: Callable[[KeyRecord, int], None]) -> None:
        """The key service's part: ``ready`` reaches the token for a record's current backing key;
        ``check`` refuses a record whose state does not allow an operation; ``rotate`` adds a
        backing-key version to a record (returns its number); ``audit_rotation`` records one."""
        self.store = store
        self._ready, self._check, self._rotate, self._audit_rotation = ready, check, rotate, audit_rotation
        self._left: dict[tuple[str, int], int] = {}
        self._chunk: dict[str, int] = {}

    def spend(self, rec: KeyRecord, n: int, operation: str) -> KeyRecord:
        """Take ``n`` seals under ``rec``'s current version for ``operation``; returns the record
        to seal with (a newer one if this reservation rotated the key)."""
        slot = (rec.key_id, rec.current.version)
        if self._left.get(slot, 0) >= n:
            self._left[slot] -= n
            return rec
        chunk = max(n, min(MAX_CHUNK, 2 * self._chunk.get(rec.key_id, 0)))
        self._ready(rec)  # the token must answer (a wrong PIN) before the count changes
        rotated = None
        with self.store.transaction() as db:
            fresh = db.resolve(rec.key_id)
            self._check(fresh, operation)
            if fresh.current.sealed + chunk > ROTATE_AT:
                if fresh.origin == ORIGIN_EXTERNAL:
                    if fresh.current.sealed + chunk > SEAL_LIMIT:
                        raise KeyStateError(f"key {fresh.key_id} has sealed {fresh.current.sealed} blobs under its "
                                            f"imported material, the most one key may (its nonce budget): import "
                                            f"new material under a new key")
                else:
                    rotated = self._rotate(fresh)
            fresh.current.sealed += chunk
        if rotated is not None:
            self._audit_rotation(fresh, rotated)
        self._chunk[rec.key_id] = chunk
        now = (fresh.key_id, fresh.current.version)  # ``slot`` unless this rotated the key
        self._left[now] = self._left.get(now, 0) + chunk - n
        return fresh

    def give_back(self) -> None:
        """Return unused reservations to keys.json (at close); a failure only leaves them counted."""
        unused = {slot: n for slot, n in self._left.items() if n}
        self._left.clear()
        if not unused:
            return
        try:
            with self.store.transaction() as db:
                for (key_id, number), n in unused.items():
                    rec = db.keys.get(key_id)
                    version = rec.version(number) if rec is not None else None
                    if version is not None:
                        version.sealed = max(0, version.sealed - n)
        except Exception as e:  # noqa: BLE001 - closing must not fail; the count only errs high
            log.warning("could not return unused seal reservations to keys.json: %s", getattr(e, "message", e))
