"""POSIX semantics of a real encfs mount, attributes: modes, owners, set-ID bits, access, times, xattrs, statfs.

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in tests/semantics_helpers.py),
checked the way a local-filesystem conformance suite would. Most tests share one module-wide mount and
work in their own fresh subdirectory; the set-group-ID write and time range tests start their own
mounts. The whole module runs once per FUSE server (``encfs mount --server``): our own protocol server,
the default, and pyfuse3. Reads that must reach the daemon (not the kernel page cache) go through a
fresh open() (FUSE drops the file's cached pages on open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from fuse_helpers import cold_read, expect_errno
from semantics_helpers import bind_unix_socket, d_fixture, mnt_fixture, new_mount, server_fixture  # noqa: F401  (the fixtures)

# -- attributes --------------------------------------------------------------------------------


def test_create_honours_mode_with_umask_zero(d: Path) -> None:
    old = os.umask(0)
    try:
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(d / "dd", 0o777)
        os.mknod(d / "n", stat.S_IFREG | 0o666)
        os.mkfifo(d / "p", 0o666)
    finally:
        os.umask(old)
    for name, mode in (("f", 0o666), ("dd", 0o777), ("n", 0o666), ("p", 0o666)):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == mode, name
    old = os.umask(0o077)
    try:
        fd = os.open(d / "g", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d / "g").st_mode) == 0o600


def test_chmod_chown_and_ctime(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    st0 = os.stat(p)
    time.sleep(0.02)
    os.chmod(p, 0o751)
    st1 = os.stat(p)
    assert stat.S_IMODE(st1.st_mode) == 0o751
    assert st1.st_ctime_ns > st0.st_ctime_ns
    assert st1.st_mtime_ns == st0.st_mtime_ns
    os.chown(p, 65534, 65534)
    st2 = os.stat(p)
    assert (st2.st_uid, st2.st_gid) == (65534, 65534)
    os.chown(p, -1, 0)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (65534, 0)
    (d / "dir").mkdir()
    os.chmod(d / "dir", 0o700)
    os.chown(d / "dir", 65534, 65534)
    st = os.stat(d / "dir")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 65534
    os.symlink("f", d / "ln")
    os.chown(d / "ln", 65534, 65534, follow_symlinks=False)
    assert os.lstat(d / "ln").st_uid == 65534 and os.stat(p).st_gid == 0
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755


def test_access_and_exec_checks(d: Path) -> None:
    """The mount has no default_permissions (no allow_other): access(2) and chdir reach the daemon,
    which answers for the mounting user (root here: read and write always, execute only with an
    x bit), also for a file whose last name is gone; exec still needs an x bit (the kernel checks)."""
    p = d / "tool"
    p.write_bytes(b"#!/bin/sh\necho ran\n")
    os.chmod(p, 0o644)
    assert os.access(p, os.R_OK | os.W_OK) and os.access(p, os.F_OK)
    assert not os.access(p, os.X_OK)
    expect_errno(errno.EACCES, subprocess.run, [str(p)])
    os.chmod(p, 0o744)
    assert os.access(p, os.X_OK)
    assert subprocess.run([str(p)], capture_output=True, text=True).stdout == "ran\n"
    assert not os.access(d / "missing", os.F_OK)
    (d / "sub").mkdir(mode=0o000)
    assert os.access(d / "sub", os.X_OK)  # root may search any directory
    os.symlink("tool", d / "ln")
    assert os.access(d / "ln", os.W_OK, follow_symlinks=False)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        os.fchmod(fd, 0o600)
        assert os.access(f"/proc/self/fd/{fd}", os.R_OK)
        assert not os.access(f"/proc/self/fd/{fd}", os.X_OK)
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["ln", "sub"]


def test_setgid_directory_passes_on_its_group(d: Path) -> None:
    sg = d / "sg"
    sg.mkdir()
    os.chown(sg, 0, 65534)
    os.chmod(sg, 0o2775)
    (sg / "f").write_bytes(b"")
    (sg / "sub").mkdir(0o755)
    os.symlink("f", sg / "ln")
    os.mkfifo(sg / "fifo")
    assert os.stat(sg / "f").st_gid == 65534 and os.lstat(sg / "ln").st_gid == 65534
    assert os.stat(sg / "fifo").st_gid == 65534
    st = os.stat(sg / "sub")
    assert st.st_gid == 65534 and st.st_mode & stat.S_ISGID
    (d / "plain").mkdir()
    os.chown(d / "plain", 0, 65534)
    (d / "plain" / "f").write_bytes(b"")
    assert os.stat(d / "plain" / "f").st_gid == 0  # no set-group-ID bit: the creator's group


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_unprivileged_write_outside_the_group_keeps_set_gid_without_group_execute(server: str, fs_home: Path,
                                                                                 direct: bool) -> None:
    """write(2) by a caller without CAP_FSETID and outside the file's group drops S_ISGID only
    with group execute: FUSE's rule (FUSE_WRITE_KILL_SUIDGID for an O_DIRECT write, served as
    FOPEN_DIRECT_IO; the kernel's own for a buffered one), where Linux 6.x local filesystems drop
    it. The rest of the set-id rules, compared with a local directory, is test_fuse_killpriv's."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="encfs-setid-", dir="/tmp"))
    base.chmod(0o755)  # nobody must reach the mountpoint
    m = new_mount(base, fs_home, "--allow-other")
    try:
        (m.mountpoint).chmod(0o777)
        flag = ["oflag=direct"] if direct else []
        p = m.mountpoint / "g-nox"
        p.write_bytes(b"x" * 4096)
        p.chmod(0o2767)  # root's group: nobody is outside it
        subprocess.run(["dd", "if=/dev/zero", f"of={p}", "bs=4096", "count=1", "conv=notrunc", *flag],
                       user="nobody", check=True, capture_output=True, timeout=30)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o2767
        assert cold_read(p) == bytes(4096)
    finally:
        m.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_utimens_and_mtime_on_write(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"abc")
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(d, ns=(3_000_000_000, 4_000_000_789))
    assert os.stat(d).st_mtime_ns == 4_000_000_789
    before = time.time_ns()
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"Z", 1)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert st.st_mtime_ns >= before - 50_000_000
    # a write is not a read: atime stays (the read-modify-write of a partial block is internal)
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns and st.st_atime_ns == 1_000_000_123
    assert cold_read(p) == b"aZc"
    assert os.stat(p).st_atime_ns > 1_000_000_123  # a read is (relatime: atime was older than mtime)
    os.utime(p, ns=(5 * 10**9, 6 * 10**9))
    os.truncate(p, 10000)
    assert os.stat(p).st_mtime_ns > 6 * 10**9
    os.utime(p)  # UTIME_NOW
    assert abs(os.stat(p).st_mtime_ns - time.time_ns()) < 5 * 10**9
    m0 = os.stat(d).st_mtime_ns
    (d / "new").touch()
    assert os.stat(d).st_mtime_ns > m0  # creating an entry changes the directory's mtime


