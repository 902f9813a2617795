"""Which targets hold blobs under each backing-key version, so that old versions can be retired.

After ``encfs key rotate``, old backing-key versions stay on the token because blobs sealed
under them still need them. ``encfs rekey TARGET`` moves a target's blobs to the newest
version; this ledger is how ``encfs key describe`` then knows an old version is unused and
``encfs key retire-version`` may destroy it.

Every blob encfs makes names its target in its encryption context: ``encfs:fs`` (file keys and
the filesystem secret of a CIPHERDIR), ``encfs:volume`` (a volume key), ``encfs:export`` (an
export directory's key). The target is ``fs:<id>``, ``volume:<id>`` or ``export:<id>``; any
other context (blobs made by ``encfs key encrypt``, ``generate-data-key``, ``re-encrypt``)
is ``other``. Each version in keys.json lists its targets in ``used_by`` (docs/FORMAT.md §4).

Invariants:
- A target is in a version's ``used_by`` before the first blob of it is sealed under that
  version: it is added under the metadata lock before the token call, so a crash can only
  over-record, never leave a used version looking unused.
- A target leaves a version only when a whole-target re-wrap or re-key has durably moved
  every blob of it elsewhere (``forget``, called by encfs rekey at its end).
- ``other`` never leaves a version: encfs cannot know where such blobs went. Nor does an
  export target: every export directory of a volume shares one context, so re-wrapping one
  directory says nothing of the others.
- ``used_by`` None (versions from before the ledger) means unknown, which counts as used.
- A version may be retired only when it is not current and its ``used_by`` is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from encfs.keys.metadata import KeyRecord, KeyStore, KeyVersion

OTHER = "other"
TARGET_KINDS = (("encfs:fs", "fs"), ("encfs:volume", "volume"), ("encfs:export", "export"))
FORGETTABLE = ("fs", "volume")  # kinds whose re-wrap reaches every blob of the target


def target_of(context: Mapping[str, str]) -> str:
    """The target a blob with this encryption context belongs to."""
    for key, kind in TARGET_KINDS:
        if key in context:
            return f"{kind}:{context[key]}"
    return OTHER


def still_used(version: KeyVersion) -> str | None:
    """Why ``version`` may not be retired (None: it may, as far as its use goes)."""
    if version.used_by is None:
        return "its use is not known (it is older than encfs's usage records)"
    if version.used_by:
        shown = ", ".join(version.used_by[:3]) + (f" and {len(version.used_by) - 3} more"
                                                   if len(version.used_by) > 3 else "")
        return f"blobs of {shown} are still under it"
    return None


class UsageLedger:
    """Records and forgets (target, version) pairs in keys.json."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def note(self, rec: KeyRecord, contexts: Iterable[Mapping[str, str]]) -> None:
        """Before sealing under ``rec``'s current version: record the contexts' targets."""
        version = rec.current
        if version.used_by is None:
            return  # unknown already counts as used
        new = {target_of(c) for c in contexts} - set(version.used_by)
        if not new:
            return
        with self.store.transaction() as db:
            fresh = db.resolve(rec.key_id).version(version.version)
            if fresh is not None and fresh.used_by is not None:
                fresh.used_by = sorted(set(fresh.used_by) | new)
        version.used_by = sorted(set(version.used_by) | new)  # this process's copy, until reloaded

    def forget(self, target: str, keep: tuple[str, int] | None) -> list[tuple[str, int]]:
        """Every blob of ``target`` is now under ``keep`` (key id, version; None: the target is
        gone, e.g. re-keyed into a new volume id): drop the target from every other version.
        Returns the (key id, version) pairs it left."""
        if target.split(":", 1)[0] not in FORGETTABLE:
            return []
        left = []
        with self.store.transaction() as db:
            for rec in db.keys.values():
                for v in rec.versions:
                    if (rec.key_id, v.version) == keep:
                        if v.used_by is not None and target not in v.used_by:
                            v.used_by = sorted([*v.used_by, target])
                    elif v.used_by and target in v.used_by:
                        v.used_by = [t for t in v.used_by if t != target]
                        left.append((rec.key_id, v.version))
        return left
