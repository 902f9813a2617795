"""Encrypted block volumes end to end: the real CLI, real loop devices, ext4, fio. The life cycle
(create, info, attach, ext4, detach, re-attach), no plaintext in the image, sparse images and discard,
concurrent random I/O under fio with verification, and resize (detached, attached, size syntax).

The ``Rig`` (tests/volume_helpers.py) undoes whatever a test set up, also when it fails. The other
volume tests: test_volumes_damage.py, test_volumes_crash.py, test_volumes_errors.py and
test_volumes_full_disk.py.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from procs import children, running
from volume_helpers import (
    STRESS,
    MiB,
    Rig,
    _fio,
    allocated,
    dd_write,
    fio,
    patterns,
    pytestmark,  # noqa: F401 - root, /dev/fuse, loop devices, the tools
    read_ok,
    rig,
    sh,
    shas,
    write_files,
)

__all__ = ["fio", "rig"]  # the fixtures, used by name

from encfs.block.attach import LOOP_MAX_REQUEST_KIB, LOOP_READ_AHEAD_KIB

# -- lifecycle -------------------------------------------------------------------------------------


def test_lifecycle_create_info_attach_ext4_detach_reattach(rig: Rig) -> None:
    image = rig.tmp / "vol.img"
    out = rig.ok("volume", "create", image, "--size", "64M", "--key", "fs")
    key_id = re.search(r"under key (\S+)", out).group(1)

    info = rig.info(image)
    assert info["Size"] == 64 * MiB
    assert info["KeyId"] == key_id
    assert info["Attached"] is None
    assert info["Warnings"] == []
    assert info["OneSyncCommits"] is True  # FORMAT.md §7.6.7: every volume created now
    text = rig.ok("volume", "info", image)
    assert str(64 * MiB) in text and key_id in text

    loop = rig.attach(image)
    [row] = rig.listed()
    assert row["Device"] == loop and row["State"] == "attached" and row["Image"] == str(image)
    assert row["VolumeId"] == info["VolumeId"]
    assert loop in rig.ok("volume", "list")
    assert rig.info(image)["Attached"] == loop
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 64 * MiB

    rig.mkfs(loop)
    mnt = rig.mount(loop)
    (mnt / "dir").mkdir()
    written = write_files(mnt, "f", 6, 700_000, rig.tmp / "w.log")
    written.update({f"dir/{k}": v for k, v in write_files(mnt / "dir", "g", 3, 3 * MiB + 123, rig.tmp / "w.log").items()})
    small = mnt / "small.txt"
    small.write_text("hello volume\n")
    written["small.txt"] = hashlib.sha256(b"hello volume\n").hexdigest()
    rig.umount(mnt)
    workers = children(row["Pid"])
    assert len(workers) == 1  # the sealing worker
    rig.detach(loop)
    assert rig.listed() == []
    rig.assert_nothing_attached()
    assert not any(running(w) for w in workers), "the sealing worker outlived a detach"

    # The loop device gets encfs's read-ahead and largest request, not what its number was last given.
    # Every unbound loop device gets other values first: the attach may take any of them (other
    # processes on the machine attach loop devices too).
    sh("losetup", "--find", timeout=30)  # at least one free device exists
    for dev in Path("/sys/block").glob("loop*"):
        if not (dev / "loop").exists():  # unbound ("loop/" holds a bound device's backing file)
            (dev / "queue" / "read_ahead_kb").write_text("128\n")
            (dev / "queue" / "max_sectors_kb").write_text("512\n")
    loop2 = rig.attach(image)
    queue = Path(f"/sys/block/{Path(loop2).name}/queue")
    assert int(sh("blockdev", "--getra", loop2).stdout) * 512 == LOOP_READ_AHEAD_KIB * 1024
    assert int((queue / "max_sectors_kb").read_text()) == LOOP_MAX_REQUEST_KIB == 1024
    rig.fsck_clean(loop2)
    mnt = rig.mount(loop2)
    assert shas(mnt, sorted(written)) == {Path(k).name: v for k, v in written.items()}
    rig.umount(mnt)
    rig.fsck_clean(loop2)
    rig.detach(image)  # by image path this time
    assert rig.listed() == []
    assert rig.info(image)["Attached"] is None
    rig.assert_nothing_attached()
    assert list((rig.run_dir / "volumes").iterdir()) == []  # no stale private mountpoints either
    assert (rig.run_dir / "volumes").stat().st_mode & 0o777 == 0o700


# -- no plaintext in the image ---------------------------------------------------------------------


def test_plaintext_never_reaches_the_image(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    marker = b"ENCFS-PLAINTEXT-MARKER-7f3a9c "
    src = rig.tmp / "secret.src"
    src.write_bytes(marker * (4 * MiB // len(marker)))
    sh("dd", f"if={src}", f"of={mnt / 'secret.txt'}", "bs=1M", "conv=fsync", "status=none")
    (mnt / "ENCFS-PLAINTEXT-MARKER-name").write_bytes(marker)  # in a directory block too
    sh("sync")
    rig.umount(mnt)
    rig.detach(loop)
    raw = image.read_bytes()
    assert b"PLAINTEXT-MARKER" not in raw
    assert marker[:8] not in raw
    # ... and it did get there encrypted: reattach and read it back
    loop = rig.attach(image)
    mnt = rig.mount(loop)
    assert (mnt / "secret.txt").read_bytes()[:len(marker)] == marker
    rig.umount(mnt)
    rig.detach(loop)


# -- sparse images and discard ---------------------------------------------------------------------


def test_sparse_image_and_discard_frees_space(rig: Rig) -> None:
    image = rig.create()
    assert allocated(image) < 512 * 1024, "a fresh image holds only headers and sector maps"
    assert rig.info(image)["ImageAllocatedBytes"] == allocated(image)
    loop = rig.attach(image)

    # never-written sectors read as zeros
    assert read_ok(loop, 40 * MiB, 2 * MiB) == bytes(2 * MiB)

    # raw write, discard part of it: the discarded part reads as zeros, the rest is intact
    data = patterns(4096, 2048, 1)  # 8 MiB at 16 MiB
    dd_write(loop, 16 * MiB, data, rig.tmp)
    assert read_ok(loop, 16 * MiB, 8 * MiB) == data
    sh("blkdiscard", "-o", str(16 * MiB), "-l", str(4 * MiB), loop)
    assert read_ok(loop, 16 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert read_ok(loop, 20 * MiB, 4 * MiB) == data[4 * MiB:]

    # ext4: 32 MiB of file data makes the image grow; rm + fstrim gives it back
    rig.mkfs(loop, "-E", "lazy_itable_init=0,lazy_journal_init=0")
    assert read_ok(loop, 20 * MiB, 4 * MiB) == bytes(4 * MiB), "mkfs discarded the device"
    mnt = rig.mount(loop)
    write_files(mnt, "big", 1, 32 * MiB, rig.tmp / "w.log")
    sh("sync")
    full = allocated(image)
    assert full > 32 * MiB, full
    (mnt / "big00000").unlink()
    sh("sync")
    trim = sh("fstrim", "-v", mnt)
    assert "trimmed" in trim.stdout
    rig.umount(mnt)
    rig.detach(loop)
    freed = full - allocated(image)
    assert freed > 24 * MiB, f"only {freed} of {full} bytes were given back"

    # and the volume is still a clean filesystem with zeros where the file was
    loop = rig.attach(image)
    rig.fsck_clean(loop)
    rig.detach(loop)


# -- fio -------------------------------------------------------------------------------------------


def test_fio_concurrent_random_read_write_with_verify(rig: Rig, fio: str) -> None:
    image = rig.create()
    loop = rig.attach(image)
    runtime = 30 if STRESS else 10
    # fill the read half with verifiable blocks (written, then read back and checked)
    fill = _fio(fio, loop, rig.tmp, "--name=fill", "--rw=write", "--offset=32M", "--size=32M", "--do_verify=1")
    assert fill["returncode"] == 0 and all(j["error"] == 0 for j in fill["jobs"]), fill["stderr"]
    # concurrently: random writes verified as they go, and random reads verified against the fill
    res = _fio(fio, loop, rig.tmp, f"--runtime={runtime}", "--time_based",
               "--name=w", "--rw=randwrite", "--offset=0", "--size=32M", "--verify_backlog=256",
               "--name=r", "--rw=randread", "--offset=32M", "--size=32M", "--do_verify=1",
               timeout=runtime + 120)
    assert res["returncode"] == 0, res["stderr"]
    jobs = {j["jobname"]: j for j in res["jobs"]}
    assert jobs["w"]["error"] == 0 and jobs["r"]["error"] == 0, res["stderr"]
    assert jobs["w"]["write"]["io_bytes"] > 4 * MiB and jobs["r"]["read"]["io_bytes"] > 4 * MiB
    # the verification is real: reading discarded blocks with verify must fail
    sh("blkdiscard", "-o", "0", "-l", str(4 * MiB), loop)
    neg = _fio(fio, loop, rig.tmp, "--name=neg", "--rw=read", "--offset=0", "--size=4M", "--do_verify=1")
    assert neg["returncode"] != 0 or any(j["error"] for j in neg["jobs"])
    [row] = rig.listed()
    assert row["State"] == "attached"
    rig.detach(loop)


# -- resize ----------------------------------------------------------------------------------------


def test_resize_grows_detached_volume_and_refuses_shrink(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    kept = write_files(mnt, "k", 4, 2 * MiB, rig.tmp / "k.log")
    rig.umount(mnt)
    rig.detach(loop)

    assert "shrink" in rig.fails("volume", "resize", image, "--size", "32M")
    assert rig.info(image)["Size"] == 64 * MiB
    rig.ok("volume", "resize", image, "--size", "128M")
    assert rig.info(image)["Size"] == 128 * MiB
    loop = rig.attach(image)
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 128 * MiB
    # the added space reads as zeros
    assert read_ok(loop, 100 * MiB, 1 * MiB) == bytes(MiB)
    sh("e2fsck", "-fy", loop, timeout=120, check=False)
    sh("resize2fs", loop, timeout=120)
    rig.fsck_clean(loop)
    mnt = rig.mount(loop)
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize > 100 * MiB
    assert shas(mnt, sorted(kept)) == kept
    more = write_files(mnt, "m", 40, 2 * MiB, rig.tmp / "m.log")  # 80 MiB: needs the new space
    assert shas(mnt, sorted(more)) == more
    rig.umount(mnt)
    rig.fsck_clean(loop)
    rig.detach(loop)
    assert "shrink" in rig.fails("volume", "resize", image, "--size", "64M")


def test_sizes_read_as_coreutils_reads_them_and_resize_takes_plus(rig: Rig) -> None:
    """10G and 10GiB are binary, 10GB decimal (rounded up to 4 KiB sectors), +SIZE grows by it."""
    image = rig.create(size="64MiB")
    assert rig.info(image)["Size"] == 64 * MiB
    rig.ok("volume", "resize", image, "--size", "+8M")
    assert rig.info(image)["Size"] == 72 * MiB
    rig.ok("volume", "resize", image, "--size", "100MB")
    assert rig.info(image)["Size"] == -(-100_000_000 // 4096) * 4096
    assert "only for resize" in rig.fails("volume", "create", rig.tmp / "b.img", "--size", "+2G", "--key", "fs")
    assert "10GB" in rig.fails("volume", "resize", image, "--size", "1.5G")
    assert not (rig.tmp / "b.img").exists()


def test_online_resize_grows_an_attached_volume(rig: Rig) -> None:
    """The daemon grows the image and header; the loop device takes the new size at once."""
    image = rig.create(size="64M")
    loop = rig.attach(image)
    head = os.urandom(MiB)
    fd = os.open(loop, os.O_WRONLY)
    try:
        os.pwrite(fd, head, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert "shrink" in rig.fails("volume", "resize", image, "--size", "32M")
    rig.ok("volume", "resize", image, "--size", "160M")
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 160 * MiB
    assert rig.info(image)["Size"] == 160 * MiB
    tail = os.urandom(MiB)
    fd = os.open(loop, os.O_WRONLY)
    try:
        os.pwrite(fd, tail, 150 * MiB)  # beyond the old end
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_ok(loop, 100 * MiB, MiB) == bytes(MiB)  # new space reads as zeros
    rig.detach(loop)
    loop = rig.attach(image)
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 160 * MiB
    assert read_ok(loop, 0, MiB) == head
    assert read_ok(loop, 150 * MiB, MiB) == tail
    rig.detach(loop)
    rig.assert_nothing_attached()
