"""POSIX semantics of a real encfs mount, names and paths: long names, errno mapping, PATH_MAX, big directories.

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in tests/semantics_helpers.py),
checked the way a local-filesystem conformance suite would. Most tests share one module-wide mount and
work in their own fresh subdirectory; the deep-tree remount test starts its own mounts. The whole
module runs once per FUSE server (``encfs mount --server``): our own protocol server, the default, and
pyfuse3. Reads that must reach the daemon (not the kernel page cache) go through a fresh open() (FUSE
drops the file's cached pages on open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import Mount, cold_read, expect_errno
from semantics_helpers import d_fixture, mnt_fixture, new_mount, server_fixture  # noqa: F401  (the fixtures)

# -- errno mapping -------------------------------------------------------------------------------


def test_errno_mapping(d: Path) -> None:
    (d / "dir").mkdir()
    (d / "dir" / "child").write_bytes(b"")
    (d / "file").write_bytes(b"f")
    expect_errno(errno.ENOENT, os.stat, d / "missing")
    expect_errno(errno.ENOENT, open, d / "missing", "rb")
    expect_errno(errno.ENOENT, os.unlink, d / "missing")
    expect_errno(errno.ENOENT, os.rmdir, d / "missing")
    expect_errno(errno.ENOENT, os.rename, d / "missing", d / "x")
    expect_errno(errno.ENOENT, os.mkdir, d / "missing" / "sub")
    expect_errno(errno.EEXIST, os.mkdir, d / "dir")
    expect_errno(errno.EEXIST, os.mkdir, d / "file")
    expect_errno(errno.EEXIST, os.open, d / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.link, d / "file", d / "dir" / "child")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "dir")
    expect_errno(errno.EISDIR, os.open, d / "dir", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, d / "dir", os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, d / "dir")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "file")
    expect_errno(errno.ENOTDIR, os.stat, d / "file" / "x")
    expect_errno(errno.ENOTDIR, os.open, d / "file" / "x", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENOTDIR, os.listdir, d / "file")
    expect_errno(errno.ENAMETOOLONG, os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.stat, d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.rename, d / "file", d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t", d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.link, d / "file", d / ("n" * 256))
    assert sorted(os.listdir(d)) == ["dir", "file"]
    assert os.listdir(d / "dir") == ["child"]
    os.unlink(d / "dir" / "child")
    os.rmdir(d / "dir")
    expect_errno(errno.ENOENT, os.stat, d / "dir")


# -- names ---------------------------------------------------------------------------------------


def _side_files(cipherdir: Path) -> int:
    return sum(1 for _, _, files in os.walk(cipherdir) for f in files if f.startswith("encfs.ln."))


def test_255_byte_names(mnt: Mount, d: Path) -> None:
    side0 = _side_files(mnt.cipherdir)
    names = ["F" * 255, "é" * 127 + "a", "D" * 255, "S" * 255, "H" * 255]
    f, utf, dn, sn, hn = names
    assert all(len(n.encode()) == 255 for n in names)
    (d / f).write_bytes(b"long file")
    (d / utf).write_bytes(b"utf8")
    (d / dn).mkdir()
    (d / dn / f).write_bytes(b"nested long")
    os.symlink(f, d / sn)
    os.link(d / f, d / hn)
    assert sorted(os.listdir(d)) == sorted(names)
    assert sorted(subprocess.run(["ls", "-A", str(d)], capture_output=True, check=True).stdout.decode().split("\n")[:-1]) \
        == sorted(names)
    assert os.listdir(d / dn) == [f]
    assert cold_read(d / f) == b"long file" and cold_read(d / utf) == b"utf8"
    assert cold_read(d / sn) == b"long file" and os.readlink(d / sn) == f
    assert os.stat(d / hn).st_nlink == 2
    assert cold_read(d / dn / f) == b"nested long"
    # rename long -> long, long -> short, short -> long
    os.rename(d / f, d / ("G" * 255))
    os.rename(d / utf, d / "short")
    os.rename(d / "short", d / ("ü" * 127 + "b"))
    os.rename(d / dn, d / ("E" * 255))
    os.rename(d / sn, d / ("T" * 255))
    os.rename(d / hn, d / ("G" * 255))  # a hard link onto its other name: both stay
    listing = sorted(os.listdir(d))
    assert listing == sorted(["G" * 255, "ü" * 127 + "b", "E" * 255, "T" * 255, hn])
    assert cold_read(d / ("E" * 255) / f) == b"nested long"
    assert cold_read(d / ("ü" * 127 + "b")) == b"utf8"
    assert os.readlink(d / ("T" * 255)) == f  # dangling now: F... was renamed
    for n in ("G" * 255, "ü" * 127 + "b", "T" * 255, hn):
        os.unlink(d / n)
    os.unlink(d / ("E" * 255) / f)
    os.rmdir(d / ("E" * 255))
    assert os.listdir(d) == []
    assert _side_files(mnt.cipherdir) == side0, "long-name side files were left behind"
    raw = os.fsencode(d) + b"/" + b"\xff\xfe-not-utf8-" + b"\x80" * 243
    assert len(os.path.basename(raw)) == 255
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"raw")
    os.close(fd)
    assert os.listdir(os.fsencode(d)) == [os.path.basename(raw)]
    assert cold_read(Path(os.fsdecode(raw))) == b"raw"


def test_listing_hides_internal_entries(mnt: Mount, d: Path) -> None:
    (d / "a").write_bytes(b"")
    (d / "sub").mkdir()
    (d / ("L" * 200)).write_bytes(b"")
    out = subprocess.run(["ls", "-A", str(d)], capture_output=True, check=True).stdout.decode().split()
    assert sorted(out) == sorted(["a", "sub", "L" * 200])
    assert os.listdir(d / "sub") == []
    root = set(os.listdir(mnt.mountpoint))
    assert not any(n.startswith("encfs") for n in root)
    for name in ("encfs.dirid", "encfs.conf"):
        expect_errno(errno.ENOENT, os.stat, d / name)
        expect_errno(errno.ENOENT, os.stat, mnt.mountpoint / name)
    # a user file named like encfs's own bookkeeping is just a file
    (d / "encfs.dirid").write_bytes(b"mine")
    assert cold_read(d / "encfs.dirid") == b"mine"
    assert sorted(os.listdir(d)) == sorted(["a", "sub", "L" * 200, "encfs.dirid"])


# -- paths up to PATH_MAX (issue #22) ---------------------------------------------------------------

# 159-byte names have the longest backing names kept inline (235 bytes): 24 levels of them are a
# 3,840-byte plaintext path whose backing path passes 5,600 bytes; a 255-byte leaf makes 4,095.
DEEP_NAMES = ["%03d" % i + "d" * 156 for i in range(24)]
DEEP = "".join(n + "/" for n in DEEP_NAMES)
LEAF = DEEP + "f" * (4095 - len(DEEP))


def _make_deep(top: int) -> None:
    for i in range(1, len(DEEP_NAMES) + 1):
        os.mkdir("/".join(DEEP_NAMES[:i]), 0o755, dir_fd=top)


def _read_at(top: int, rel: str) -> bytes:
    fd = os.open(rel, os.O_RDONLY, dir_fd=top)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _write_at(top: int, rel: str, data: bytes) -> None:
    fd = os.open(rel, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=top)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_every_operation_at_a_4095_byte_path(d: Path) -> None:
    """Paths are given relative to a directory fd (the kernel takes at most 4,095 bytes per call);
    calls without a dir_fd form go through /proc/self/fd/<fd of the deep directory>."""
    assert len(LEAF.encode()) == 4095
    top = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    deep = -1
    try:
        _make_deep(top)
        deep = os.open(DEEP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
        here = f"/proc/self/fd/{deep}/"
        leaf = os.path.basename(LEAF)
        _write_at(top, LEAF, b"deep data")
        assert _read_at(top, LEAF) == b"deep data"
        os.truncate(here + leaf, 4)
        os.chmod(LEAF, 0o600, dir_fd=top)
        os.chown(LEAF, 1, 2, dir_fd=top)
        st = os.stat(LEAF, dir_fd=top)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 1, 2, 4)
        assert _read_at(top, LEAF) == b"deep"
        os.setxattr(here + leaf, "user.k", b"v")
        assert os.getxattr(here + leaf, "user.k") == b"v" and os.listxattr(here + leaf) == ["user.k"]
        os.removexattr(here + leaf, "user.k")
        assert os.listxattr(here + leaf) == []
        os.mkdir(DEEP + "s" * 255, dir_fd=top)
        os.rmdir(DEEP + "s" * 255, dir_fd=top)
        os.link(LEAF, "top", src_dir_fd=top, dst_dir_fd=top)  # a deep source
        os.link("top", DEEP + "h" * 255, src_dir_fd=top, dst_dir_fd=top)  # a deep destination
        assert os.stat(LEAF, dir_fd=top).st_nlink == 3
        os.rename(LEAF, "moved", src_dir_fd=top, dst_dir_fd=top)
        os.rename("moved", LEAF, src_dir_fd=top, dst_dir_fd=top)
        target = "/" + "t" * 4094
        os.symlink(target, DEEP + "l" * 255, dir_fd=top)
        assert os.readlink(DEEP + "l" * 255, dir_fd=top) == target
        expect_errno(errno.ENAMETOOLONG, os.symlink, target + "t", "l", dir_fd=top)
        os.mkfifo(DEEP + "p" * 255, dir_fd=top)
        os.mknod(DEEP + "n" * 255, stat.S_IFREG | 0o644, dir_fd=top)
        assert stat.S_ISFIFO(os.stat(DEEP + "p" * 255, dir_fd=top).st_mode)
        # exactly past the limits: a 256-byte name (the daemon's answer), a 4,096-byte path (the kernel's)
        expect_errno(errno.ENAMETOOLONG, os.open, DEEP + "x" * 256, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=top)
        os.mkdir(DEEP + "a" * 100, dir_fd=top)
        _write_at(top, DEEP + "a" * 100 + "/" + "b" * 154, b"4095")
        expect_errno(errno.ENAMETOOLONG, _write_at, top, DEEP + "a" * 100 + "/" + "b" * 155, b"")
        assert sorted(os.listdir(deep)) == sorted([leaf, "h" * 255, "l" * 255, "p" * 255, "n" * 255, "a" * 100])
        # a rename at the top keeps the subtree usable, by a fresh path and by the fd held on it
        os.rename(DEEP_NAMES[0], "R" * 159, src_dir_fd=top, dst_dir_fd=top)
        renamed = "R" * 159 + LEAF[len(DEEP_NAMES[0]):]
        assert _read_at(top, renamed) == b"deep" and os.readlink(here + "l" * 255) == target
        for n in (leaf, "h" * 255, "l" * 255, "p" * 255, "n" * 255, "a" * 100 + "/" + "b" * 154):
            os.unlink(here + n)
        os.rmdir(here + "a" * 100)
        os.unlink("top", dir_fd=top)
        names = ["R" * 159, *DEEP_NAMES[1:]]
        for i in range(len(names), 0, -1):
            os.rmdir("/".join(names[:i]), dir_fd=top)
        assert os.listdir(d) == []
    finally:
        if deep >= 0:
            os.close(deep)
        os.close(top)


def test_a_deep_tree_survives_remount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        top = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _make_deep(top)
            _write_at(top, LEAF, b"leaf")
            os.symlink("t" * 4000, DEEP + "l" * 200, dir_fd=top)
            os.rename("/".join(DEEP_NAMES[:13]), "M" * 159, src_dir_fd=top, dst_dir_fd=top)  # moved up
        finally:
            os.close(top)
    moved = "M" * 159 + "/" + LEAF[len("/".join(DEEP_NAMES[:13])) + 1:]
    with new_mount(tmp_path, fs_home) as m:
        top = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _read_at(top, moved) == b"leaf"
            assert os.readlink(os.path.dirname(moved) + "/" + "l" * 200, dir_fd=top) == "t" * 4000
            left = os.open("/".join(DEEP_NAMES[:12]), os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            try:
                assert os.listdir(left) == []
            finally:
                os.close(left)
        finally:
            os.close(top)


# -- big directories ---------------------------------------------------------------------------


def _check_big_directory(d: Path, n: int) -> None:
    names = []
    for i in range(n):
        name = f"entry-{i:06d}" + ("-" + "x" * 200 if i % 97 == 0 else "")
        names.append(name)
        if i % 500 == 0:
            os.mkdir(d / name)
        else:
            os.mknod(d / name, stat.S_IFREG | 0o644)
    listed = os.listdir(d)
    assert len(listed) == n and sorted(listed) == sorted(names)
    # iterate in small steps while entries come and go: every untouched entry exactly once
    seen: list[str] = []
    removed, added = set(names[n // 2: n // 2 + 50]), {f"late-{i}" for i in range(50)}
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == 100:
                for r in removed:
                    os.unlink(d / r) if not (d / r).is_dir() else os.rmdir(d / r)
                for a in added:
                    os.mknod(d / a, stat.S_IFREG | 0o644)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    stable = set(names) - removed
    assert stable <= set(seen), f"{len(stable - set(seen))} entries were skipped"
    assert set(seen) <= set(names) | added
    assert sorted(os.listdir(d)) == sorted(stable | added)


def test_directory_with_5000_entries(d: Path) -> None:
    _check_big_directory(d, 5000)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ENCFS_STRESS") != "1",
                    reason="100k-entry stress run; set ENCFS_STRESS=1 to run it (the 5000-entry test is the bounded version)")
def test_directory_with_100k_entries(d: Path) -> None:
    _check_big_directory(d, 100_000)
