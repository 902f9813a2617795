"""Directory ids and symlink targets bound to their place, padded xattr names, long-name side
files checked (issue #19 items 5 and 6; FORMAT.md §6.3).

Attacks are made as attacker B would (write access to the CIPHERDIR, no key): copy a directory
id, swap symlink targets, swap long-name side files. Filesystems of the release before these
features (tests/data/fs-v2.tar.gz, see tests/data/README.md) keep working and are upgraded in
place by their first read-write mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from fsconfig_tool import remac
from fuse_helpers import Mount, cold_read, crash_during, expect_errno
from releases import extract_release

from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.dirids import DirIds
from encfs.fuse.fsconfig import BINDING_FEATURES, BINDING_UPGRADE, SPARSE_FEATURE
from encfs.fuse.names import DIRID_XATTR, SEALED_DIRID_LEN, NameCipher

LONG = "L" * 200
DIRID_FILE = "encfs.dirid"


def user_entries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if "." not in p.name)


# -- attacks ----------------------------------------------------------------------------------------

def test_a_directory_id_copied_into_another_directory_is_refused(fs, fs_home: Path, tmp_path: Path) -> None:
    """gocryptfs's directory-IV poisoning: d2 given d1's id (both copies) and d1's entry shows d1's
    name in d2. With ids sealed for their place, d2's listing is EIO."""
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "d1").mkdir()
        (d1,) = user_entries(cipher)
        (plain / "d1" / "secret").write_bytes(b"s")
        (plain / "d2").mkdir()
        (d2,) = [p for p in user_entries(cipher) if p != d1]
        (plain / "d2" / "other").write_bytes(b"o")
    (d2 / DIRID_FILE).chmod(0o644)
    (d2 / DIRID_FILE).write_bytes((d1 / DIRID_FILE).read_bytes())
    os.setxattr(d2, DIRID_XATTR, os.getxattr(d1, DIRID_XATTR))
    (entry,) = user_entries(d1)
    shutil.copy(entry, d2 / entry.name)
    with Mount(cipher, plain, fs_home, log=tmp_path / "m.log"):
        assert sorted(os.listdir(plain / "d1")) == ["secret"]
        expect_errno(errno.EIO, os.listdir, plain / "d2")
    assert "refused" in (tmp_path / "m.log").read_text()


@pytest.mark.parametrize("length", [10, 3100])  # inline targets; long ones (a file in encfs.longlinks)
def test_symlink_targets_swapped_between_links_read_eio(fs, fs_home: Path, length: int) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        os.symlink("a" * length, plain / "l1")
        (b1,) = user_entries(cipher)
        os.symlink("b" * length, plain / "l2")
        (b2,) = [p for p in user_entries(cipher) if p != b1]
    t1, t2 = os.readlink(b1), os.readlink(b2)
    for link, target in ((b1, t2), (b2, t1)):
        link.unlink()
        os.symlink(target, link)
    with Mount(cipher, plain, fs_home):
        expect_errno(errno.EIO, os.readlink, plain / "l1")
        expect_errno(errno.EIO, os.readlink, plain / "l2")


def test_a_long_name_side_file_that_does_not_match_its_entry_is_skipped(fs, fs_home: Path, tmp_path: Path) -> None:
    cipher, plain = fs
    a, b = "a" * 230, "b" * 230
    with Mount(cipher, plain, fs_home):
        (plain / a).write_bytes(b"A")
        (plain / b).write_bytes(b"B")
    sides = sorted(cipher.glob("encfs.ln.*.name"))
    assert len(sides) == 2
    sides[1].chmod(0o644)
    sides[1].write_bytes(sides[0].read_bytes())  # both entries now claim one name
    with Mount(cipher, plain, fs_home, log=tmp_path / "m.log"):
        names = os.listdir(plain)
        assert len(names) == 1 and names[0] in (a, b), "a side file named an entry that is not its own"
    assert "side file does not match" in (tmp_path / "m.log").read_text()


