"""The inode map (encfs/fuse/inomap.py) without a mount: what the kernel's numbers name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from encfs.fuse.inomap import InodeMap
from encfs.fuseproto.wire import ROOT_ID, FuseError


def test_lookups_are_counted_and_the_root_is_never_forgotten(tmp_path: Path) -> None:
    m = InodeMap(os.fsencode(tmp_path))
    m.remember(7, b"/c/a")
    m.remember(7, b"/c/b")  # a hard link: two paths, two lookups
    m.remember(7, b"/c/a", count=False)  # READDIRPLUS entry that did not go out
    assert m.lookups[7] == 2 and m.paths[7] == {b"/c/a", b"/c/b"}
    assert not m.forget(7, 1) and m.forget(7, 1) and 7 not in m.lookups
    assert not m.forget(ROOT_ID, 5) and m.lookups[ROOT_ID] == 1
    m.drop_paths(7)
    with pytest.raises(FuseError) as e:
        m.path(7)
    assert e.value.errno == errno.ENOENT


def test_renames_move_every_path_under_the_entry_and_exchanges_swap(tmp_path: Path) -> None:
    m = InodeMap(os.fsencode(tmp_path))
    m.remember(2, b"/c/d")
    m.remember(3, b"/c/d/f")
    m.remember(4, b"/c/dd")  # a prefix of the name, not a child
    m.rename_paths(b"/c/d", b"/c/e")
    assert (m.path(2), m.path(3), m.path(4)) == (b"/c/e", b"/c/e/f", b"/c/dd")
    m.swap_paths(b"/c/e", b"/c/dd")
    assert (m.path(2), m.path(3), m.path(4)) == (b"/c/dd", b"/c/dd/f", b"/c/e")


def test_numbers_map_the_backing_root_and_aliases_end_at_the_next_lookup(tmp_path: Path) -> None:
    m = InodeMap(os.fsencode(tmp_path))
    root = os.lstat(tmp_path)
    assert m.ino(root) == ROOT_ID
    m.remember(9, b"/c/link")
    m.alias(9)  # a rename replaced the symlink: same number, new generation
    assert m.generation(9) == 1 and m.path(9) == b"/c/link"
    m.remember(9, b"/c/new-link")
    assert m.paths[9] == {b"/c/new-link"} and 9 not in m.aliases
