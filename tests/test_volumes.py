"""Encrypted block volumes end to end: the real CLI, real loop devices, ext4, FUSE daemons, fio, kill -9.

Every test gets its own ENCFS_RUN_DIR (registry and private FUSE mounts) under tmp_path and a
``Rig`` that undoes whatever the test set up, also when it fails: ext4 mounts are unmounted,
volumes detached with ``encfs volume detach``, and as a last resort loop devices on FUSE files
under the run dir are detached, private FUSE mounts lazily unmounted and registered daemons
killed; tmpfs mounts go last. Bulk I/O on volumes runs in subprocesses (dd, fio, small Python
scripts) with bounded waits, so a stuck device fails a test instead of hanging the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs
from procs import children, running

from encfs.block.attach import LOOP_MAX_REQUEST_KIB, LOOP_READ_AHEAD_KIB
from encfs.block.layout import (
    EXTENT_SECTORS,
    HEADER_SLOT,
    SLOT_A,
    SLOT_B,
    map_offset,
    sector_offset,
)
from encfs.blocks import SEALED_BLOCK

STRESS = os.environ.get("ENCFS_STRESS") == "1"
MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="volumes need root (loop devices, mount)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"),
                       reason="needs /dev/fuse and loop devices"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("losetup", "mkfs.ext4", "e2fsck", "dd")),
                       reason="needs util-linux, e2fsprogs and coreutils"),
]


# -- bounded commands ---------------------------------------------------------------------


class Stuck(AssertionError):
    pass


def sh(*cmd: str | Path, timeout: float = 60, check: bool = True,
       input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a hard bound on the wait, even if it sits in uninterruptible sleep."""
    p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            raise Stuck(f"{cmd} is stuck (pid {p.pid}) after {timeout} s") from None
        raise Stuck(f"{cmd} timed out after {timeout} s: {err.decode(errors='replace')}") from None
    res = subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace"),
                                      err.decode(errors="replace"))
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def py(script: str, *args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-c", script, *args, timeout=timeout, check=check)


# Writes COUNT files of SIZE random bytes into DIR (COUNT -1: until killed or an error); each file
# is fsync'd, then the directory, and only then "name sha256" is appended to LOG and printed.
WRITE_FILES = r"""
import hashlib, os, sys
d, prefix, count, size, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
i = 0
while count < 0 or i < count:
    data = os.urandom(size)
    name = f"{prefix}{i:05d}"
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(d, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    line = f"{name} {hashlib.sha256(data).hexdigest()}\n"
    os.write(logfd, line.encode())
    sys.stdout.write(line)
    sys.stdout.flush()
    i += 1
"""

# The raw-device pattern: a sector's contents name the sector and a generation.
PATTERN = r"""
import hashlib, struct
def pattern(sector, gen):
    head = struct.pack(">8sQQ", b"ENCFSPAT", sector, gen)
    return head + hashlib.shake_128(head).digest(4096 - len(head))
"""

# Passes over sectors [0, N) of DEV with O_DIRECT, generation after generation (starting at
# FIRST_GEN), writing runs of 1-16 sectors; after every fsync it appends "gen upto" to LOG:
# sectors [0, upto) of gen and all of gen - 1 are durable.
RAW_WRITER = PATTERN + r"""
import mmap, os, random, sys
dev, n, first_gen, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
buf = mmap.mmap(-1, 16 * 4096)
rng = random.Random()
gen = first_gen
while True:
    s = 0
    runs = 0
    while s < n:
        k = min(rng.randint(1, 16), n - s)
        buf[:k * 4096] = b"".join(pattern(x, gen) for x in range(s, s + k))
        os.pwrite(fd, memoryview(buf)[:k * 4096], s * 4096)
        s += k
        runs += 1
        if runs % 8 == 0 or s == n:
            os.fsync(fd)
            os.write(logfd, f"{gen} {s}\n".encode())
    gen += 1
"""

_pattern_ns: dict[str, Any] = {}
exec(PATTERN, _pattern_ns)  # noqa: S102 - the same code the writer subprocess runs
pattern = _pattern_ns["pattern"]


def mounted_at(path: str | Path) -> bool:
    p = str(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(len(parts) > 1 and parts[1] == p for parts in (line.split() for line in f))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dd_read(dev: str, offset: int, length: int, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Read [offset, offset+length) of a block device with O_DIRECT (4 KiB aligned)."""
    p = subprocess.Popen(["dd", f"if={dev}", "bs=4096", f"skip={offset // 4096}", f"count={length // 4096}",
                          "iflag=direct", "status=none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=5)
        raise Stuck(f"dd read of {dev} timed out") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def read_ok(dev: str, offset: int, length: int) -> bytes:
    r = dd_read(dev, offset, length)
    assert r.returncode == 0, f"read of {dev} at {offset} failed: {r.stderr.decode().strip()}"
    assert len(r.stdout) == length
    return r.stdout


def dd_write(dev: str, offset: int, data: bytes, tmp: Path) -> None:
    """Write ``data`` at ``offset`` with O_DIRECT, then fsync the device."""
    src = tmp / f"dd-src-{os.getpid()}-{offset}"
    src.write_bytes(data)
    try:
        sh("dd", f"if={src}", f"of={dev}", "bs=4096", f"seek={offset // 4096}", "oflag=direct",
           "conv=fsync,notrunc", "status=none")
    finally:
        src.unlink()


def patterns(first: int, count: int, gen: int) -> bytes:
    return b"".join(pattern(s, gen) for s in range(first, first + count))


# -- the rig ------------------------------------------------------------------------------------


class Rig:
    """The CLI with a private run dir, plus everything a test set up, undone in cleanup()."""

    def __init__(self, tmp: Path, home: Path) -> None:
        self.tmp = tmp
        self.home = home
        self.run_dir = tmp / "run"
        self.env = {"ENCFS_RUN_DIR": str(self.run_dir)}
        self.ext4: list[Path] = []
        self.tmpfs: list[Path] = []
        self.homes: list[Path] = []

    # CLI
    def encfs(self, *args: str | Path, home: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = run_encfs(*map(str, args), home=home or self.home, env=self.env, timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                           p.stderr.decode(errors="replace"))

    def ok(self, *args: str | Path, home: Path | None = None) -> str:
        p = self.encfs(*args, home=home)
        assert p.returncode == 0, f"encfs {' '.join(map(str, args))} failed: {p.stderr.strip()}"
        return p.stdout

    def fails(self, *args: str | Path, home: Path | None = None) -> str:
        """The command fails with exactly one line on stderr, 'encfs: ...', and no traceback."""
        p = self.encfs(*args, home=home)
        assert p.returncode != 0, f"encfs {' '.join(map(str, args))} succeeded: {p.stdout}"
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("encfs: "), p.stderr
        assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
        return lines[0]

    def create(self, name: str = "vol.img", size: str = "64M", home: Path | None = None,
               key: str = "fs", where: Path | None = None, fmt: int = 2, sparse: bool = False) -> Path:
        image = (where or self.tmp) / name
        self.ok("volume", "create", image, "--size", size, "--key", key, "--format", str(fmt),
                *(["--sparse"] if sparse else []), home=home)
        return image

    def attach(self, image: Path, home: Path | None = None) -> str:
        out = self.ok("volume", "attach", image, "--log-file", self.tmp / "daemon.log", home=home)
        loop = out.strip()
        assert re.fullmatch(r"/dev/loop\d+", loop), out
        return loop

    def attach_with(self, image: Path, *options: str, home: Path | None = None) -> str:
        out = self.ok("volume", "attach", image, *options, "--log-file", self.tmp / "daemon.log", home=home)
        loop = out.strip()
        assert re.fullmatch(r"/dev/loop\d+", loop), out
        return loop

    def detach(self, ref: str | Path) -> None:
        self.ok("volume", "detach", ref)

    def info(self, image: Path) -> dict[str, Any]:
        return json.loads(self.ok("volume", "info", image, "--json"))

    def listed(self) -> list[dict[str, Any]]:
        return json.loads(self.ok("volume", "list", "--json"))["Volumes"]

    def entries(self) -> list[dict[str, Any]]:
        reg = self.run_dir / "volumes"
        out = []
        for p in sorted(reg.glob("*.json")) if reg.is_dir() else []:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out

    # what is attached under this run dir
    def fuse_mounts(self) -> list[str]:
        prefix = str(self.run_dir) + "/"
        with open("/proc/self/mounts", encoding="utf-8") as f:
            return [p[1] for p in (line.split() for line in f) if len(p) > 1 and p[1].startswith(prefix)]

    def loops(self) -> list[tuple[str, str]]:
        """(loop device, backing file) for loop devices on FUSE files under this run dir."""
        r = sh("losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE", timeout=30)
        out = []
        for line in r.stdout.splitlines():
            name, _, back = line.partition(" ")
            if back.startswith(str(self.run_dir) + "/"):
                out.append((name, back))
        return out

    def assert_nothing_attached(self) -> None:
        assert self.entries() == []
        assert self.fuse_mounts() == []
        assert self.loops() == []
        reg = self.run_dir / "volumes"
        assert not reg.exists() or list(reg.iterdir()) == [], "stale private mountpoints"

    # ext4
    def mkfs(self, dev: str, *extra: str) -> None:
        sh("mkfs.ext4", "-q", "-F", *extra, dev, timeout=120)

    def mount(self, dev: str, name: str = "mnt", *opts: str) -> Path:
        mp = self.tmp / name
        mp.mkdir(exist_ok=True)
        sh("mount", *opts, dev, mp)
        self.ext4.append(mp)
        return mp

    def umount(self, mp: Path, lazy_fallback: bool = False) -> None:
        r = sh("umount", mp, timeout=60, check=not lazy_fallback)
        if r.returncode != 0:
            sh("umount", "-l", mp, timeout=30)

    def fsck_clean(self, dev: str) -> None:
        r = sh("e2fsck", "-fn", dev, timeout=120, check=False)
        assert r.returncode == 0, f"e2fsck -fn {dev}: {r.returncode}\n{r.stdout}\n{r.stderr}"

    def tmpfs_mount(self, name: str, size: str) -> Path:
        mp = self.tmp / name
        mp.mkdir()
        sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mp)
        self.tmpfs.append(mp)
        return mp

    def new_home(self, alias: str) -> Path:
        home = self.tmp / f"home-{alias}"
        self.ok("hsm", "init", home=home)
        self.ok("key", "create", "--alias", alias, home=home)
        self.homes.append(home)
        return home

    def kill_daemon(self, loop: str) -> int:
        [row] = [r for r in self.listed() if r["Device"] == loop]
        pid = row["Pid"]
        assert running(pid)
        workers = children(pid)
        assert len(workers) == 1, workers  # the daemon's sealing worker (encfs.sealworker)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (running(pid) or any(running(w) for w in workers)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running(pid)
        assert not any(running(w) for w in workers), "the sealing worker outlived its daemon"
        return pid

    # cleanup
    def cleanup(self) -> None:
        problems: list[str] = []

        def attempt(what: str, fn: Any, *a: Any) -> None:
            try:
                fn(*a)
            except Exception as e:  # noqa: BLE001 - keep cleaning; report at the end
                problems.append(f"{what}: {e}")

        for mp in reversed(self.ext4):
            if mounted_at(mp):
                attempt(f"umount {mp}", self.umount, mp, True)
        for e in self.entries():
            r = None
            try:
                r = self.encfs("volume", "detach", e["volume_id"], timeout=90)
            except subprocess.TimeoutExpired:
                problems.append(f"detach {e['volume_id']} timed out")
            if r is None or r.returncode != 0:
                attempt("last-resort cleanup", self._force_cleanup, e)
        for loop, _back in self.loops() if os.path.isdir(self.run_dir) else []:
            attempt(f"losetup -d {loop}", sh, "losetup", "-d", loop)
        for mp in self.fuse_mounts():
            attempt(f"umount -l {mp}", sh, "umount", "-l", mp)
        for mp in reversed(self.tmpfs):
            if mounted_at(mp):
                r = sh("umount", mp, check=False)
                if r.returncode != 0:
                    attempt(f"umount -l {mp}", sh, "umount", "-l", mp)
        if problems:
            print("volume test cleanup problems:", *problems, sep="\n  ", file=sys.stderr)

    def _force_cleanup(self, e: dict[str, Any]) -> None:
        mountpoint = e.get("mountpoint", "")
        if e.get("loop") and mountpoint:
            r = sh("losetup", "--noheadings", "--output", "BACK-FILE", e["loop"], check=False)
            if r.stdout.strip() == f"{mountpoint}/volume":
                sh("losetup", "-d", e["loop"], check=False)
        if mountpoint and mounted_at(mountpoint):
            sh("umount", "-l", mountpoint, check=False)
        pid = int(e.get("pid", 0))
        if pid > 1 and running(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if b"encfs" in cmdline and b"attach" in cmdline:
                os.kill(pid, signal.SIGKILL)
        (self.run_dir / "volumes" / f"{e['volume_id']}.json").unlink(missing_ok=True)


@pytest.fixture
def rig(tmp_path: Path, fs_home: Path):
    r = Rig(tmp_path, fs_home)
    try:
        yield r
    finally:
        r.cleanup()


def write_files(d: Path, prefix: str, count: int, size: int, log: Path) -> dict[str, str]:
    out = py(WRITE_FILES, d, prefix, str(count), str(size), log, timeout=180).stdout
    return dict(line.split() for line in out.splitlines())


def shas(d: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    r = sh("sha256sum", *[d / n for n in names], timeout=120)
    return {Path(p.strip()).name: h for h, p in (line.split(" ", 1) for line in r.stdout.splitlines())}


# -- 1. lifecycle --------------------------------------------------------------------------------


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


# -- 2. no plaintext in the image ----------------------------------------------------------------


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


# -- 3. sparse images and discard ---------------------------------------------------------------


def allocated(image: Path) -> int:
    return os.stat(image).st_blocks * 512


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


# -- 4. tampering ---------------------------------------------------------------------------------


def flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_tampered_or_swapped_sectors_read_as_io_errors(rig: Rig) -> None:
    image = rig.create(fmt=1)  # format 1's slots; test_volumes_cow.py has format 2's
    loop = rig.attach(image)
    good = patterns(990, 20, 1)  # sectors 990..1009
    dd_write(loop, 990 * 4096, good, rig.tmp)
    swap = patterns(2000, 2, 1)
    dd_write(loop, 2000 * 4096, swap, rig.tmp)
    rig.detach(loop)

    # A first write of a sector lands in slot A; flip a byte in both slots anyway.
    for slot in (SLOT_A, SLOT_B):
        flip(image, sector_offset(1000, slot) + 100)
    with open(image, "r+b") as f:
        a0, a1 = sector_offset(2000, SLOT_A), sector_offset(2001, SLOT_A)
        f.seek(a0)
        s0 = f.read(SEALED_BLOCK)
        f.seek(a1)
        s1 = f.read(SEALED_BLOCK)
        assert s0 != bytes(SEALED_BLOCK) and s1 != bytes(SEALED_BLOCK)
        f.seek(a0)
        f.write(s1)
        f.seek(a1)
        f.write(s0)

    loop = rig.attach(image)
    for sector in (1000, 2000, 2001):
        r = dd_read(loop, sector * 4096, 4096)
        assert r.returncode != 0, f"sector {sector} was read despite tampering: {r.stdout[:32]!r}"
        assert b"Input/output error" in r.stderr, r.stderr
    for sector in range(990, 1010):
        if sector != 1000:
            assert read_ok(loop, sector * 4096, 4096) == pattern(sector, 1)
    assert read_ok(loop, 3000 * 4096, 4096) == bytes(4096)
    # each failure is logged with the image and the cause, once (issue #23)
    failures = [line for line in (rig.tmp / "daemon.log").read_text().splitlines() if "integrity failure" in line]
    assert failures and all(f"{str(image)!r}: block " in f and "(tampered)" in f for f in failures), failures
    assert len(failures) == len({f.split(" ERROR ")[1] for f in failures}), failures
    # a multi-sector read over the damage fails: never wrong bytes
    r = dd_read(loop, 996 * 4096, 8 * 4096)
    assert r.returncode != 0, "a read covering a tampered sector succeeded"
    assert r.stdout == b"" or r.stdout == good[6 * 4096:6 * 4096 + len(r.stdout)]
    # the daemon survives authentication failures, and a rewrite heals the sector
    [row] = rig.listed()
    assert row["State"] == "attached"
    dd_write(loop, 1000 * 4096, pattern(1000, 2), rig.tmp)
    assert read_ok(loop, 1000 * 4096, 4096) == pattern(1000, 2)
    rig.detach(loop)

    # a zeroed sector map does not make its extent read as "never written": it fails
    with open(image, "r+b") as f:
        for slot in (0, 1):
            f.seek(map_offset(1, slot))
            f.write(bytes(SEALED_BLOCK))
    loop = rig.attach(image)
    r = dd_read(loop, EXTENT_SECTORS * 4096 + 8 * MiB, 4096)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert read_ok(loop, 1000 * 4096, 4096) == pattern(1000, 2)
    rig.detach(loop)


def _damage_map(image: Path, extent: int, slot: int, how: str) -> bytes:
    """Flip one bit in, or zero, one sector-map slot of a detached volume; returns the damaged bytes."""
    with open(image, "r+b") as f:
        f.seek(map_offset(extent, slot))
        sealed = bytearray(f.read(SEALED_BLOCK))
        if how == "bit flip":
            sealed[700 + 1000 * slot] ^= 0x10
        else:
            sealed[:] = bytes(SEALED_BLOCK)
        f.seek(map_offset(extent, slot))
        f.write(sealed)
    return bytes(sealed)


def _map_slot(image: Path, extent: int, slot: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(map_offset(extent, slot))
        return f.read(SEALED_BLOCK)


# Makes a volume's header what the first release wrote: flag byte 5 = 0 (no mirrored maps, no header
# MAC) and the volume key wrapped with that release's context, in both copies. A subprocess: SoftHSM2
# takes one token directory per process, and this one may have loaded another.
CLEAR_FLAGS = r"""
import dataclasses, sys
from pathlib import Path
from encfs.block.header import read_header, write_header
from encfs.keys.service import KeyService
with KeyService.open(Path(sys.argv[1])) as ks, open(sys.argv[2], "r+b") as f:
    h, _w = read_header(f.fileno())
    wrapped = ks.re_encrypt(h.wrapped_key, h.context(), h.key_id, {"encfs:volume": h.volume_id.hex()},
                        encfs_internal=True)
    write_header(f.fileno(), dataclasses.replace(h, flags=0, wrapped_key=wrapped))
"""


def _clear_mirrored_flag(image: Path, home: Path) -> None:
    py(CLEAR_FLAGS, home, image)


def test_a_damaged_map_slot_loses_nothing_and_is_repaired(rig: Rig) -> None:
    """Both map slots hold the newest map at rest: a bit flip in either, or either zeroed, still reads
    back what was fsync'd last, and the daemon logs the damage and rewrites the slot."""
    image = rig.create(fmt=1)
    assert rig.info(image)["MapsMirrored"] is True
    loop = rig.attach(image)
    s = EXTENT_SECTORS + 1000  # in extent 1
    dd_write(loop, s * 4096, pattern(s, 1), rig.tmp)
    dd_write(loop, s * 4096, pattern(s, 2), rig.tmp)
    dd_write(loop, 10 * 4096, pattern(10, 1), rig.tmp)
    rig.detach(loop)
    log = rig.tmp / "daemon.log"
    extent_1 = f"extent 1 (plaintext bytes {EXTENT_SECTORS * 4096}-{2 * EXTENT_SECTORS * 4096 - 1})"
    # Each round damages one slot and relies on the other, which the round before repaired.
    for how, slot in (("bit flip", 1), ("bit flip", 0), ("zeroed", 1), ("zeroed", 0)):
        seen = log.read_text() if log.exists() else ""
        damaged = _damage_map(image, 1, slot, how)
        loop = rig.attach(image)
        assert read_ok(loop, s * 4096, 4096) == pattern(s, 2), f"{how} in map slot {slot} rolled sector {s} back"
        rig.detach(loop)
        logged = log.read_text()[len(seen):]
        assert f"sector map of {extent_1} is damaged in slot {slot}" in logged, logged
        assert f"rewriting slot {slot}" in logged
        assert _map_slot(image, 1, slot) != damaged, f"map slot {slot} was not repaired"
    # both slots damaged: that extent's sectors are EIO, the other extent's read fine
    for slot in (0, 1):
        _damage_map(image, 1, slot, "bit flip")
    loop = rig.attach(image)
    for sector in (s, EXTENT_SECTORS, 2 * EXTENT_SECTORS - 1):
        r = dd_read(loop, sector * 4096, 4096)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, f"sector {sector} read despite its map"
    assert read_ok(loop, 10 * 4096, 4096) == pattern(10, 1)
    assert read_ok(loop, (EXTENT_SECTORS - 1) * 4096, 4096) == bytes(4096)
    rig.detach(loop)


def test_an_old_style_volume_with_a_damaged_newest_map_refuses_to_attach(rig: Rig) -> None:
    """A volume made before mirrored maps holds the newest and the previous map: a damaged newest is
    refused in one line naming the extent and --accept-rollback, which then attaches with the older map."""
    image = rig.create(fmt=1)
    loop = rig.attach(image)
    s = EXTENT_SECTORS + 1000
    dd_write(loop, s * 4096, pattern(s, 1), rig.tmp)
    rig.detach(loop)
    previous = _map_slot(image, 1, 0)  # the map naming pattern 1 (both slots hold it)
    loop = rig.attach(image)
    dd_write(loop, s * 4096, pattern(s, 2), rig.tmp)
    rig.detach(loop)

    def make_old_style() -> None:  # slot 0 the previous map, slot 1 the newest, flag byte 0
        with open(image, "r+b") as f:
            f.seek(map_offset(1, 0))
            f.write(previous)
        _clear_mirrored_flag(image, rig.home)
        assert rig.info(image)["MapsMirrored"] is False

    make_old_style()  # intact: attaches as it is, and is upgraded
    loop = rig.attach(image)
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 2)
    rig.detach(loop)
    assert rig.info(image)["MapsMirrored"] is True and rig.info(image)["Warnings"] == []

    make_old_style()
    _damage_map(image, 1, 1, "bit flip")
    msg = rig.fails("volume", "attach", image)
    assert f"extent 1 (plaintext bytes {EXTENT_SECTORS * 4096}-{2 * EXTENT_SECTORS * 4096 - 1}) " \
           "is damaged in slot 1" in msg, msg
    assert f"encfs volume attach --accept-rollback {image}" in msg, msg
    rig.assert_nothing_attached()
    assert rig.info(image)["MapsMirrored"] is False

    log = rig.tmp / "rollback.log"
    loop = rig.ok("volume", "attach", "--accept-rollback", image, "--log-file", log).strip()
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 1)  # the rollback, as accepted
    rig.detach(loop)
    assert "map slot 1 is damaged; using the map in slot 0, which may be older" in log.read_text()
    assert rig.info(image)["MapsMirrored"] is True
    loop = rig.attach(image)  # upgraded: attaches without the option from now on
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 1)
    rig.detach(loop)