def test_xattr_names_are_padded(fs, fs_home: Path) -> None:
    """Names of 1 to 16 bytes give backing names of one length, as file names do."""
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "f").write_bytes(b"x")
        os.setxattr(plain / "f", "user.a", b"1")
        os.setxattr(plain / "f", "user.abcdefghij", b"2")  # 15 bytes
        assert sorted(os.listxattr(plain / "f")) == ["user.a", "user.abcdefghij"]
        assert os.getxattr(plain / "f", "user.a") == b"1"
    (backing,) = user_entries(cipher)
    ours = [n for n in os.listxattr(backing) if n.startswith("user.encfs.x")]
    assert len(ours) == 2 and all(n.startswith("user.encfs.xp.") for n in ours)
    assert len(ours[0]) == len(ours[1])


# -- renames: the bound forms follow their entry ----------------------------------------------------

def test_renamed_directories_and_symlinks_stay_readable(fs, fs_home: Path) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "a" / "b").mkdir(parents=True)
        (plain / "a" / "b" / "f").write_bytes(b"f")
        os.symlink("t" * 3100, plain / "a" / "long")
        os.symlink("short", plain / "a" / "short")
        os.rename(plain / "a", plain / ("x" * 240))  # to a long name
        os.rename(plain / ("x" * 240) / "long", plain / "long2")
        os.rename(plain / ("x" * 240) / "short", plain / ("x" * 240) / "b" / "short2")
        os.rename(plain / ("x" * 240) / "b", plain / "b2")
        assert os.readlink(plain / "long2") == "t" * 3100
        assert os.readlink(plain / "b2" / "short2") == "short"
        assert os.lstat(plain / "b2" / "short2").st_size == 5
        os.link(plain / "long2", plain / "long3", follow_symlinks=False)
        assert os.readlink(plain / "long3") == "t" * 3100
    assert len(list((cipher / "encfs.longlinks").iterdir())) == 2, "each link has a target file of its own"
    with Mount(cipher, plain, fs_home):
        assert sorted(os.listdir(plain)) == ["b2", "long2", "long3", "x" * 240]
        assert cold_read(plain / "b2" / "f") == b"f"
        assert os.readlink(plain / "b2" / "short2") == "short"
        assert os.readlink(plain / "long2") == os.readlink(plain / "long3") == "t" * 3100
        os.unlink(plain / "long2")
        os.unlink(plain / "long3")
    assert list((cipher / "encfs.longlinks").iterdir()) == []


def test_every_crash_point_of_a_directory_rename_leaves_it_readable(tmp_path: Path) -> None:
    """dirids.py's two steps around the backing rename, stopped after each one (as kill -9 would)."""
    names = NameCipher(os.urandom(64), os.urandom(32))
    ids = DirIds(names, accept_legacy=False, write_sealed=True, read_only=False, backing=BackingDirs(b"/"))
    parent_a, parent_b = os.urandom(16), os.urandom(16)
    for stop in ("before", "renamed", "done"):
        root = tmp_path / stop
        (root / "pa").mkdir(parents=True)
        (root / "pb").mkdir()
        old, new = bytes(root / "pa" / "d"), bytes(root / "pb" / "e")
        os.mkdir(old)
        dirid = ids.create(old, parent_a)
        ids.before_move(old, dirid, parent_b, b"e")
        if stop != "before":
            os.rename(old, new)
        if stop == "done":
            ids.after_move(new, dirid, parent_b)
        where, parent = (old, parent_a) if stop == "before" else (new, parent_b)
        assert ids.read(where, parent) == dirid, stop
        # the reader repaired the copy that did not authenticate: both do now
        for stored in ((Path(os.fsdecode(where)) / "encfs.dirid").read_bytes(), os.getxattr(where, DIRID_XATTR)):
            assert names.open_dirid(stored, parent, os.path.basename(where)) == dirid, stop


RENAMER = r"""
import os, sys
root = sys.argv[1]
i = 0
while True:
    a, b = ("d0", "d1") if i % 2 == 0 else ("d1", "d0")
    os.rename(os.path.join(root, a), os.path.join(root, b))
    s, t = ("s0", "s1") if i % 2 == 0 else ("s1", "s0")
    os.rename(os.path.join(root, "d" + str((i + 1) % 2), s), os.path.join(root, "d" + str((i + 1) % 2), t))
    print(i, flush=True)
    i += 1
"""


