"""Shared helpers of the encrypted block volume tests (tests/test_volumes*.py and others that attach
volumes): bounded commands, the raw-device sector pattern, the ``Rig`` and its fixture, fio.

Every test gets its own ENCFS_RUN_DIR (registry and private FUSE mounts) under tmp_path and a
``Rig`` that undoes whatever the test set up, also when it fails: ext4 mounts are unmounted,
volumes detached with ``encfs volume detach``, and as a last resort loop devices on FUSE files
under the run dir are detached, private FUSE mounts lazily unmounted and registered daemons
killed; tmpfs mounts go last. Bulk I/O on volumes runs in subprocesses (dd, fio, small Python
scripts) with bounded waits, so a stuck device fails a test instead of hanging the run.

A test module imports the fixtures it uses (``rig``, the session-scoped ``fio``) and ``pytestmark``
(root, /dev/fuse, loop devices and the tools) from here.
"""

from __future__ import annotations

import hashlib
import json
import os
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


# -- images ----------------------------------------------------------------------------------------


def allocated(image: Path) -> int:
    return os.stat(image).st_blocks * 512


def rechecksum(record: bytes | bytearray) -> bytes:
    """A header record (§7.1) with its SHA-256 recomputed: what an attacker without the key can do
    after an edit, and how a test sets a field the code would not write."""
    return bytes(record[:4064]) + hashlib.sha256(bytes(record[:4064])).digest()


def with_flags(record: bytes, flags: int) -> bytes:
    """The header record with its flag byte (byte 5) set to ``flags``, checksum recomputed."""
    return rechecksum(record[:5] + bytes([flags]) + record[6:4064])


def flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# -- fio -------------------------------------------------------------------------------------------


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
