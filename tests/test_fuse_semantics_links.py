"""POSIX semantics of a real encfs mount, the namespace: renames, hard links, symlinks, FIFOs, whiteouts.

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in tests/semantics_helpers.py),
checked the way a local-filesystem conformance suite would. Most tests share one module-wide mount and
work in their own fresh subdirectory; the whiteout, overlayfs and feature-flag tests start their own
mounts. The whole module runs once per FUSE server (``encfs mount --server``): our own protocol server,
the default, and pyfuse3. Reads that must reach the daemon (not the kernel page cache) go through a
fresh open() (FUSE drops the file's cached pages on open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount, cold_pread, cold_read, expect_errno
from semantics_helpers import (  # noqa: F401  (the fixtures: d_fixture is ``d``, and so on)
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    d_fixture,
    mnt_fixture,
    new_mount,
    renameat2,
    server_fixture,
)

# -- renames -----------------------------------------------------------------------------------


def test_rename_over_existing_file(d: Path) -> None:
    (d / "a").write_bytes(b"AAA")
    (d / "b").write_bytes(b"BBBBBB")
    fd_b = os.open(d / "b", os.O_RDONLY)
    try:
        os.rename(d / "a", d / "b")
        assert sorted(os.listdir(d)) == ["b"]
        assert cold_read(d / "b") == b"AAA" and os.stat(d / "b").st_size == 3
        assert os.pread(fd_b, 10, 0) == b"BBBBBB"  # the replaced file lives on while open
        assert os.fstat(fd_b).st_size == 6  # and answers fstat, though it has no name left
        os.fchmod(fd_b, 0o640)
        assert stat.S_IMODE(os.fstat(fd_b).st_mode) == 0o640
        assert os.stat(d / "b").st_ino != os.fstat(fd_b).st_ino
    finally:
        os.close(fd_b)
    # rename onto a hard link of itself does nothing
    os.link(d / "b", d / "c")
    os.rename(d / "b", d / "c")
    assert sorted(os.listdir(d)) == ["b", "c"]
    assert cold_read(d / "b") == b"AAA" == cold_read(d / "c")


def test_rename_directories(d: Path) -> None:
    (d / "src").mkdir()
    (d / "src" / "sub").mkdir()
    (d / "src" / "f").write_bytes(b"child")
    (d / "src" / "sub" / "g").write_bytes(b"grandchild")
    os.symlink("f", d / "src" / "ln")
    (d / "empty").mkdir()
    (d / "full").mkdir()
    (d / "full" / "x").write_bytes(b"x")
    (d / "file").write_bytes(b"file")

    fd = os.open(d / "src" / "sub" / "g", os.O_RDWR)
    dfd = os.open(d / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        expect_errno(errno.ENOTEMPTY, os.rename, d / "src", d / "full")
        expect_errno(errno.ENOTDIR, os.rename, d / "src", d / "file")
        expect_errno(errno.EISDIR, os.rename, d / "file", d / "empty")
        expect_errno(errno.EINVAL, os.rename, d / "src", d / "src" / "sub" / "inside")
        os.rename(d / "src", d / "empty")  # over an empty directory
        assert sorted(os.listdir(d)) == ["empty", "file", "full"]
        assert sorted(os.listdir(d / "empty")) == ["f", "ln", "sub"]
        assert cold_read(d / "empty" / "f") == b"child"
        assert cold_read(d / "empty" / "sub" / "g") == b"grandchild"
        assert cold_read(d / "empty" / "ln") == b"child"
        # previously opened file and directory still work
        assert os.pread(fd, 100, 0) == b"grandchild"
        os.pwrite(fd, b"G", 0)
        assert cold_read(d / "empty" / "sub" / "g") == b"Grandchild"
        assert sorted(os.listdir(dfd)) == ["f", "ln", "sub"]
        with open(os.open("f", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            assert f.read() == b"child"
        os.mkdir("made-via-fd", dir_fd=dfd)
        assert (d / "empty" / "made-via-fd").is_dir()
        # across directories, and back
        os.rename(d / "empty", d / "full" / "moved")
        assert sorted(os.listdir(d / "full")) == ["moved", "x"]
        assert cold_read(d / "full" / "moved" / "sub" / "g") == b"Grandchild"
        os.rename(d / "full" / "moved" / "sub", d / "sub2")
        assert cold_read(d / "sub2" / "g") == b"Grandchild"
        os.fsync(dfd)
    finally:
        os.close(fd)
        os.close(dfd)


def test_open_directory_sees_changes_after_rewind(d: Path) -> None:
    (d / "a").touch()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(dfd) == ["a"]
        (d / "b").touch()
        os.unlink(d / "a")
        assert os.listdir(dfd) == ["b"]  # os.listdir(fd) rewinds the same open directory
    finally:
        os.close(dfd)


def test_rename_file_across_directories(d: Path) -> None:
    (d / "x").mkdir()
    (d / "y").mkdir()
    (d / "x" / "f").write_bytes(b"data" * 2000)
    os.rename(d / "x" / "f", d / "y" / "g")
    assert os.listdir(d / "x") == [] and os.listdir(d / "y") == ["g"]
    assert cold_read(d / "y" / "g") == b"data" * 2000
    os.rmdir(d / "x")


def test_renameat2_noreplace_and_exchange(d: Path) -> None:
    (d / "a").write_bytes(b"AAAA")
    (d / "b").write_bytes(b"BB")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    assert cold_read(d / "a") == b"AAAA" and cold_read(d / "b") == b"BB"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(d)) == ["b", "c"]

    renameat2(d / "b", d / "c", RENAME_EXCHANGE)
    assert cold_read(d / "b") == b"AAAA" and cold_read(d / "c") == b"BB"
    assert os.stat(d / "b").st_size == 4 and os.stat(d / "c").st_size == 2
    expect_errno(errno.ENOENT, renameat2, d / "b", d / "missing", RENAME_EXCHANGE)

    # a file and a directory, in different directories, one of them with a long name
    long = "L" * 255
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_bytes(b"inner")
    (d / "other").mkdir()
    (d / "other" / long).write_bytes(b"longfile")
    fd = os.open(d / "dir" / "inner", os.O_RDONLY)
    try:
        renameat2(d / "dir", d / "other" / long, RENAME_EXCHANGE)
        assert cold_read(d / "dir") == b"longfile"
        assert os.listdir(d / "other" / long) == ["inner"]
        assert cold_read(d / "other" / long / "inner") == b"inner"
        assert os.pread(fd, 10, 0) == b"inner"
        assert sorted(os.listdir(d)) == ["b", "c", "dir", "other"]
        assert os.listdir(d / "other") == [long]
    finally:
        os.close(fd)


def _is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_renameat2_whiteout_leaves_a_whiteout_under_the_old_name(tmp_path: Path, fs_home: Path) -> None:
    """RENAME_WHITEOUT (what overlayfs asks of its upper layer) was taken for a plain rename."""
    names = [("f", "g"), ("L" * 255, "M" * 255)]  # a long name keeps its side file for the whiteout
    with new_mount(tmp_path, fs_home) as m:
        for old, new in names:
            (m.mountpoint / old).write_bytes(old.encode())
            renameat2(m.mountpoint / old, m.mountpoint / new, RENAME_WHITEOUT)
        os.symlink("target", m.mountpoint / "link")
        renameat2(m.mountpoint / "link", m.mountpoint / "link2", RENAME_WHITEOUT)
    with new_mount(tmp_path, fs_home) as m:
        for old, new in names:
            assert _is_whiteout(m.mountpoint / old) and cold_read(m.mountpoint / new) == old.encode()
        assert _is_whiteout(m.mountpoint / "link") and os.readlink(m.mountpoint / "link2") == "target"
        assert sorted(os.listdir(m.mountpoint)) == sorted(["link", "link2", *(n for pair in names for n in pair)])


def test_overlayfs_runs_with_its_upper_layer_on_encfs(tmp_path: Path, fs_home: Path) -> None:
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    lower.mkdir()
    merged.mkdir()
    (lower / "gone").write_bytes(b"lower")
    (lower / "kept").write_bytes(b"lower")
    with new_mount(tmp_path, fs_home) as m:
        upper, work = m.mountpoint / "upper", m.mountpoint / "work"
        upper.mkdir()
        work.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True, timeout=30)
        try:
            (merged / "gone").unlink()
            (merged / "new").write_bytes(b"upper")
            os.rename(merged / "kept", merged / "moved")  # copied up, the old name whited out
            assert sorted(os.listdir(merged)) == ["moved", "new"]
        finally:
            subprocess.run(["umount", str(merged)], check=True, timeout=30)
        assert _is_whiteout(upper / "gone") and _is_whiteout(upper / "kept")
        assert (upper / "moved").read_bytes() == b"lower" and (upper / "new").read_bytes() == b"upper"


# -- links and special files -------------------------------------------------------------------


def test_hard_links(d: Path) -> None:
    a, b, c = d / "a", d / "b", d / "c"
    a.write_bytes(b"shared" * 1000)
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_nlink == 2 == sb.st_nlink and sa.st_ino == sb.st_ino
    assert sa.st_size == 6000 == sb.st_size
    fd = os.open(b, os.O_RDWR)
    try:
        assert os.fstat(fd).st_nlink == 2 and os.fstat(fd).st_size == 6000
        os.pwrite(fd, b"CHANGED", 4090)
        assert cold_pread(a, 7, 4090) == b"CHANGED"
        with open(a, "ab") as f:
            f.write(b"+tail")
        assert os.fstat(fd).st_size == 6005
        assert os.pread(fd, 5, 6000) == b"+tail"
        os.link(b, c)
        assert os.stat(a).st_nlink == 3 and os.stat(c).st_size == 6005
        os.unlink(a)
        assert os.stat(b).st_nlink == 2 == os.fstat(fd).st_nlink
        os.unlink(c)
        assert os.stat(b).st_nlink == 1 and os.stat(b).st_size == 6005
        assert sorted(os.listdir(d)) == ["b"]
    finally:
        os.close(fd)
    assert cold_read(b)[4090:4097] == b"CHANGED"
    os.mkdir(d / "sub")
    expect_errno(errno.EPERM, os.link, d / "sub", d / "sublink")  # no hard links to directories


def test_symlinks(d: Path) -> None:
    (d / "target").write_bytes(b"pointed-to")
    os.symlink("target", d / "rel")
    os.symlink(str(d / "target"), d / "abs")
    os.symlink("nowhere/at/all", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "abs") == str(d / "target")
    assert cold_read(d / "rel") == b"pointed-to" == cold_read(d / "abs")
    assert os.lstat(d / "rel").st_size == len("target")
    assert stat.S_ISLNK(os.lstat(d / "dangling").st_mode)
    assert not (d / "dangling").exists() and os.path.lexists(d / "dangling")
    expect_errno(errno.ENOENT, os.stat, d / "dangling")
    expect_errno(errno.EEXIST, os.symlink, "x", d / "rel")
    os.symlink("target", d / "chain1")
    os.symlink("chain1", d / "chain2")
    assert cold_read(d / "chain2") == b"pointed-to"
    os.symlink("loop", d / "loop")
    expect_errno(errno.ELOOP, os.stat, d / "loop")
    os.utime(d / "rel", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    assert os.lstat(d / "rel").st_mtime_ns == 2 * 10**9
    assert os.stat(d / "target").st_mtime_ns != 2 * 10**9
    os.unlink(d / "rel")
    assert cold_read(d / "target") == b"pointed-to"


def _stored_long_targets(m: Mount) -> int:
    store = m.cipherdir / "encfs.longlinks"
    return len(os.listdir(store)) if store.exists() else 0


@pytest.mark.parametrize("length", [1, 1000, 3000, 3100, 4095])
def test_symlink_long_targets(mnt: Mount, d: Path, length: int) -> None:
    stored0 = _stored_long_targets(mnt)
    target = ("t/" * length)[:length - 1] + "x"
    assert len(target) == length
    os.symlink(target, d / "victim")
    os.symlink(target, d / "ln")
    assert os.readlink(d / "ln") == target
    assert os.lstat(d / "ln").st_size == length
    os.rename(d / "ln", d / "ln2")
    os.link(d / "ln2", d / "ln3", follow_symlinks=False)
    os.unlink(d / "ln2")
    assert os.readlink(d / "ln3") == target
    expect_errno(errno.ENAMETOOLONG, os.symlink, "y" * 4096, d / "toolong")
    os.rename(d / "ln3", d / "victim")  # replaces the other symlink
    assert os.readlink(d / "victim") == target and os.lstat(d / "victim").st_size == length
    os.unlink(d / "victim")
    assert os.listdir(d) == []
    assert _stored_long_targets(mnt) == stored0, "stored long symlink targets leaked"


def test_long_symlink_targets_need_the_feature_flag(tmp_path: Path, fs_home: Path) -> None:
    """A filesystem created before "long-symlinks" keeps the old limit (its readers lack the feature)."""
    from fsconfig_tool import remac

    from encfs.fuse.fsconfig import features_for

    cipher = tmp_path / "cipher"
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    remac(cipher, fs_home, {"features": [f for f in features_for(32768) if f != "long-symlinks"]})
    with new_mount(tmp_path, fs_home) as m:
        os.symlink("y" * 3000, m.mountpoint / "fits")
        assert os.readlink(m.mountpoint / "fits") == "y" * 3000
        expect_errno(errno.ENAMETOOLONG, os.symlink, "y" * 3100, m.mountpoint / "too-long")
        assert not (cipher / "encfs.longlinks").exists()


def test_mknod_fifo(d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p, 0o640)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
    finally:
        os.close(w)
        os.close(r)
    assert os.listdir(d) == ["fifo"]
    os.unlink(p)
