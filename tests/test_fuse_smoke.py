"""First end-to-end checks of the encrypted FUSE filesystem on a real mount."""

from __future__ import annotations

import os
import subprocess

from conftest import run_encfs

from encfs.fuse.fsconfig import DEFAULT_BLOCK_SIZE


def _backing_bytes(root) -> bytes:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(n.encode())
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out.append(os.readlink(p).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out.append(f.read())
            for x in os.listxattr(p, follow_symlinks=False):
                out.append(x.encode())
                try:
                    out.append(os.getxattr(p, x, follow_symlinks=False))
                except OSError:
                    pass
    return b"\n".join(out)


def test_round_trip_and_no_plaintext_in_cipherdir(encfs_mount) -> None:
    m = encfs_mount.mountpoint
    secret = b"TOPSECRET-CONTENT-" * 1000
    (m / "secret-name.txt").write_bytes(secret)
    (m / "subdir-secret").mkdir()
    (m / "subdir-secret" / ("L" * 240 + "-longname")).write_bytes(b"TOPSECRET-LONG")
    os.symlink("TOPSECRET-TARGET", m / "link-secret")
    os.setxattr(m / "secret-name.txt", "user.TOPSECRET-XATTR", b"TOPSECRET-VALUE")
    assert (m / "secret-name.txt").read_bytes() == secret
    assert os.readlink(m / "link-secret") == "TOPSECRET-TARGET"
    assert os.getxattr(m / "secret-name.txt", "user.TOPSECRET-XATTR") == b"TOPSECRET-VALUE"
    assert sorted(os.listdir(m)) == ["link-secret", "secret-name.txt", "subdir-secret"]
    assert os.listdir(m / "subdir-secret") == ["L" * 240 + "-longname"]
    encfs_mount.stop()
    blob = _backing_bytes(encfs_mount.cipherdir)
    for needle in (b"TOPSECRET", b"secret-name", b"subdir-secret", b"LLLLLLLLLL", b"longname"):
        assert needle not in blob


def test_tampered_block_reads_eio(encfs_mount, tmp_path, fs_home) -> None:
    from fuse_helpers import Mount

    block = DEFAULT_BLOCK_SIZE
    m = encfs_mount.mountpoint
    (m / "f").write_bytes(os.urandom(3 * block))
    encfs_mount.stop()
    backing = [p for p in encfs_mount.cipherdir.iterdir() if "." not in p.name][0]
    data = bytearray(backing.read_bytes())
    data[128 + (block + 28) + 100] ^= 1  # inside block 1
    backing.write_bytes(bytes(data))
    with Mount(encfs_mount.cipherdir, m, fs_home):
        with open(m / "f", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into block 1
            assert len(f.read(block)) == block  # block 0 is intact
            try:
                f.read(block)
            except OSError as e:
                assert e.errno == 5
            else:
                raise AssertionError("tampered block was returned")


def test_mount_errors_are_one_line(tmp_path, fs_home) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = run_encfs("mount", str(tmp_path / "nothing"), str(mp), home=fs_home)
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not" in lines[0], lines
    assert subprocess.run(["mountpoint", "-q", str(mp)]).returncode != 0
