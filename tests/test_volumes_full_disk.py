"""A full backing disk (a small tmpfs) under an attached sparse volume, through the real CLI and real
loop devices: raw writes and ext4 get ENOSPC, the daemon survives, what was fsync'd reads back, a
write that could not be stored is not reported done, and growing on a full disk fails in one line.

The ``Rig`` (tests/volume_helpers.py) undoes whatever a test set up, also when it fails.
"""

from __future__ import annotations

from procs import running
from volume_helpers import (
    WRITE_FILES,
    MiB,
    Rig,
    dd_write,
    patterns,
    py,
    pytestmark,  # noqa: F401 - root, /dev/fuse, loop devices, the tools
    read_ok,
    rig,
    sh,
    shas,
    write_files,
)

__all__ = ["rig"]  # the fixture, used by name


def test_full_backing_disk_gives_enospc_and_keeps_fsynced_data(rig: Rig) -> None:
    disk = rig.tmpfs_mount("small-disk", "40M")
    image = rig.create(where=disk, sparse=True)  # a 64 MiB volume on a 40 MiB disk
    loop = rig.attach(image)
    [row] = rig.listed()
    synced = patterns(0, 2048, 1)  # 8 MiB, fsync'd
    dd_write(loop, 0, synced, rig.tmp)
    filler = disk / "filler"
    filler.write_bytes(bytes(6 * MiB))  # room to give back later

    # fill the disk through the volume
    r = sh("dd", "if=/dev/zero", f"of={loop}", "bs=1M", "seek=8", "oflag=direct", "conv=fsync",
           "status=none", timeout=120, check=False)
    assert r.returncode != 0
    assert "No space left on device" in r.stderr or "Input/output error" in r.stderr, r.stderr
    assert running(row["Pid"]), "the daemon must survive ENOSPC"
    # overwriting fsync'd data while the disk is full fails, and must not damage it
    src = rig.tmp / "over"
    src.write_bytes(patterns(0, 256, 2))
    r = sh("dd", f"if={src}", f"of={loop}", "bs=4096", "oflag=direct", "conv=fsync,notrunc", "status=none",
           check=False)
    assert r.returncode != 0, "a write that could not be stored was reported as done"
    # Format 2 writes to free pages of its image, of which the disk may still hold some: each sector
    # reads its old or its new contents, never an error or anything else.
    after = read_ok(loop, 0, 8 * MiB)
    new = patterns(0, 256, 2)
    for s in range(2048):
        got = after[s * 4096:(s + 1) * 4096]
        assert got == synced[s * 4096:(s + 1) * 4096] or (s < 256 and got == new[s * 4096:(s + 1) * 4096]), s
    [row2] = rig.listed()
    assert row2["State"] == "attached" and running(row["Pid"])

    # give space back: detach flushes, re-attach, what was read is intact and writes work again
    filler.unlink()
    rig.detach(loop)
    loop = rig.attach(image)
    assert read_ok(loop, 0, 8 * MiB) == after
    dd_write(loop, 0, patterns(0, 256, 3), rig.tmp)
    assert read_ok(loop, 0, 1 * MiB) == patterns(0, 256, 3)
    rig.detach(loop)

    # growing on a full disk fails in one line and leaves the volume as it was
    sh("dd", "if=/dev/zero", f"of={filler}", "bs=64k", "status=none", check=False, timeout=60)
    assert "cannot grow" in rig.fails("volume", "resize", image, "--size", "2G")
    assert rig.info(image)["Size"] == 64 * MiB
    filler.unlink()
    loop = rig.attach(image)
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 64 * MiB
    assert read_ok(loop, 1 * MiB, 7 * MiB) == synced[1 * MiB:]
    rig.detach(loop)


def test_full_backing_disk_under_ext4(rig: Rig) -> None:
    disk = rig.tmpfs_mount("small-disk", "40M")
    image = rig.create(where=disk, sparse=True)
    loop = rig.attach(image)
    [row] = rig.listed()
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    kept = write_files(mnt, "kept", 4, 1 * MiB, rig.tmp / "kept.log")
    filler = disk / "filler"
    filler.write_bytes(bytes(4 * MiB))
    r = py(WRITE_FILES, mnt, "fill", "60", str(1 * MiB), rig.tmp / "fill.log", timeout=180, check=False)
    assert r.returncode != 0, "40 MiB of disk cannot hold 60 MiB of data"
    assert "No space left on device" in r.stderr or "Input/output error" in r.stderr, r.stderr
    assert running(row["Pid"]), "the daemon must survive ENOSPC"
    rig.umount(mnt, lazy_fallback=True)
    filler.unlink()
    for p in disk.iterdir():
        assert p == image
    rig.detach(loop)
    loop = rig.attach(image)
    r = sh("e2fsck", "-fy", loop, timeout=180, check=False)
    assert r.returncode < 4, r.stdout
    rig.fsck_clean(loop)
    mnt = rig.mount(loop)
    assert shas(mnt, sorted(kept)) == kept
    rig.umount(mnt)
    rig.detach(loop)


def test_detach_fails_when_the_final_flush_fails(rig: Rig) -> None:
    """Writes the loop device took since the last flush are lost when the daemon's final flush
    fails (a full disk): detach still detaches, but says so in one line and exits non-zero."""
    disk = rig.tmpfs_mount("small-disk", "12M")
    image = rig.create(where=disk, sparse=True)
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 2048, 1), rig.tmp)  # 8 MiB, fsync'd
    # no fsync: fill the disk, then single sectors into every leaf's range take the pages left,
    # so that the map nodes the final flush must write find none
    sh("dd", "if=/dev/urandom", f"of={loop}", "bs=1M", "seek=8", "count=40", "oflag=direct", "status=none",
       timeout=120, check=False)
    py(SINGLE_SECTORS, loop, timeout=120)
    p = rig.encfs("volume", "detach", loop)
    assert p.returncode == 74, p  # EX_IOERR
    [msg] = p.stderr.strip().splitlines()
    assert msg.startswith("encfs: ") and "final flush failed (No space left on device)" in msg, msg
    assert "writes since its last flush are lost" in msg and "Traceback" not in p.stderr, msg
    rig.assert_nothing_attached()


SINGLE_SECTORS = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
buf[:] = b"\x55" * 4096
for i in range(100000):
    s = (i * 1031 + 2048) % 16384
    if s >= 2048:
        try:
            os.pwrite(fd, buf, s * 4096)
        except OSError:
            break
"""