def test_kill_9_during_renames_leaves_every_directory_and_symlink_readable(fs, fs_home: Path) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "d0" / "sub").mkdir(parents=True)
        (plain / "d0" / "sub" / "f").write_bytes(b"payload")
        os.symlink("target", plain / "d0" / "s0")
    rng = random.Random(5)
    for rnd in range(8):
        m = Mount(cipher, plain, fs_home)
        try:
            crash_during(m, RENAMER, str(plain), when=lambda: time.sleep(rng.uniform(0.2, 1.0)))
        finally:
            m.stop()
        with Mount(cipher, plain, fs_home):
            (d,) = [n for n in os.listdir(plain) if n in ("d0", "d1")]  # EIO here is the bug
            assert sorted(os.listdir(plain / d)) in (["s0", "sub"], ["s1", "sub"], ["s0", "s1", "sub"]), rnd
            assert cold_read(plain / d / "sub" / "f") == b"payload"
            for s in os.listdir(plain / d):
                if s != "sub":
                    assert os.readlink(plain / d / s) == "target"
            for extra in [s for s in ("s0", "s1") if (plain / d / s).is_symlink()][1:]:
                os.unlink(plain / d / extra)  # a crash between the new link and the old one's removal


# -- filesystems of the previous release (fs-v2.tar.gz) ----------------------------------------------

V2_FILES = {"a/f.txt": b"f\n", "a/b/deep.txt": b"deep\n", f"a/{LONG}/inner.txt": b"inner\n"}
V2_LINKS = {"link": "a/f.txt", "a/longlink": "y" * 3100, "hard1": "a/b/deep.txt", "hard2": "a/b/deep.txt"}


@pytest.fixture
def v2(tmp_path: Path) -> dict[str, Path]:
    """The ENCFS_HOME and CIPHERDIR that the release before the bound forms made, xattrs included."""
    root = tmp_path / "v2"
    extract_release("fs-v2.tar.gz", root)
    return {"home": root / "home", "cipher": root / "cipher"}


def _check_v2_tree(mp: Path) -> None:
    assert sorted(os.listdir(mp)) == ["a", "hard1", "hard2", "link"]
    assert sorted(os.listdir(mp / "a")) == [LONG, "b", "f.txt", "longlink"]
    for name, data in V2_FILES.items():
        assert cold_read(mp / name) == data, name
    for name, target in V2_LINKS.items():
        assert os.readlink(mp / name) == target, name
    assert os.getxattr(mp / "a" / "f.txt", "user.comment") == b"hello xattr"
    assert os.getxattr(mp / "a", "user.dirattr") == b"d"


def _features(cipher: Path, name: str = "encfs.conf") -> list[str]:
    return json.loads((cipher / name).read_bytes())["features"]


def test_the_previous_release_s_filesystem_is_upgraded_in_place(v2, tmp_path: Path) -> None:
    cipher, home, mp = v2["cipher"], v2["home"], tmp_path / "plain"
    mp.mkdir()
    legacy_a = next(p for p in user_entries(cipher) if p.is_dir())
    legacy_id = (legacy_a / DIRID_FILE).read_bytes()
    assert len(legacy_id) == 16 and not set(BINDING_FEATURES) & set(_features(cipher))
    conf = (cipher / "encfs.conf").read_bytes()
    with Mount(cipher, mp, home, "--read-only"):
        _check_v2_tree(mp)
    assert (cipher / "encfs.conf").read_bytes() == conf, "a read-only mount upgraded"
    with Mount(cipher, mp, home, log=tmp_path / "rw.log"):
        _check_v2_tree(mp)
        os.setxattr(mp / "a" / "f.txt", "user.comment", b"replaced")  # a legacy entry gets replaced
        assert os.listxattr(mp / "a" / "f.txt") == ["user.comment"]
        os.rename(mp / "a", mp / "a2")
        os.rename(mp / "a2", mp / "a")
    assert "directory ids and symlink targets are bound" in (tmp_path / "rw.log").read_text()
    assert _features(cipher) == _features(cipher, "encfs.conf.bak")
    assert set(BINDING_FEATURES) <= set(_features(cipher)) and BINDING_UPGRADE not in _features(cipher)
    a = next(p for p in user_entries(cipher) if p.is_dir())
    assert len((a / DIRID_FILE).read_bytes()) == SEALED_DIRID_LEN
    assert all(os.readlink(p).startswith(("2.", "encfs.lt2.")) for p in cipher.rglob("*") if p.is_symlink())
    f_backing = [n for p in user_entries(a) for n in os.listxattr(p, follow_symlinks=False)
                 if n.startswith("user.encfs.x")]
    assert len(f_backing) == 1 and f_backing[0].startswith("user.encfs.xp."), "the legacy entry was replaced"
    assert [n for n in os.listxattr(a) if n.startswith("user.encfs.x")][0].startswith("user.encfs.x."), \
        "a legacy xattr name nobody set again stays as it was"
    with Mount(cipher, mp, home, log=tmp_path / "again.log"):
        assert os.getxattr(mp / "a" / "f.txt", "user.comment") == b"replaced"
        assert os.lstat(mp / "hard1").st_ino != os.lstat(mp / "hard2").st_ino  # a symlink per place now
        for name, target in V2_LINKS.items():
            assert os.readlink(mp / name) == target, name
    assert "upgraded" not in (tmp_path / "again.log").read_text()
    # From now on the legacy forms are tampering: the old plain id put back is refused.
    (a / DIRID_FILE).chmod(0o644)
    (a / DIRID_FILE).write_bytes(legacy_id)
    os.setxattr(a, DIRID_XATTR, legacy_id)
    with Mount(cipher, mp, home, "--read-only"):
        expect_errno(errno.EIO, os.listdir, mp / "a")


