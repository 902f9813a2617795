"""encfs.fuse.backingdirs: backing calls through directory fds, and its cache of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from encfs.fuse import backingdirs
from encfs.fuse.backingdirs import BackingDirs


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_paths_far_past_path_max(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    path = root
    with BackingDirs(root) as bd:
        for i in range(40):  # 40 x 201 bytes: 8,040 bytes of path
            path = os.path.join(path, b"%03d" % i + b"d" * 197)
            bd.mkdir(path, 0o755)
        leaf = os.path.join(path, b"f" * 200)
        bd.write_atomic(leaf, b"data", 0o600)
        bd.setxattr(leaf, "user.k", b"v")
        assert bd.read_file(leaf) == b"data" and bd.getxattr(leaf, "user.k") == b"v"
        assert bd.listdir(path) == [b"f" * 200] and bd.lstat(leaf).st_size == 4
        with pytest.raises(OSError) as e:
            os.lstat(leaf)
        assert e.value.errno == 36  # ENAMETOOLONG: what a full path gets


def test_a_rename_or_rmdir_here_drops_the_cached_fds_under_it(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.makedirs(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "c" / "f").write_bytes(b"1")
    with BackingDirs(root) as bd:
        assert bd.read_file(root + b"/a/b/c/f") == b"1"  # caches a/b/c
        bd.rename(root + b"/a", root + b"/z")
        with pytest.raises(FileNotFoundError):
            bd.lstat(root + b"/a/b/c/f")
        assert bd.read_file(root + b"/z/b/c/f") == b"1"
        bd.unlink(root + b"/z/b/c/f")
        bd.rmdir(root + b"/z/b/c")
        os.mkdir(tmp_path / "z" / "b" / "c")  # a new directory under the old path
        bd.write_atomic(root + b"/z/b/c/g", b"2", 0o600)
        assert os.listdir(tmp_path / "z" / "b" / "c") == ["g"]


def test_a_rename_behind_its_back_is_seen_once_the_entry_expires(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = os.fsencode(tmp_path)
    os.makedirs(tmp_path / "a" / "b")
    with BackingDirs(root) as bd:
        bd.mknod(root + b"/a/b/f", 0o100600)
        os.rename(tmp_path / "a", tmp_path / "z")
        assert bd.lexists(root + b"/a/b/f")  # within CACHE_TTL, as the kernel's own entry cache
        monkeypatch.setattr(backingdirs, "CACHE_TTL", 0.0)
        assert not bd.lexists(root + b"/a/b/f")


def test_the_cache_holds_a_bounded_number_of_fds_and_close_releases_them(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    before = _fds()
    bd = BackingDirs(root)
    for i in range(3 * backingdirs.CACHE_SIZE):
        os.makedirs(tmp_path / str(i) / "d")
        bd.mkdir(root + b"/%d/d/e" % i, 0o755)
        assert _fds() <= before + 1 + backingdirs.CACHE_SIZE
    assert _fds() == before + 1 + backingdirs.CACHE_SIZE
    bd.close()
    assert _fds() == before
    with pytest.raises(OSError):
        bd.lstat(root + b"/0")


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "per-component"])
def test_a_backing_directory_turned_symlink_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            openat2: bool) -> None:
    """Whoever can write the backing store must not steer the daemon (root, often) out of the
    CIPHERDIR by replacing a backing directory with a symlink: every call under it is refused."""
    monkeypatch.setattr(backingdirs, "_openat2_works", openat2, raising=False)
    cipher, outside = tmp_path / "cipher", tmp_path / "outside"
    (cipher / "d" / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "secret").write_bytes(b"outside")
    root = os.fsencode(cipher)
    with BackingDirs(root) as bd:
        assert bd.listdir(root + b"/d/sub") == []
    (cipher / "d" / "sub").rmdir()
    (cipher / "d").rmdir()
    (cipher / "d").symlink_to(outside)
    with BackingDirs(root) as bd:
        for call in (lambda: bd.read_file(root + b"/d/sub/secret"), lambda: bd.listdir(root + b"/d/sub"),
                     lambda: bd.write_atomic(root + b"/d/sub/planted", b"x", 0o600)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno in (40, 20)  # ELOOP (openat2), ENOTDIR (O_DIRECTORY | O_NOFOLLOW on a link)
    assert sorted(os.listdir(outside / "sub")) == ["secret"]