def test_times_before_1970_and_after_2038_round_trip(tmp_path: Path, fs_home: Path) -> None:
    """fuse_attr and fuse_setattr_in carry times the kernel reads as signed: a pre-1970 touch
    was EIO. Checked after a remount, so the times come from the backing store."""
    # 1960, and 2242 (an ext4 backing store's times end in 2446)
    times = {"old": (-315_619_200 * 10**9 + 5, -1), "far": (2**33 * 10**9, 2**33 * 10**9 + 999_999_999)}
    with new_mount(tmp_path, fs_home) as m:
        for name, ns in times.items():
            (m.mountpoint / name).touch()
            os.utime(m.mountpoint / name, ns=ns)
            st = os.stat(m.mountpoint / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == ns
    with new_mount(tmp_path, fs_home) as m:
        for name, ns in times.items():
            st = os.stat(m.mountpoint / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == ns, name


def test_statfs(d: Path) -> None:
    sv = os.statvfs(d)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_bavail <= sv.f_blocks


# -- extended attributes -----------------------------------------------------------------------


def test_xattrs(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    (d / "dir").mkdir()
    for target in (p, d / "dir"):
        assert os.listxattr(target) == []
        os.setxattr(target, "user.one", b"1")
        os.setxattr(target, "user.bin", b"\0\xff" * 1000)
        os.setxattr(target, "user.empty", b"")
        assert os.getxattr(target, "user.one") == b"1"
        assert os.getxattr(target, "user.bin") == b"\0\xff" * 1000
        assert os.getxattr(target, "user.empty") == b""
        assert sorted(os.listxattr(target)) == ["user.bin", "user.empty", "user.one"]
        expect_errno(errno.ENODATA, os.getxattr, target, "user.missing")
        expect_errno(errno.ENODATA, os.removexattr, target, "user.missing")
        expect_errno(errno.EEXIST, os.setxattr, target, "user.one", b"2", os.XATTR_CREATE)
        expect_errno(errno.ENODATA, os.setxattr, target, "user.nope", b"2", os.XATTR_REPLACE)
        os.setxattr(target, "user.one", b"replaced", os.XATTR_REPLACE)
        assert os.getxattr(target, "user.one") == b"replaced"
        os.removexattr(target, "user.one")
        expect_errno(errno.ENODATA, os.getxattr, target, "user.one")
        assert sorted(os.listxattr(target)) == ["user.bin", "user.empty"]
    # xattrs follow the inode through rename and hard link
    os.rename(p, d / "g")
    os.link(d / "g", d / "h")
    assert os.getxattr(d / "h", "user.bin") == b"\0\xff" * 1000
    os.setxattr(d / "h", "user.via-link", b"v")
    assert os.getxattr(d / "g", "user.via-link") == b"v"


def test_xattr_names_up_to_the_linux_limit(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"")
    name = "user." + "n" * 160
    os.setxattr(p, name, b"v160")
    assert os.getxattr(p, name) == b"v160" and os.listxattr(p) == [name]
    expect_errno(errno.ERANGE, os.setxattr, p, "user." + "n" * 251, b"v")  # 256 > XATTR_NAME_MAX


def test_xattr_255_byte_name(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"")
    name = "user." + "n" * 250
    os.setxattr(p, name, b"v")
    os.setxattr(p, "user.short", b"s")
    assert os.getxattr(p, name) == b"v"
    assert sorted(os.listxattr(p)) == sorted([name, "user.short"])
    os.setxattr(p, name, b"w" * 1000)  # replace the value
    assert os.getxattr(p, name) == b"w" * 1000
    os.removexattr(p, name)
    assert os.listxattr(p) == ["user.short"]
    expect_errno(errno.ENODATA, os.getxattr, p, name)


def test_security_and_trusted_xattrs_on_fifos_sockets_and_devices(d: Path) -> None:
    """As ext4 lets root: security.* and trusted.* xattrs on special files (their backing entries
    cannot hold user.* ones, so encfs keeps them in trusted.*); user.* stays refused by the kernel."""
    os.mkfifo(d / "fifo")
    os.mknod(d / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as s:
        bind_unix_socket(s, d, "sock")
    long_name = "trusted." + "t" * 240
    for target in (d / "fifo", d / "null", d / "sock"):
        os.setxattr(target, "trusted.one", b"1")
        os.setxattr(target, "security.two", b"\0" * 300)
        os.setxattr(target, long_name, b"long")
        assert os.getxattr(target, "trusted.one") == b"1"
        assert os.getxattr(target, "security.two") == b"\0" * 300
        assert os.getxattr(target, long_name) == b"long"
        assert sorted(os.listxattr(target)) == sorted(["trusted.one", "security.two", long_name])
        expect_errno(errno.EEXIST, os.setxattr, target, "trusted.one", b"2", os.XATTR_CREATE)
        os.setxattr(target, "trusted.one", b"2", os.XATTR_REPLACE)
        assert os.getxattr(target, "trusted.one") == b"2"
        os.removexattr(target, "trusted.one")
        expect_errno(errno.ENODATA, os.getxattr, target, "trusted.one")
        expect_errno(errno.ENODATA, os.setxattr, target, "trusted.one", b"3", os.XATTR_REPLACE)
        expect_errno(errno.EPERM, os.setxattr, target, "user.x", b"1")
    os.rename(d / "fifo", d / "fifo2")  # they follow the inode
    assert os.getxattr(d / "fifo2", "security.two") == b"\0" * 300