def test_an_interrupted_upgrade_is_read_and_finished(v2, tmp_path: Path) -> None:
    """Stopped in step 2 (both copies say binding-upgrade; one directory id copy and one symlink already
    resealed), and again between the two copies of step 3: every mount reads the tree; a read-write one
    finishes."""
    cipher, home, mp = v2["cipher"], v2["home"], tmp_path / "plain"
    mp.mkdir()
    base = _features(cipher)
    # What a walk stopped halfway leaves: some ids and symlinks sealed (taken from a finished upgrade
    # of a copy of this filesystem: same keys, same places), the rest legacy.
    done = tmp_path / "done"
    shutil.copytree(cipher, done, symlinks=True)  # xattrs included (copystat)
    with Mount(done, mp, home):
        pass
    a = next(p for p in user_entries(cipher) if p.is_dir())
    (a / DIRID_FILE).chmod(0o644)
    (a / DIRID_FILE).write_bytes((done / a.name / DIRID_FILE).read_bytes())  # the xattr stays legacy
    link = next(p for p in user_entries(cipher) if p.is_symlink() and os.lstat(p).st_nlink == 1)
    link.unlink()
    os.symlink(os.readlink(done / link.name), link)
    assert len((a / DIRID_FILE).read_bytes()) == SEALED_DIRID_LEN and os.readlink(link).startswith("2.")
    remac(cipher, home, {"features": base + [BINDING_UPGRADE]})
    with Mount(cipher, mp, home, "--read-only"):
        _check_v2_tree(mp)
    with Mount(cipher, mp, home):
        _check_v2_tree(mp)
    final = _features(cipher)
    assert set(final) == set(base) | set(BINDING_FEATURES) | {SPARSE_FEATURE}
    remac(cipher, home, {"features": base + [BINDING_UPGRADE]}, names=("encfs.conf",))  # backup: final
    with Mount(cipher, mp, home, "--read-only", log=tmp_path / "ro.log"):
        _check_v2_tree(mp)
    assert "an interrupted upgrade" in (tmp_path / "ro.log").read_text()
    with Mount(cipher, mp, home):
        _check_v2_tree(mp)
    assert _features(cipher) == _features(cipher, "encfs.conf.bak") == final


def _exchange(a: Path, b: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(a), -100, bytes(b), ctypes.c_uint(2)) != 0:  # RENAME_EXCHANGE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_exchange_reseals_directory_ids_and_refuses_symlinks(fs, fs_home: Path) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "p" / "x").mkdir(parents=True)
        (plain / "p" / "x" / "fx").write_bytes(b"x")
        (plain / "y").mkdir()
        (plain / "y" / "fy").write_bytes(b"y")
        os.symlink("t", plain / "ln")
        _exchange(plain / "p" / "x", plain / "y")
        assert os.listdir(plain / "y") == ["fx"] and os.listdir(plain / "p" / "x") == ["fy"]
        expect_errno(errno.EINVAL, _exchange, plain / "ln", plain / "y")
    with Mount(cipher, plain, fs_home):
        assert cold_read(plain / "y" / "fx") == b"x" and cold_read(plain / "p" / "x" / "fy") == b"y"
        assert os.readlink(plain / "ln") == "t"
