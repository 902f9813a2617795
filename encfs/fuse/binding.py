"""The in-place upgrade to bound directory ids and symlink targets (FORMAT.md §6.3).

A filesystem made before the features "bound-dirids", "bound-symlinks" and
"padded-xattr-names" is upgraded by its first read-write mount, before it is
served:

1. both config copies get the feature BINDING_UPGRADE (an encfs that does not know
   it refuses the filesystem from now on; this one reads legacy and bound forms);
2. a walk of the CIPHERDIR reseals every directory id (both copies, dirids.py) and
   replaces every legacy symlink by one bound to its place (symlinks.py);
3. both copies get the three features instead of BINDING_UPGRADE: from then on the
   legacy forms are refused as tampering.

Invariants: every step is idempotent and each leaves a state that every later mount
understands, so a crash anywhere is finished by the next read-write mount (a read-only
mount in between reads both forms). Xattr names need no walk: legacy entries stay
readable and are replaced when set.
"""

from __future__ import annotations

import logging
import os
import stat as stat_m
from pathlib import Path

from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.dirids import DirIds
from encfs.fuse.fsconfig import BINDING_FEATURES, BINDING_UPGRADE, FS_FORMAT, OpenedConfig, set_features
from encfs.fuse.names import DIRID_LEN, NameAuthError, NameCipher, is_internal
from encfs.fuse.symlinks import TMP_PREFIX, Symlinks
from encfs.fuseproto.wire import FuseError

log = logging.getLogger("encfs.fuse")


def needs_upgrade(features: tuple[str, ...]) -> bool:
    return BINDING_UPGRADE in features or not set(BINDING_FEATURES) <= set(features)


def upgrade(cipherdir: Path, opened: OpenedConfig) -> None:
    """Run the upgrade if ``opened.config`` needs it (a read-write mount, under the mount lock).
    What it did, or why it could not, goes to ``opened.warnings``; a filesystem that could not be
    upgraded is served in the form it has."""
    config = opened.config
    if not needs_upgrade(config.features) or config.format < FS_FORMAT:
        return
    base = tuple(f for f in config.features if f != BINDING_UPGRADE and f not in BINDING_FEATURES)
    try:
        if BINDING_UPGRADE not in config.features:
            set_features(cipherdir, opened, (*base, BINDING_UPGRADE))
        dirs, links, skipped = reseal_tree(os.fsencode(cipherdir), opened)
        set_features(cipherdir, opened, (*base, *BINDING_FEATURES))
    except OSError as e:
        opened.warnings.append(f"cannot bind directory ids and symlink targets to their place "
                               f"({e.strerror}); the next read-write mount tries again")
        return
    opened.warnings.append(f"upgraded: directory ids and symlink targets are bound to their place, xattr "
                           f"names padded ({dirs} directories, {links} symlinks"
                           + (f"; {skipped} damaged entries left as they were)" if skipped else ")"))


def reseal_tree(root: bytes, opened: OpenedConfig) -> tuple[int, int, int]:
    """Step 2: (directories, symlinks resealed, damaged entries skipped). OSError stops it."""
    with BackingDirs(root) as bd:  # through directory fds: backing paths past PATH_MAX
        return _reseal_tree(bd, opened)


def _reseal_tree(bd: BackingDirs, opened: OpenedConfig) -> tuple[int, int, int]:
    root = bd.root
    names = NameCipher(opened.keys.name_key, opened.keys.meta_key)
    dirids = DirIds(names, accept_legacy=True, write_sealed=True, read_only=False, backing=bd)
    symlinks = Symlinks(names, bd, long_targets="long-symlinks" in opened.config.features,
                        accept_legacy=True, write_bound=True)
    dirs = links = skipped = 0
    stack = [(root, bytes.fromhex(opened.config.fs_id)[:DIRID_LEN])]
    while stack:
        path, dirid = stack.pop()
        for entry in sorted(bd.listdir(path)):
            child = os.path.join(path, entry)
            if entry.startswith(TMP_PREFIX):  # a symlink move that a crash interrupted (symlinks.py)
                bd.unlink(child)
                continue
            if is_internal(entry):
                continue
            st = bd.lstat(child)
            try:
                if stat_m.S_ISDIR(st.st_mode):
                    stack.append((child, dirids.read(child, dirid)))
                    dirs += 1
                elif stat_m.S_ISLNK(st.st_mode):
                    stored = bd.readlink(child)
                    if symlinks.needs_reseal(stored):
                        target = symlinks.read(child, dirid)
                        symlinks.place_copy(target, child, dirid, st, bd.rename)
                        if st.st_nlink <= 1:
                            symlinks.drop(stored)
                        links += 1
            except (FuseError, NameAuthError) as e:
                log.error("%r: cannot be resealed (%s): left as it was", child, e)
                skipped += 1
    return dirs, links, skipped
