"""``encfs rekey --full`` of a format-2 volume with snapshots: the history is replayed into the copy.

rekey.rekey_volume() makes the copy (``VOL.rekey.tmp``, a new volume id and a fresh data key) and
swaps it in by rename; this module fills it. Each snapshot, oldest first, and then the live map
is compared with the tree before it (MapTree.diff_runs: a leaf at the same page in both trees is
skipped unread), and only what differs is written to the copy: sectors mapped to another page
are copied (through rekey.copy_sectors, the same pipeline as a volume without snapshots), sectors
no longer mapped are discarded. After each snapshot's changes the copy takes the snapshot, with
the same id, description, creation time and size. So every snapshot of the copy reads as the
original's, and the copy's trees share what the original's share: its image is about the size
of the original's, not the size of every snapshot's contents.

A run killed at any moment leaves the copy with the snapshots it had taken (each taken by a
durable commit) and part of the next step. A new run carries on from there (resumable()): the
copy's snapshots must be the first of the volume's, with the same metadata, in a copy of the
same size under the requested CMK; else it starts again. The copy's live map is first rolled back
to its newest snapshot (the original may have changed since the cut run: a rollback, a discard),
and the step that was cut is done again whole: it writes every sector it changes, and discards
every one it unmaps, absolutely, so the sectors outside it are as the previous snapshot has them.

Invariants:
- The original is only read: it stays as it was, and authoritative, until the rename.
- A tree with a map node that fails authentication stops the re-key (VolumeError naming a
  sector under it): its sectors cannot be copied, and leaving them out would lose them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from encfs.block.cow import CowStore, Snapshot
from encfs.block.maptree import MapTree
from encfs.block.volume import OpenVolume, VolumeError, open_volume, read_volume_header
from encfs.errors import EncfsError
from encfs.keys.service import KeyService


def _same(a: Snapshot, b: Snapshot) -> bool:
    return (a.id, a.size, a.created, a.description) == (b.id, b.size, b.created, b.description)


def resumable(tmp: Path, ks: KeyService, key_id: str, size: int, snapshots: list[Snapshot]) -> OpenVolume | None:
    """The copy an interrupted run left at ``tmp``, open, if it can be carried on (see the module
    docstring); None if there is none or it cannot (the caller starts again)."""
    if not tmp.exists():
        return None
    try:
        header, _w = read_volume_header(tmp)
        if header.key_id != key_id or not header.copy_on_write or header.size != size:
            return None
        vol = open_volume(tmp, ks, seal_worker=True)
    except (EncfsError, OSError, ValueError):  # a copy cut before its header was written, ...
        return None
    taken = vol.store.snapshots if isinstance(vol.store, CowStore) else []
    if not taken or len(taken) > len(snapshots) or not all(map(_same, taken, snapshots)):
        vol.close()
        return None
    return vol


def refuse_damaged(tree: MapTree, failed: Callable[[int], str]) -> None:
    """VolumeError naming the first sector under a map node that fails authentication: its
    written sectors cannot be listed, and a copy without them would read zeros, not errors."""
    sector = tree.first_damaged()
    if sector is not None:
        raise VolumeError(failed(sector))


def replay(old: CowStore, new: OpenVolume, desc: str, failed: Callable[[int], str]) -> int:
    """Make ``new`` hold ``old``'s snapshots and live contents (see the module docstring); the
    sectors copied."""
    from encfs.block.rekey import copy_sectors

    store = new.store
    assert isinstance(store, CowStore)
    done = len(store.snapshots)  # taken by an interrupted run: resumable() checked them
    if done:
        # What the cut run wrote after its last snapshot was diffed against the original as it
        # was then; the original may have changed since (a rollback, a discard): the copy's live
        # map starts again from that snapshot, so the steps below leave nothing of it.
        store.rollback(store.snapshots[-1].id)
    prev = old.snapshot_tree(old.snapshots[done - 1]) if done else MapTree()
    copied = 0
    for snap in [*old.snapshots[done:], None]:
        tree = old.tree if snap is None else old.snapshot_tree(snap)
        refuse_damaged(tree, failed)
        copy, drop = prev.diff_runs(tree)
        for first, count in drop:
            store.forget_sectors(first, first + count)
        copied += copy_sectors(lambda at, n, t=tree: old.read_tree_view(t, at, n), copy, new,  # type: ignore[misc]
                               sum(n for _f, n in copy) * 4096, f"{desc} {snap.id if snap else 'live'}", failed)
        if snap is not None:
            store.snapshot(snap.id, snap.description, snap.created, size=snap.size)
        prev = tree
    return copied