# -- 5. crash safety ------------------------------------------------------------------------------


def _after_crash_reattach(rig: Rig, image: Path, old_loop: str, mnt: Path | None, how: str) -> str:
    """The daemon was killed: loop I/O fails; unmount, then re-attach (via ``how``)."""
    r = dd_read(old_loop, 0, 4096, timeout=30)
    assert r.returncode != 0, "a loop device over a dead FUSE daemon must not return data"
    [row] = rig.listed()
    assert row["State"] == "dead"
    assert rig.info(image)["Attached"] is None
    if mnt is not None and mounted_at(mnt):
        rig.umount(mnt, lazy_fallback=True)
    if how == "detach":
        rig.detach(old_loop)  # detach copes with a dead daemon
        rig.assert_nothing_attached()
    elif how == "manual":
        sh("losetup", "-d", old_loop)
        for mp in rig.fuse_mounts():
            sh("umount", "-l", mp)
    # how == "attach": attach itself cleans up the dead daemon's loop device, mount and entry
    loop = rig.attach(image)
    assert len(rig.entries()) == 1 and rig.entries()[0]["loop"] == loop
    assert len(rig.fuse_mounts()) == 1
    assert [name for name, _ in rig.loops()] == [loop]
    return loop


def _crash_ext4(rig: Rig, rounds: int) -> None:
    image = rig.create(size="128M")
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    log = rig.tmp / "fsynced.log"
    hows = ["attach", "detach", "manual"]
    rng = random.Random(1234)
    for rnd in range(rounds):
        write_files(mnt, f"r{rnd}-pre-", 3, 300_000, log)
        writer = subprocess.Popen([sys.executable, "-c", WRITE_FILES, str(mnt), f"r{rnd}-w-", "-1",
                                   str(rng.choice([64 * 1024, 400_000, 2 * MiB])), str(log)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            start = len(log.read_text().splitlines())
            while len(log.read_text().splitlines()) < start + 2 and time.monotonic() < deadline:
                assert writer.poll() is None, "the writer died before the crash"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            assert writer.poll() is None, "the writer must still be running at the crash"
            rig.kill_daemon(loop)
        finally:
            writer.kill()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the writer is stuck after the daemon was killed")
        loop = _after_crash_reattach(rig, image, loop, mnt, hows[rnd % len(hows)])
        # As after a power cut on a real disk: mounting replays the journal, and then
        # e2fsck -f must find the filesystem clean (no repairs needed).
        rig.umount(rig.mount(loop))
        rig.fsck_clean(loop)
        mnt = rig.mount(loop)
        expected = dict(line.split() for line in log.read_text().splitlines())
        assert len(expected) >= 3 * (rnd + 1) + 2
        assert shas(mnt, sorted(expected)) == expected
        # keep the filesystem from filling up over many rounds: drop this round's writer files
        for name in [n for n in expected if n.startswith(f"r{rnd}-w-")]:
            (mnt / name).unlink()
            del expected[name]
        log.write_text("".join(f"{n} {h}\n" for n, h in expected.items()))
    rig.umount(mnt)
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_kill_9_daemon_under_ext4_writer_keeps_fsynced_files(rig: Rig) -> None:
    _crash_ext4(rig, rounds=3)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="long crash loop; set ENCFS_STRESS=1 to run it "
                                       "(test_kill_9_daemon_under_ext4_writer_keeps_fsynced_files is the bounded version)")
def test_kill_9_daemon_under_ext4_writer_stress(rig: Rig) -> None:
    _crash_ext4(rig, rounds=25)


def _raw_log(log: Path) -> tuple[int, int]:
    lines = log.read_text().split("\n")
    complete = [line for line in lines[:-1] if line]  # the last element is "" or a torn line
    gen, upto = map(int, complete[-1].split())
    return gen, upto


def _allowed_generations(gen: int, upto: int, first_gen: int, n: int, before: list[int]) -> list[set[int]]:
    """What each sector may hold after a crash, given the writer's last log line "gen upto".

    Pass ``gen`` is durable below ``upto``; earlier passes of this round are durable everywhere.
    A sector the writer may have rewritten without an fsync may hold either generation, nothing
    else (``before`` is what the sectors held when the round started).
    """
    out = []
    for s in range(n):
        if upto == n:
            out.append({gen, gen + 1})  # pass gen is complete; pass gen + 1 may have begun
        elif s < upto:
            out.append({gen})
        elif gen > first_gen:
            out.append({gen - 1, gen})
        else:
            out.append({before[s], gen})
    return out


def _crash_raw(rig: Rig, rounds: int) -> None:
    image = rig.create()
    loop = rig.attach(image)
    n = 4096  # 16 MiB of 4 KiB sectors
    dd_write(loop, 0, patterns(0, n, 0), rig.tmp)
    held = [0] * n  # the generation each sector holds (known exactly after each round's check)
    rng = random.Random(99)
    first_gen = 1
    for rnd in range(rounds):
        log = rig.tmp / f"raw-{rnd}.log"
        writer = subprocess.Popen([sys.executable, "-c", RAW_WRITER, loop, str(n), str(first_gen), str(log)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while (not log.exists() or log.read_text().count("\n") < 3) and time.monotonic() < deadline:
                assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            assert writer.poll() is None, "the writer must still be running at the crash"
            rig.kill_daemon(loop)
        finally:
            writer.kill()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the raw writer is stuck after the daemon was killed")
        gen, upto = _raw_log(log)
        allowed = _allowed_generations(gen, upto, first_gen, n, held)
        loop = _after_crash_reattach(rig, image, loop, None, ["attach", "detach"][rnd % 2])
        data = read_ok(loop, 0, n * 4096)  # never an I/O error
        for s in range(n):
            chunk = data[s * 4096:(s + 1) * 4096]
            assert chunk[:8] == b"ENCFSPAT", f"sector {s} holds no pattern at all"
            sector, g = int.from_bytes(chunk[8:16], "big"), int.from_bytes(chunk[16:24], "big")
            assert sector == s, f"sector {s} holds sector {sector}'s data"
            assert chunk == pattern(s, g), f"sector {s} is torn"
            assert g in allowed[s], (f"sector {s} holds generation {g}, not one of {sorted(allowed[s])} "
                                     f"(writer log: pass {gen} fsync'd up to sector {upto})")
            held[s] = g
        first_gen = gen + 2
    rig.detach(loop)


def test_kill_9_daemon_during_raw_o_direct_writes(rig: Rig) -> None:
    _crash_raw(rig, rounds=3)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="long crash loop; set ENCFS_STRESS=1 to run it "
                                       "(test_kill_9_daemon_during_raw_o_direct_writes is the bounded version)")
def test_kill_9_daemon_during_raw_o_direct_writes_stress(rig: Rig) -> None:
    _crash_raw(rig, rounds=30)


# -- 6. fio ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fio() -> str:
    path = shutil.which("fio")
    if path is None:
        r = subprocess.run(["apt-get", "install", "-y", "fio"], check=False, capture_output=True, timeout=300)
        path = shutil.which("fio")
        if path is None:
            pytest.skip(f"fio is not installed and apt-get install fio failed: {r.stderr.decode()[-200:]}")
    return path


def _fio(fio: str, loop: str, cwd: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    common = ["--bs=4k", "--iodepth=16", "--ioengine=libaio", "--direct=1", f"--filename={loop}",
              "--verify=crc32c", "--verify_fatal=1", "--output-format=json"]
    p = subprocess.Popen([fio, *common, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=10)
        raise Stuck("fio timed out") from None
    try:
        result = json.loads(out[out.find(b"{"):])
    except ValueError:
        result = {"jobs": []}
    result["returncode"] = p.returncode
    result["stderr"] = err.decode(errors="replace")
    return result


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


# -- 7. errors -------------------------------------------------------------------------------------


def test_attach_twice_is_refused(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    msg = rig.fails("volume", "attach", image)
    assert "already attached" in msg and loop in msg
    assert len(rig.entries()) == 1 and len(rig.fuse_mounts()) == 1 and len(rig.loops()) == 1
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_one_image_is_served_by_one_daemon_whatever_the_registry(rig: Rig) -> None:
    """A second registry (another ENCFS_RUN_DIR), or a race between two attaches, must not start a
    second daemon on the same image: two sector stores would overwrite each other's maps."""
    image = rig.create()
    loop = rig.attach(image)
    (rig.tmp / "other").mkdir()
    other = Rig(rig.tmp / "other", rig.home)
    try:
        msg = other.fails("volume", "attach", image)
        assert "in use" in msg, msg
        other.assert_nothing_attached()
        assert "in use" in other.fails("volume", "resize", image, "--size", "128M")
        assert rig.info(image)["Size"] == 64 * MiB
    finally:
        other.cleanup()
    [row] = rig.listed()
    assert row["Device"] == loop and row["State"] == "attached"
    rig.detach(loop)
    loop = other.attach(image)  # free again once detached
    other.detach(loop)
    other.assert_nothing_attached()


def test_attach_with_disabled_cmk_fails_cleanly(rig: Rig) -> None:
    home = rig.new_home("vk")
    image = rig.create(home=home, key="vk")
    rig.ok("key", "disable", "vk", home=home)
    msg = rig.fails("volume", "attach", image, home=home)
    assert "disabled" in msg.lower(), msg
    rig.assert_nothing_attached()
    rig.ok("key", "enable", "vk", home=home)
    loop = rig.attach(image, home=home)
    rig.detach(loop)


def test_attach_with_another_expected_key_is_refused_in_one_line(rig: Rig) -> None:
    """--key pins the CMK (as the filesystem pins its own): a volume under another key is refused
    before anything is attached; the right key, by alias or id, attaches."""
    home = rig.new_home("pin")
    image = rig.create(home=home, key="pin")
    other = rig.ok("key", "create", "--alias", "other", home=home).strip()
    key_id = rig.info(image)["KeyId"]
    msg = rig.fails("volume", "attach", image, "--key", "other", home=home)
    assert f"is encrypted under key {key_id}, not other" in msg, msg
    rig.assert_nothing_attached()
    assert f"not {other}" in rig.fails("volume", "info", image, "--key", other, home=home)
    assert rig.fails("volume", "resize", image, "--size", "128M", "--key", "other", home=home)
    assert rig.info(image)["Size"] == 64 * MiB
    loop = rig.attach_with(image, "--key", "pin", home=home)
    rig.detach(loop)
    loop = rig.attach_with(image, "--key", key_id, home=home)
    rig.detach(loop)


def test_attach_truncated_image_fails_cleanly(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 4096, 1), rig.tmp)  # 16 MiB: the image holds them
    rig.detach(loop)
    os.truncate(image, 8 * MiB)
    msg = rig.fails("volume", "attach", image)
    assert "truncated" in msg, msg
    rig.assert_nothing_attached()
    os.truncate(image, 1000)  # not even a header left
    msg = rig.fails("volume", "attach", image)
    assert "not an encfs volume" in msg, msg
    rig.assert_nothing_attached()


def test_attach_with_both_header_copies_damaged_fails(rig: Rig) -> None:
    image = rig.create()
    flip(image, 200)
    flip(image, HEADER_SLOT + 200)
    msg = rig.fails("volume", "attach", image)
    assert "both volume header copies are damaged" in msg, msg
    rig.assert_nothing_attached()
    assert "damaged" in rig.fails("volume", "info", image)


def test_one_damaged_header_copy_still_attaches_with_a_warning(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 16, 7), rig.tmp)
    rig.detach(loop)
    for copy in (0, 1):
        flip(image, copy * HEADER_SLOT + 50)
        info = rig.info(image)
        assert len(info["Warnings"]) == 1 and f"header copy {copy}" in info["Warnings"][0], info
        assert f"header copy {copy}" in rig.ok("volume", "info", image)
        loop = rig.attach(image)
        assert read_ok(loop, 0, 16 * 4096) == patterns(0, 16, 7)
        rig.detach(loop)
        flip(image, copy * HEADER_SLOT + 50)  # undo
        assert rig.info(image)["Warnings"] == []


def test_attach_non_volume_files_fails_cleanly(rig: Rig) -> None:
    junk = rig.tmp / "junk.img"
    junk.write_bytes(os.urandom(2 * MiB))
    assert "not an encfs volume" in rig.fails("volume", "attach", junk)
    empty = rig.tmp / "empty.img"
    empty.write_bytes(b"")
    assert "not an encfs volume" in rig.fails("volume", "attach", empty)
    rig.fails("volume", "attach", rig.tmp / "missing.img")
    rig.fails("volume", "info", junk)
    for cmd in (["attach"], ["info"], ["resize", "--size", "128M"]):
        assert "Is a directory" in rig.fails("volume", *cmd, rig.tmp)
    rig.assert_nothing_attached()


def test_detach_errors(rig: Rig) -> None:
    image = rig.create()
    assert "not an attached encfs volume" in rig.fails("volume", "detach", image)
    assert "not an attached encfs volume" in rig.fails("volume", "detach", "/dev/loop7")
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    (mnt / "f").write_bytes(b"still here")
    msg = rig.fails("volume", "detach", loop)
    assert "in use" in msg and str(mnt) in msg, msg
    assert "in use" in rig.fails("volume", "detach", image)
    assert (mnt / "f").read_bytes() == b"still here"
    [row] = rig.listed()
    assert row["State"] == "attached"
    rig.umount(mnt)
    # open but not mounted: refused too, quickly, instead of killing the daemon under the opener
    with open(loop, "rb") as dev:
        holder = subprocess.Popen(["sleep", "60"], stdin=dev)
    try:
        t0 = time.monotonic()
        msg = rig.fails("volume", "detach", loop)
        assert "in use" in msg and f"pid {holder.pid}" in msg, msg
        assert time.monotonic() - t0 < 20
        assert running(rig.listed()[0]["Pid"])
    finally:
        holder.kill()
        holder.wait(timeout=10)
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_create_refuses_to_overwrite(rig: Rig) -> None:
    existing = rig.tmp / "existing.img"
    existing.write_bytes(b"precious")
    assert "already exists" in rig.fails("volume", "create", existing, "--size", "64M", "--key", "fs")
    assert existing.read_bytes() == b"precious"
    image = rig.create()
    before = sha256(image)
    rig.fails("volume", "create", image, "--size", "64M", "--key", "fs")
    assert sha256(image) == before
    rig.fails("volume", "create", rig.tmp / "bad.img", "--size", "12345", "--key", "fs")
    assert not (rig.tmp / "bad.img").exists()


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


# -- 8. resize -------------------------------------------------------------------------------------


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
