#!/usr/bin/env python3
"""encfs benchmark harness: encfs side by side with the native directory, a null cipher and peers.

Usage:
    .venv/bin/encfs bench [--quick | --scale smoke] [--repeats N] [--targets a,b] [--out DIR]
    .venv/bin/python benchmarks/bench.py ...      (the same)

Installs nothing. Peers (gocryptfs, securefs, CryFS, nbdkit+nbdfuse LUKS) are used only when their
binaries exist; fscrypt is driven through the kernel ioctls directly. Needs root (loop devices,
mounts, drop_caches). Every mount, loop device and daemon it starts is torn down by mountpoint, device
and PID, also on errors. All metrics are rates (higher is better); each cell is the median of the
repetitions, with min and max. Targets are interleaved: repetition 1 runs every target, then
repetition 2, and so on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import mmap
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 1 << 20


# -- scales -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    name: str
    seq_mib: int
    fio_mib: int
    fio_seconds: float
    small_files: int
    tree_entries: int
    sqlite_tx: int
    key_seconds: float
    repeats: int
    volume_mib: int
    snapshot_mib: int  # the snapshot rows' volume (filled to a quarter, then in full)


SCALES = {
    "full": Scale("full", 1024, 512, 20, 10_000, 10_000, 1000, 2.0, 3, 3072, 1024),
    "quick": Scale("quick", 64, 32, 2, 300, 300, 60, 0.5, 1, 512, 256),
    "smoke": Scale("smoke", 8, 8, 1, 50, 50, 10, 0.2, 1, 256, 16),
}

# metric key -> (label, unit)
METRICS = {
    "seq_write": ("sequential write + fsync", "MB/s"),
    "seq_read_cold": ("sequential read, cold cache", "MB/s"),
    "two_writers": ("two writers, two files, + fsync (aggregate)", "MB/s"),
    "rand_read_4k": ("fio 4 KiB random read, QD16", "IOPS"),
    "rand_write_4k": ("fio 4 KiB random write, QD16", "IOPS"),
    "small_create": ("small files: create+write (+sync)", "files/s"),
    "small_stat": ("small files: stat, cold", "files/s"),
    "small_read": ("small files: read, cold", "files/s"),
    "small_delete": ("small files: delete (+sync)", "files/s"),
    "untar": ("untar source tree (+sync)", "entries/s"),
    "sqlite": ("SQLite insert+commit", "tx/s"),
}
KEY_METRICS = {
    "generate_data_key": ("key service: GenerateDataKey", "ops/s"),
    "decrypt": ("key service: Decrypt data key", "ops/s"),
}

# The filesystem peers (issue #25's goal: every row at least the best of them, per row).
PEERS = ("gocryptfs", "securefs", "cryfs")

RATIOS: list[tuple[str, str, str | tuple[str, ...]]] = [  # (label, numerator, denominator: a target or
    # the best of several on each row)
    ("encfs / null cipher", "encfs", "encfs-null"),
    ("pyfuse3 server / encfs server", "encfs-pyfuse3", "encfs"),
    ("pyfuse3 server / encfs server, null cipher", "encfs-pyfuse3-null", "encfs-null"),
    ("encfs / gocryptfs", "encfs", "gocryptfs"),
    ("encfs / best peer", "encfs", PEERS),
    ("encfs / baseline checkout", "encfs", "encfs-baseline"),
    ("encfs over io_uring / encfs", "encfs-uring", "encfs"),
    ("encfs over io_uring / gocryptfs", "encfs-uring", "gocryptfs"),
    ("encfs over io_uring / its baseline checkout", "encfs-uring", "encfs-uring-baseline"),
    ("encfs --keep-cpu-awake / encfs", "encfs-awake", "encfs"),
    ("encfs --keep-cpu-awake / gocryptfs", "encfs-awake", "gocryptfs"),
    ("encfs 32 KiB blocks / encfs", "encfs-32k", "encfs"),
    ("encfs 32 KiB blocks / its null cipher", "encfs-32k", "encfs-null-32k"),
    ("encfs volume / null-cipher volume", "encfs-volume", "encfs-volume-null"),
    ("volume format 2 / format 1", "encfs-volume", "encfs-volume-v1"),
    ("format-1 volume / its null cipher", "encfs-volume-v1", "encfs-volume-null-v1"),
    ("encfs volume / plain loop", "encfs-volume", "loop-plain"),
    ("encfs volume / userspace LUKS", "encfs-volume", "luks-nbdkit"),
]


def denominator(results: dict[str, dict[str, Any]], b: str | tuple[str, ...], key: str
                ) -> tuple[str, dict[str, Any] | None]:
    """A ratio's denominator on one row: the target ``b``, or the one of ``b`` with the highest
    median there (name, summary); the summary is None if no such target measured the row."""
    names = (b,) if isinstance(b, str) else b
    measured = [(results[t][key]["median"], t) for t in names if results.get(t, {}).get(key)]
    if not measured:
        return names[0], None
    best = max(measured)[1]
    return best, results[best][key]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A target cannot run here; the message says why."""


def run(cmd: list[str], *, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
        input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, input=input, cwd=cwd)
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}): {' / '.join(tail)}")
    return proc


def is_mounted(path: Path) -> bool:
    from encfs.fuseproto.mounting import topmost_mount

    return topmost_mount(path) is not None


def wait_for(cond, what: str, timeout: float = 60, proc: subprocess.Popen | None = None,
             logfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-600:] if logfile and logfile.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}: {tail.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def unmount(path: Path) -> None:
    """fusermount3 -u / umount, then the lazy variant as a last resort; bounded."""
    if not is_mounted(path):
        return
    for cmd in (["umount", str(path)], ["fusermount3", "-u", str(path)]):
        subprocess.run(cmd, capture_output=True, timeout=60)
        if not is_mounted(path):
            return
    for cmd in (["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
        subprocess.run(cmd, capture_output=True, timeout=60)
        if not is_mounted(path):
            return


def stop_proc(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def losetup(image: Path, sector: int = 4096, direct_io: bool = False) -> str:
    """Attach a loop device with the queue settings `encfs volume attach` gives its own (read-ahead,
    largest request): a loop device otherwise keeps whatever its number was last given, which
    depends on what ran before."""
    from encfs.block.attach import tune_loop

    dio = ["--direct-io=on"] if direct_io else []
    dev = run(["losetup", "--find", "--show", "--sector-size", str(sector), *dio, str(image)]).stdout.decode().strip()
    tune_loop(dev)
    return dev


def lodetach(dev: str | None) -> None:
    if dev:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def mkfs_ext4(dev: str, *extra: str) -> None:
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", *extra, dev], timeout=300)


# -- targets ----------------------------------------------------------------------------------------

class Target:
    """Something to run the workloads in: setup() returns the directory, teardown() undoes it all."""

    name = "?"
    kind = "fs"  # or "volume"
    description = ""
    program = ""  # a peer's command: the target is unavailable without it on PATH

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.base: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []  # unmounted in reverse order
        self.loops: list[str] = []

    def check(self) -> None:
        """Raise Unavailable(reason) if this target cannot run here."""
        if self.program and not shutil.which(self.program):
            raise Unavailable(f"{self.program} not installed")

    def setup(self) -> Path:
        raise NotImplementedError

    def teardown(self) -> None:
        errors = []
        for m in reversed(self.mounts):
            try:
                unmount(m)
            except Exception as e:  # keep tearing down
                errors.append(f"unmount {m}: {e}")
        for dev in reversed(self.loops):
            lodetach(dev)
        self._teardown_extra()
        for p in reversed(self.procs):
            try:
                stop_proc(p)
            except Exception as e:
                errors.append(f"pid {p.pid}: {e}")
        for m in self.mounts:
            if is_mounted(m):
                errors.append(f"{m} is still mounted")
        self.mounts, self.loops, self.procs = [], [], []
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        if errors:
            raise RuntimeError("; ".join(errors))

    def _teardown_extra(self) -> None:
        pass

    def fresh(self) -> Path:
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.ctx.workdir))
        return self.base

    def fresh_fs_dirs(self) -> tuple[Path, Path, Path]:
        """A fresh base with an empty ``cipher`` and ``plain`` (the mountpoint) below it."""
        base = self.fresh()
        cipher, mnt = base / "cipher", base / "plain"
        cipher.mkdir()
        mnt.mkdir()
        return base, cipher, mnt

    def daemon(self, cmd: list[str], mountpoint: Path, *, env: dict[str, str] | None = None,
               stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.Popen:
        assert self.base is not None
        logfile = self.base / f"{self.name}.log"
        with open(logfile, "ab") as lf:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=lf, stderr=lf, env=env, start_new_session=True, cwd=cwd)
        self.procs.append(proc)
        self.mounts.append(mountpoint)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        wait_for(lambda: is_mounted(mountpoint), f"{self.name} mount", proc=proc, logfile=logfile)
        return proc

    def ext4_on(self, dev: str, mnt: Path, *mkfs_extra: str) -> Path:
        mkfs_ext4(dev, *mkfs_extra)
        mnt.mkdir()
        run(["mount", dev, str(mnt)])
        self.mounts.append(mnt)
        return mnt


def encfs_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ, ENCFS_HOME=str(ctx.encfs_home), ENCFS_RUN_DIR=str(ctx.workdir / "run"))
    env.pop("SOFTHSM2_CONF", None)
    return env


class Native(Target):
    name = "native"
    description = "the backing directory itself (no FUSE)"

    def setup(self) -> Path:
        d = self.fresh() / "data"
        d.mkdir()
        return d


class EncfsFuse(Target):
    name = "encfs"
    description = "encfs FUSE mount (AES-256-GCM per 4 KiB block, the default)"
    python: list[str] = [sys.executable]  # how `encfs init` runs
    launcher: list[str] = [sys.executable, "-m", "encfs", "mount", "--foreground"]
    init_extra: list[str] = []

    def setup(self) -> Path:
        base = self.fresh()
        cipher, mnt = base / "cipher", base / "plain"
        mnt.mkdir()
        env, cwd = self.env(), self.cwd()
        run([*self.python, "-m", "encfs", "init", str(cipher), "--key", "bench", *self.init_extra], env=env, cwd=cwd)
        self.daemon([*self.launcher, str(cipher), str(mnt)], mnt, env=env, cwd=cwd)
        return mnt

    def env(self) -> dict[str, str]:
        return encfs_env(self.ctx)

    def cwd(self) -> Path | None:
        return None


class EncfsBaseline(EncfsFuse):
    """encfs as another checkout serves it (``--baseline DIR``), to measure a change before and
    after in one run, interleaved, rather than across two runs on a noisy VM."""
    name = "encfs-baseline"
    description = "encfs FUSE mount served by the checkout given with --baseline (e.g. a git worktree)"
    python = [sys.executable, "-P"]  # -P: not the cwd's encfs
    launcher = [*python, "-m", "encfs", "mount", "--foreground"]

    def check(self) -> None:
        if self.ctx.baseline is None:
            raise Unavailable("no --baseline DIR given")
        if not (self.ctx.baseline / "encfs" / "__init__.py").is_file():
            raise Unavailable(f"{self.ctx.baseline} is not an encfs checkout")

    def env(self) -> dict[str, str]:
        assert self.ctx.baseline is not None
        return dict(encfs_env(self.ctx), PYTHONPATH=str(self.ctx.baseline))

    def cwd(self) -> Path | None:
        return self.ctx.baseline  # an older checkout starts its sealing worker without -P


class EncfsFuse32k(EncfsFuse):
    name = "encfs-32k"
    description = "encfs FUSE mount of a filesystem made with `encfs init --block-size 32768` (the default before 2026-12-06)"
    init_extra = ["--block-size", "32768"]


def require_io_uring() -> None:
    from encfs.fuseproto import uring

    if not uring.supported():
        raise Unavailable(f"FUSE over io_uring is off ({uring.ENABLE_PARAMETER} is not Y) or not x86-64")


class EncfsUring(EncfsFuse):
    name = "encfs-uring"
    description = "encfs FUSE mount served over FUSE io_uring queues (`encfs mount --io-uring`)"
    launcher = [*EncfsFuse.launcher, "--io-uring"]

    def check(self) -> None:
        require_io_uring()


class EncfsAwake(EncfsFuse):
    name = "encfs-awake"
    description = "encfs FUSE mount with its keep-awake helper (`encfs mount --keep-cpu-awake`)"
    launcher = [*EncfsFuse.launcher, "--keep-cpu-awake"]


class EncfsUringBaseline(EncfsBaseline):
    """The --baseline checkout over io_uring: the before of a change to the io_uring server."""
    name = "encfs-uring-baseline"
    description = "encfs-baseline served over FUSE io_uring queues (`encfs mount --io-uring`)"
    launcher = [*EncfsBaseline.launcher, "--io-uring"]

    def check(self) -> None:
        super().check()
        assert self.ctx.baseline is not None
        if not (self.ctx.baseline / "encfs" / "fuseproto" / "uring.py").is_file():
            raise Unavailable(f"{self.ctx.baseline} predates `encfs mount --io-uring`")
        require_io_uring()


class EncfsNull(EncfsFuse):
    name = "encfs-null"
    description = "the same encfs FUSE path with the content cipher replaced by a null cipher (benchmark only)"
    launcher = [sys.executable, str(HERE / "null_mount.py")]


def _check_pyfuse3() -> None:
    import importlib.util

    missing = [p for p in ("pyfuse3", "trio") if importlib.util.find_spec(p) is None]
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)}")


class EncfsNull32k(EncfsNull):
    name = "encfs-null-32k"
    description = "encfs-null on a filesystem of 32 KiB blocks (benchmark only)"
    init_extra = EncfsFuse32k.init_extra


class EncfsPyfuse3(EncfsFuse):
    name = "encfs-pyfuse3"
    description = "encfs FUSE mount served through pyfuse3 on trio (`encfs mount --server pyfuse3`)"
    launcher = [*EncfsFuse.launcher, "--server", "pyfuse3"]

    def check(self) -> None:
        _check_pyfuse3()


class EncfsPyfuse3Null(EncfsPyfuse3):
    name = "encfs-pyfuse3-null"
    description = "encfs-null served through pyfuse3 on trio (benchmark only)"
    launcher = [sys.executable, str(HERE / "null_mount.py"), "--server", "pyfuse3"]


class EncfsVolume(Target):
    name = "encfs-volume"
    kind = "volume"
    description = ("ext4 on an encfs volume of format 2, the default (copy-on-write; raw /dev/fuse server + "
                   "loop device)")
    create_extra: list[str] = []

    def setup(self) -> Path:
        _image, dev = self.attach(self.ctx.scale.volume_mib)
        assert self.base is not None
        return self.ext4_on(dev, self.base / "mnt")

    def attach(self, mib: int) -> tuple[Path, str]:
        """A fresh volume of ``mib`` MiB, attached: (image, loop device)."""
        base = self.fresh()
        env = encfs_env(self.ctx)
        self.image = base / "vol.img"
        run([sys.executable, "-m", "encfs", "volume", "create", str(self.image), "--size",
             f"{mib}M", "--key", "bench", *self.create_extra], env=env)
        self.attached = True
        dev = run([sys.executable, "-m", "encfs", "volume", "attach", str(self.image)], env=env).stdout.decode().strip()
        return self.image, dev

    def _teardown_extra(self) -> None:
        if getattr(self, "attached", False):
            self.attached = False
            proc = run([sys.executable, "-m", "encfs", "volume", "detach", str(self.image)],
                       env=encfs_env(self.ctx), check=False, timeout=120)
            if proc.returncode != 0 and b"is not an attached" not in proc.stderr:  # detached already
                raise RuntimeError(f"encfs volume detach: {proc.stderr.decode(errors='replace').strip()}")


class EncfsVolumeV1(EncfsVolume):
    name = "encfs-volume-v1"
    description = "ext4 on an encfs volume of format 1 (`encfs volume create --format 1`: two-slot sectors)"
    create_extra = ["--format", "1"]


class EncfsVolumeNull(Target):
    name = "encfs-volume-null"
    kind = "volume"
    description = ("ext4 on the same volume server and loop setup, format 2, with the sector cipher replaced "
                   "by a null cipher (benchmarks/null_volume.py; benchmark only)")
    volume_format = 2

    def setup(self) -> Path:
        base = self.fresh()
        fuse_mnt = base / "fuse"
        fuse_mnt.mkdir()
        self.daemon([sys.executable, str(HERE / "null_volume.py"), str(base / "vol.img"), str(fuse_mnt),
                     str(self.ctx.scale.volume_mib), str(self.volume_format)], fuse_mnt, env=encfs_env(self.ctx))
        # The FUSE mount can go only after the loop device lets go of its file: _teardown_extra.
        self.mounts.remove(fuse_mnt)
        self.fuse_mnt = fuse_mnt
        dev = losetup(fuse_mnt / "volume", direct_io=True)  # as `encfs volume attach` does
        self.loops.append(dev)
        return self.ext4_on(dev, base / "mnt")

    def _teardown_extra(self) -> None:
        mnt = getattr(self, "fuse_mnt", None)
        if mnt is not None:
            self.fuse_mnt = None
            unmount(mnt)


class EncfsVolumeNullV1(EncfsVolumeNull):
    name = "encfs-volume-null-v1"
    description = "the null-cipher volume in format 1 (benchmarks/null_volume.py; benchmark only)"
    volume_format = 1


class LoopPlain(Target):
    name = "loop-plain"
    kind = "volume"
    description = "ext4 on a loop device over a plain image file (no encryption)"

    def setup(self) -> Path:
        base = self.fresh()
        img = base / "plain.img"
        with open(img, "wb") as f:
            f.truncate(self.ctx.scale.volume_mib * MiB)
        dev = losetup(img)
        self.loops.append(dev)
        return self.ext4_on(dev, base / "mnt")


class Gocryptfs(Target):
    name = "gocryptfs"
    program = "gocryptfs"
    description = "gocryptfs (Go, FUSE, AES-256-GCM)"

    def setup(self) -> Path:
        base, cipher, mnt = self.fresh_fs_dirs()
        pw = base / "pw"
        pw.write_text("benchmark\n")
        run(["gocryptfs", "-init", "-q", "-passfile", str(pw), "-scryptn", "10", str(cipher)])
        self.daemon(["gocryptfs", "-fg", "-q", "-passfile", str(pw), str(cipher), str(mnt)], mnt)
        return mnt


class Securefs(Target):
    name = "securefs"
    program = "securefs"
    description = "securefs (C++, FUSE)"

    def setup(self) -> Path:
        _base, cipher, mnt = self.fresh_fs_dirs()
        run(["securefs", "create", "--pass", "benchmark", "--rounds", "1", str(cipher)])
        self.daemon(["securefs", "mount", "--pass", "benchmark", str(cipher), str(mnt)], mnt)
        return mnt


class Cryfs(Target):
    name = "cryfs"
    program = "cryfs"
    description = "CryFS (C++, FUSE, fixed-size encrypted blocks)"

    def setup(self) -> Path:
        base, cipher, mnt = self.fresh_fs_dirs()
        env = dict(os.environ, CRYFS_FRONTEND="noninteractive", CRYFS_NO_UPDATE_CHECK="true",
                   CRYFS_LOCAL_STATE_DIR=str(base / "state"))
        self.daemon(["cryfs", "-f", "--cipher", "aes-256-gcm", str(cipher), str(mnt)], mnt, env=env,
                    stdin=b"benchmark\n")
        return mnt


class LuksNbdkit(Target):
    name = "luks-nbdkit"
    kind = "volume"
    description = "ext4 on LUKS1 (cryptsetup image) via nbdkit luks filter + nbdfuse + loop"

    def check(self) -> None:
        missing = [b for b in ("nbdkit", "nbdfuse", "cryptsetup") if not shutil.which(b)]
        if missing:
            raise Unavailable(f"not installed: {', '.join(missing)}")
        plugdir = run(["nbdkit", "--dump-config"], check=False).stdout.decode()
        fdir = next((ln.split("=", 1)[1] for ln in plugdir.splitlines() if ln.startswith("filterdir=")), "")
        if fdir and not Path(fdir, "nbdkit-luks-filter.so").exists():
            raise Unavailable("nbdkit luks filter not installed")

    def setup(self) -> Path:
        base = self.fresh()
        img, keyf, fusedir = base / "luks.img", base / "key", base / "nbd"
        with open(img, "wb") as f:
            f.truncate(self.ctx.scale.volume_mib * MiB)
        keyf.write_bytes(b"benchmark")
        run(["cryptsetup", "luksFormat", "-q", "--type", "luks1", "--cipher", "aes-xts-plain64",
             "--key-size", "512", "--hash", "sha256", "--pbkdf-force-iterations", "1000",
             "--key-file", str(keyf), str(img)], timeout=300)
        fusedir.mkdir()
        self.daemon(["nbdfuse", str(fusedir), "--command", "nbdkit", "-s", "--exit-with-parent",
                     "--filter=luks", "file", str(img), "passphrase=benchmark"], fusedir)
        dev = losetup(fusedir / "nbd")
        self.loops.append(dev)
        return self.ext4_on(dev, base / "mnt")


# fscrypt v2 through the kernel ioctls (include/uapi/linux/fscrypt.h)
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_CTS = 1, 4


class Fscrypt(Target):
    name = "fscrypt"
    kind = "volume"
    description = "kernel fscrypt (v2 policy, AES-256-XTS) on ext4 on a plain loop image"

    def check(self) -> None:
        if not Path("/sys/fs/ext4/features/encryption").exists():
            raise Unavailable("kernel ext4 has no encryption support")

    def setup(self) -> Path:
        base = self.fresh()
        img = base / "fscrypt.img"
        with open(img, "wb") as f:
            f.truncate(self.ctx.scale.volume_mib * MiB)
        dev = losetup(img)
        self.loops.append(dev)
        mnt = self.ext4_on(dev, base / "mnt", "-O", "encrypt")
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            raw = os.urandom(64)
            arg = bytearray(struct.pack("<II32sII32x", FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER, 0, b"", len(raw), 0) + raw)
            fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
            ident = bytes(arg[8:24])
            data = mnt / "data"
            data.mkdir()
            dfd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
            try:
                policy = struct.pack("<BBBB4x16s", 2, FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_CTS, 2, ident)
                fcntl.ioctl(dfd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
            finally:
                os.close(dfd)
        except OSError as e:
            raise Unavailable(f"fscrypt ioctls failed: {e}") from None
        finally:
            os.close(fd)
        return data


ALL_TARGETS = [Native, EncfsNull, EncfsFuse, EncfsAwake, EncfsUring, EncfsBaseline, EncfsUringBaseline, EncfsFuse32k, EncfsNull32k, EncfsPyfuse3Null, EncfsPyfuse3, EncfsVolume, EncfsVolumeV1, EncfsVolumeNull,
               EncfsVolumeNullV1, LoopPlain, Gocryptfs, Securefs, Cryfs, LuksNbdkit, Fscrypt]


# -- workloads --------------------------------------------------------------------------------------

def drop_caches(ctx: Context) -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        ctx.note(f"caches not dropped ({e}): cold reads may be warm")


def write_fsync(path: Path, buf: bytes, count: int) -> None:
    """``count`` writes of ``buf`` into a new ``path``, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(count):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def w_seq(ctx: Context, d: Path) -> dict[str, float]:
    n = ctx.scale.seq_mib
    buf = os.urandom(MiB)
    path = d / "seq.bin"
    t0 = time.perf_counter()
    write_fsync(path, buf, n)
    wt = time.perf_counter() - t0
    drop_caches(ctx)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while chunk := os.read(fd, MiB):
            total += len(chunk)
    finally:
        os.close(fd)
    rt = time.perf_counter() - t0
    if total != n * MiB:
        raise RuntimeError(f"read back {total} bytes, wrote {n * MiB}")
    os.unlink(path)
    return {"seq_write": n * MiB / wt / 1e6, "seq_read_cold": n * MiB / rt / 1e6}


def w_two_writers(ctx: Context, d: Path) -> dict[str, float]:
    """Two threads each write a file of their own (1 MiB writes, then fsync) at once: the
    aggregate rate, to set against seq_write's one writer (issue #22 part 4)."""
    n = ctx.scale.fio_mib
    buf = os.urandom(MiB)
    paths = [d / "two-1.bin", d / "two-2.bin"]
    errors: list[OSError] = []

    def write(path: Path) -> None:
        try:
            write_fsync(path, buf, n)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in paths]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    for p in paths:
        if p.stat().st_size != n * MiB:
            raise RuntimeError(f"{p.name} has {p.stat().st_size} bytes, wrote {n * MiB}")
        p.unlink()
    return {"two_writers": 2 * n * MiB / elapsed / 1e6}


def direct_ok(d: Path) -> bool:
    p = d / ".direct-probe"
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = ctypes.create_string_buffer(8192)
        addr = (ctypes.addressof(buf) + 4095) & ~4095
        mv = memoryview((ctypes.c_char * 4096).from_address(addr)).cast("B")
        os.pwrite(fd, mv, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        p.unlink(missing_ok=True)


def w_fio(ctx: Context, d: Path) -> dict[str, float]:
    if not shutil.which("fio"):
        ctx.note("fio not installed: random 4 KiB I/O skipped")
        return {}
    direct = direct_ok(d)
    ctx.extra.setdefault("fio_direct", {})[ctx.current] = direct
    out: dict[str, float] = {}
    fname = d / "fio.bin"
    common = ["fio", "--name=bench", f"--filename={fname}", f"--size={ctx.scale.fio_mib}M", "--bs=4k",
              "--ioengine=libaio", "--iodepth=16", f"--direct={int(direct)}", "--time_based",
              f"--runtime={ctx.scale.fio_seconds:g}", "--randrepeat=1", "--output-format=json"]
    # lay out the file once (written sequentially by fio), then read, then write
    run(["fio", "--name=layout", f"--filename={fname}", f"--size={ctx.scale.fio_mib}M", "--bs=1M",
         "--rw=write", "--end_fsync=1", "--output-format=json"], timeout=600)
    for key, rw, side in (("rand_read_4k", "randread", "read"), ("rand_write_4k", "randwrite", "write")):
        drop_caches(ctx)
        extra = ["--end_fsync=1"] if rw == "randwrite" else []
        proc = run([*common, f"--rw={rw}", *extra], timeout=600, check=False)
        if proc.returncode != 0 and direct and b"O_DIRECT" in proc.stderr + proc.stdout:
            # the open(O_DIRECT) probe passed but fio's own check did not (securefs): go buffered
            direct = False
            ctx.extra["fio_direct"][ctx.current] = False
            common = [c if not c.startswith("--direct=") else "--direct=0" for c in common]
            proc = run([*common, f"--rw={rw}", *extra], timeout=600)
        elif proc.returncode != 0:
            run([*common, f"--rw={rw}", *extra], timeout=600)  # raises with fio's message
        text = proc.stdout.decode()
        data = json.loads(text[text.index("{"):])
        out[key] = float(data["jobs"][0][side]["iops"])
    fname.unlink(missing_ok=True)
    return out


def w_small(ctx: Context, d: Path) -> dict[str, float]:
    n = ctx.scale.small_files
    root = d / "small"
    root.mkdir()
    buf = os.urandom(4096)
    names = [root / f"f{i:05d}" for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    os.sync()
    t_create = time.perf_counter() - t0
    drop_caches(ctx)
    t0 = time.perf_counter()
    for p in names:
        os.stat(p)
    t_stat = time.perf_counter() - t0
    drop_caches(ctx)
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_RDONLY)
        if len(os.read(fd, 8192)) != 4096:
            raise RuntimeError(f"{p}: short read")
        os.close(fd)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    os.sync()
    t_del = time.perf_counter() - t0
    root.rmdir()
    return {"small_create": n / t_create, "small_stat": n / t_stat, "small_read": n / t_read,
            "small_delete": n / t_del}


def make_tree_tar(path: Path, entries: int) -> int:
    """A deterministic source-like tree: about 1 directory per 12 files, sizes from a fixed-seed RNG."""
    rng = random.Random(5)
    count = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        dirs = ["src"]
        info = tarfile.TarInfo("src")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(info)
        count += 1
        while count < entries:
            if rng.random() < 0.08 or len(dirs) == 1:
                name = f"{rng.choice(dirs)}/d{count}"
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(info)
                dirs.append(name)
            else:
                size = min(int(rng.lognormvariate(8.5, 1.3)), 2 * MiB)
                info = tarfile.TarInfo(f"{rng.choice(dirs)}/f{count}.c")
                info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
                tar.addfile(info, _Reader(rng.randbytes(size)))
            count += 1
    return count


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return out


def w_untar(ctx: Context, d: Path) -> dict[str, float]:
    dest = d / "tree"
    dest.mkdir()
    t0 = time.perf_counter()
    run(["tar", "-xf", str(ctx.tree_tar), "-C", str(dest)], timeout=1800)
    os.sync()
    t = time.perf_counter() - t0
    shutil.rmtree(dest)
    return {"untar": ctx.tree_entries / t}


def w_sqlite(ctx: Context, d: Path) -> dict[str, float]:
    n = ctx.scale.sqlite_tx
    path = d / "bench.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
        payload = os.urandom(200)
        t0 = time.perf_counter()
        for i in range(n):
            con.execute("BEGIN")
            con.executemany("INSERT INTO t (k, v) VALUES (?, ?)", [(f"key-{i}-{j}", payload) for j in range(10)])
            con.execute("COMMIT")
        t = time.perf_counter() - t0
    finally:
        con.close()
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return {"sqlite": n / t}


WORKLOADS = [w_seq, w_two_writers, w_fio, w_small, w_untar, w_sqlite]


def key_service(ctx: Context) -> dict[str, float]:
    """Data keys generated and decrypted per second (benchmarks/keys_bench.py, 1 thread, 1 repetition)."""
    out = ctx.workdir / "keys.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("SOFTHSM2_CONF", None)
    run([sys.executable, str(HERE / "keys_bench.py"), "--seconds", f"{ctx.scale.key_seconds:g}",
         "--threads", "1", "--repeats", "1", "--json", str(out)], env=env, timeout=300)
    res = json.loads(out.read_text())["results"]
    return {r["operation"]: r["median"] for r in res if r["operation"] in KEY_METRICS}


def _sibling(name: str) -> Any:
    """benchmarks/<name>.py as a module (this file is itself loaded by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"encfs_bench_{name}", HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot_rows(ctx: Context) -> dict[str, float]:
    """Snapshot create times and export/import rates (benchmarks/snapshot_bench.py), 1 repetition."""
    @contextlib.contextmanager
    def volume(mib: int):  # type: ignore[no-untyped-def]
        vol = EncfsVolume(ctx)
        try:
            yield vol.attach(mib)
        finally:
            vol.teardown()

    return ctx.snapshot_bench.measure(ctx.scale.snapshot_mib, volume, ctx.workdir / "run", encfs_env(ctx), ctx.note)


def keyd_rows(ctx: Context) -> dict[str, float]:
    """GenerateDataKey and Decrypt through `encfs keyd` at 1, 16 and 256 clients beside the
    in-process rate, measured in the same repetition (benchmarks/keyd_bench.py)."""
    return ctx.keyd_bench.rows(ctx.scale.key_seconds, [1, 16, 256], lambda m: log(f"  {m} ..."))


def _rows(module: Any, samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """A sibling module's samples, summarized and labelled, in its order."""
    return {k: dict(summarize(v), label=module.label(k)[0], unit=module.label(k)[1])
            for k, v in sorted(samples.items(), key=lambda kv: module.order(kv[0]))}


def rekey_rows(ctx: Context) -> dict[str, float]:
    """Re-wrap, full re-key and fsck rates (benchmarks/rekey_bench.py), 1 repetition."""
    @contextlib.contextmanager
    def volume(mib: int):  # type: ignore[no-untyped-def]
        vol = EncfsVolume(ctx)
        try:
            image, dev = vol.attach(mib)
            rate = ctx.snapshot_bench.fill(dev, mib)
            vol._teardown_extra()  # detached: re-keys and checks refuse an attached volume
            yield image, rate
        finally:
            vol.teardown()

    @contextlib.contextmanager
    def filesystem():  # type: ignore[no-untyped-def]
        fs = EncfsFuse(ctx)
        try:
            mnt = fs.setup()
            with tarfile.open(ctx.tree_tar) as tar:
                tar.extractall(mnt, filter="tar")
            unmount(mnt)
            fs.mounts.remove(mnt)
            for proc in fs.procs:
                stop_proc(proc)
            fs.procs = []
            assert fs.base is not None
            yield fs.base / "cipher", ctx.tree_entries
        finally:
            fs.teardown()

    return ctx.rekey_bench.measure(ctx.scale.snapshot_mib, volume, filesystem, encfs_env(ctx), ctx.note)


# -- the run ----------------------------------------------------------------------------------------

class Context:
    def __init__(self, scale: Scale, workdir: Path) -> None:
        self.scale = scale
        self.workdir = workdir
        self.baseline: Path | None = None  # --baseline: another checkout, served as encfs-baseline
        self.encfs_home = workdir / "encfs-home"
        self.tree_tar = workdir / "tree.tar"
        self.tree_entries = 0
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.current = ""
        self.snapshot_bench = _sibling("snapshot_bench")
        self.rekey_bench = _sibling("rekey_bench")
        self.keyd_bench = _sibling("keyd_bench")

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            log(f"note: {msg}")


# A page order above x86-64's largest free block (MAX_PAGE_ORDER, 10): nothing is reported.
NO_REPORTING_ORDER = 11
_VIRTIO_BALLOON = "0x0005"
_VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting(sys_root: Path = Path("/sys")) -> str | None:
    """Whether the guest hands freed pages back to the hypervisor: "on (order N)", "off (order N)",
    or None when no virtio balloon with free page reporting exists (bare metal, most VMs).

    When on, every drop_caches frees gigabytes that the host then reclaims; the reads that
    fill them again take host page faults. Measured on this project's VM: a 1 GiB cold read
    during a reporting pass ran at 675 MB/s against 1,209 without one, and alternate cold reads
    were slow (773-1,305 MB/s); with reporting off, 24 cold reads of four volumes fell within 985-1,295."""
    reporting = False
    for dev in sorted((sys_root / "bus/virtio/devices").glob("*")):
        try:
            kind = (dev / "device").read_text().strip()
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if kind == _VIRTIO_BALLOON and features[_VIRTIO_BALLOON_F_REPORTING:_VIRTIO_BALLOON_F_REPORTING + 1] == "1":
            reporting = True
    if not reporting:
        return None
    try:
        order = int((sys_root / "module/page_reporting/parameters/page_reporting_order").read_text())
    except (OSError, ValueError):
        return "on"
    return f"{'off' if order >= NO_REPORTING_ORDER else 'on'} (order {order})"


def refault_memory(margin: int | None = None) -> tuple[float, int]:
    """Touch the free RAM once but ``margin`` (default: a quarter of the RAM, at least 1 GiB, so
    that other processes' allocations meanwhile do not wake the OOM killer), then free it;
    returns the seconds taken and the bytes touched.

    Pages the guest reported free are gone from the host until touched again, and the first run
    that fills the page cache pays the host's faults: measured here, the first 1 GiB sequential
    write after a reporting pass ran at 231 MB/s, the next at 755; after touching all free RAM
    (67 s when all of it had been reported), 710 and 718. Touching 6 GiB was not enough (585):
    the page cache does not take the freed pages first. With reporting off, the pages touched
    here stay backed for the timed runs."""
    info = {}
    with open("/proc/meminfo") as f:
        for ln in f:
            name, value = ln.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
    if margin is None:
        margin = max(1 << 30, info.get("MemTotal", 0) // 4)
    size = (info.get("MemFree", 0) - margin) // MiB * MiB
    if size <= 0:
        return 0.0, 0
    t0 = time.perf_counter()
    chunk = bytes(64 * MiB)
    with mmap.mmap(-1, size) as m:
        for off in range(0, size, len(chunk)):
            m[off:off + min(len(chunk), size - off)] = chunk[:min(len(chunk), size - off)]
    return time.perf_counter() - t0, size


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        mem = next((ln.split(":", 1)[1].strip() for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), "")
    except OSError:
        pass
    disk = subprocess.run(["lsblk", "-d", "-o", "NAME,SIZE,ROTA,MODEL,TYPE"], capture_output=True, text=True).stdout
    versions = {}
    for tool, args in (("fio", ["--version"]), ("gocryptfs", ["-version"]), ("securefs", ["version"]),
                       ("cryfs", ["--version"]), ("nbdkit", ["--version"]), ("nbdfuse", ["--version"]),
                       ("cryptsetup", ["--version"])):
        if shutil.which(tool):
            p = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, CRYFS_NO_UPDATE_CHECK="true"))
            versions[tool] = ((p.stdout or p.stderr).strip().splitlines() or [""])[0]
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory": mem, "kernel": platform.release(),
            "platform": platform.platform(), "python": platform.python_version(), "disks": disk.strip(),
            "tools": versions, "free_page_reporting": free_page_reporting()}


def backing_store(path: Path, proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> dict[str, Any]:
    """The filesystem under ``path``: its type, device and, for ext4, whether it has a journal
    (None when unknown). An ext4 without a journal makes a new inode skip every inode freed in the
    last 60-360 s, checking each one (fs/ext4/ialloc.c, recently_deleted): measured on this
    project's VM, one create in a directory after 2,000 deletes took 90-190 us against 4 without
    them, so each target's small-file creates depend on how many files the targets before it
    deleted (benchmarks/README.md)."""
    from encfs.fuseproto.mounting import mount_table

    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        fstype, source = next(((m.fstype, m.source) for m in mount_table(proc / "self/mountinfo") if m.device == dev),
                              ("", ""))
    except OSError:
        fstype, source = "", ""
    journal = None
    # jbd2 names a journal by the kernel's name of the device ("dm-0-8", "loop0-8"), which the mount
    # source need not be (/dev/mapper/vg-root, /dev/root); a "/" in it is written "!".
    kernel_name = (sys_root / "dev/block" / dev).resolve().name if (sys_root / "dev/block" / dev).exists() else ""
    if fstype == "ext4" and kernel_name and (proc / "fs/jbd2").is_dir():
        journal = any(p.name.rsplit("-", 1)[0].replace("!", "/") == kernel_name
                      for p in (proc / "fs/jbd2").iterdir())
    return {"fstype": fstype, "source": source, "journal": journal}


def describe_backing_store(store: dict[str, Any]) -> str:
    journal = {True: ", with a journal", False: ", WITHOUT a journal", None: ""}[store["journal"]]
    return f"{store['fstype'] or 'unknown'} on {store['source'] or 'unknown'}{journal}"


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def markdown(result: dict[str, Any]) -> str:
    names = [t for t in result["targets"] if result["targets"][t]["status"] == "ok"]
    res = result["results"]
    lines = [f"Median of {result['repeats']} repetition(s) (min-max below the median); all rates, higher is better. "
             f"Scale `{result['scale']['name']}`.", ""]
    lines.append("| workload | unit | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---:|" * len(names))
    for key, (label, unit) in METRICS.items():
        cells = []
        for t in names:
            s = res.get(t, {}).get(key)
            cells.append(f"{fmt(s['median'])}<br><sub>{fmt(s['min'])}-{fmt(s['max'])}</sub>" if s else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    ks = result.get("key_service") or {}
    for key, (label, unit) in KEY_METRICS.items():
        if key in ks:
            s = ks[key]
            lines.append(f"| {label} (not per target) | {unit} | {fmt(s['median'])} "
                         f"<sub>{fmt(s['min'])}-{fmt(s['max'])}</sub> |" + " |" * (len(names) - 1))
    lines += ["", "Ratios of medians (1.00 = as fast; below 1 = slower):", ""]
    lines.append("| workload | " + " | ".join(r[0] for r in RATIOS) + " |")
    lines.append("|---|" + "---:|" * len(RATIOS))
    reasons = {}
    for key, (label, _unit) in METRICS.items():
        cells = []
        for rlabel, a, b in RATIOS:
            bname, sb = denominator(res, b, key)
            sa = res.get(a, {}).get(key)
            if sa and sb and sb["median"] > 0:
                cells.append(f"{sa['median'] / sb['median']:.2f}" + ("" if isinstance(b, str) else f" ({bname})"))
            else:
                missing = next((t for t in (a, bname) if not res.get(t, {}).get(key)), bname)
                reasons[missing] = (result["targets"].get(missing, {}).get("reason")
                                    or ("no numbers for rows whose workload did not run or gave none "
                                        "(--workloads, or see the notes)"
                                        if res.get(missing) else "not selected (--targets)"))
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if reasons:
        lines += [""] + [f"- n/a `{t}`: {r}" for t, r in reasons.items()]
    mib = result["scale"]["snapshot_mib"]
    for key, intro in (("snapshots", f"Snapshots of a format-2 volume of {mib} MiB (no filesystem; "
                                     "benchmarks/snapshot_bench.py)"),
                       ("rekey", f"Re-key and check of a format-2 volume of {mib} MiB and of a CIPHERDIR "
                                 "holding the source tree (benchmarks/rekey_bench.py)"),
                       ("keyd", "The key daemon (`encfs keyd`, a fresh embedded token) beside the key service in "
                                "process, in the same repetition (benchmarks/keyd_bench.py; #24's goal: a ratio of "
                                "at least 0.5 at 16 clients)")):
        rows = result.get(key) or {}
        if rows:
            how = ("rates in operations per second and their ratios, higher is better" if key == "keyd"
                   else "times in seconds, lower is better")
            lines += ["", f"{intro}, median of the repetitions (min-max); {how}:", "",
                      "| measure | unit | median | min-max |", "|---|---|---:|---:|"]
            for s in rows.values():
                f = (lambda v: f"{v:.3f}") if s["unit"] in ("s", "ratio") else fmt
                lines.append(f"| {s['label']} | {s['unit']} | {f(s['median'])} | {f(s['min'])}-{f(s['max'])} |")
    other = [(t, v) for t, v in result["targets"].items() if v["status"] != "ok"]
    if other:
        lines += ["", "Targets not measured: " + "; ".join(f"`{t}` ({v['reason']})" for t, v in other)]
    fd = result.get("extra", {}).get("fio_direct")
    if fd:
        lines += ["", "fio O_DIRECT: " + ", ".join(f"{t} {'yes' if v else 'no (buffered)'}" for t, v in fd.items())]
    if result["notes"]:
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def charts(result: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed: no PNG charts (pip install 'encfs[bench]' or matplotlib)")
        return []
    names = [t for t in result["targets"] if result["targets"][t]["status"] == "ok"]
    keys = [k for k in METRICS if any(k in result["results"].get(t, {}) for t in names)]
    cols = 2
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(names)}
    for ax, key in zip(axes.flat, keys):
        label, unit = METRICS[key]
        xs, med, lo, hi, cs = [], [], [], [], []
        for t in names:
            s = result["results"].get(t, {}).get(key)
            if s:
                xs.append(t)
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
                cs.append(colors[t])
        ax.barh(xs, med, xerr=[lo, hi], color=cs, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{label} ({unit})", fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"encfs bench ({result['scale']['name']}, median of {result['repeats']}, "
                 f"bars = min-max), higher is better", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "bench.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [str(path)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="encfs bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (smoke check, < 2 min)")
    ap.add_argument("--scale", choices=sorted(SCALES), help="workload sizes (default full; --quick = quick)")
    ap.add_argument("--repeats", type=int, help="repetitions (default 3 for full, 1 otherwise)")
    ap.add_argument("--targets", help="comma-separated subset of: " + ",".join(t.name for t in ALL_TARGETS))
    ap.add_argument("--workloads", help="comma-separated subset of: " + ",".join(w.__name__[2:] for w in WORKLOADS))
    ap.add_argument("--no-keys", action="store_true", help="skip the key-service and key-daemon measurements")
    ap.add_argument("--no-snapshots", action="store_true",
                    help="skip the snapshot rows (run with the encfs-volume target otherwise)")
    ap.add_argument("--no-rekey", action="store_true",
                    help="skip the re-key and fsck rows (run with the encfs-volume target otherwise)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another encfs checkout (e.g. `git worktree add /tmp/base REV`), measured as the "
                         "target encfs-baseline beside encfs in the same run (and, over io_uring, as "
                         "encfs-uring-baseline beside encfs-uring; without --targets both run)")
    ap.add_argument("--workdir", help="where backing stores and images go (default: a temp dir in /var/tmp)")
    ap.add_argument("--out", help="output directory (default: benchmarks/results/<UTC time> for a full run, "
                                  "/tmp/encfs-bench-<UTC time>-<scale> otherwise)")
    ap.add_argument("--list", action="store_true", help="list targets and whether they can run, then exit")
    args = ap.parse_args(argv)
    scale = SCALES[args.scale or ("quick" if args.quick else "full")]
    repeats = args.repeats or scale.repeats
    if repeats < 1:
        ap.error("--repeats must be positive")
    if scale.name == "full" and repeats < 3:
        ap.error("a full run needs at least 3 repetitions")
    wanted = [t for t in ALL_TARGETS if t.name in args.targets.split(",")] if args.targets else \
        [t for t in ALL_TARGETS if t not in (EncfsBaseline, EncfsUringBaseline) or args.baseline]
    unknown = set(args.targets.split(",")) - {t.name for t in ALL_TARGETS} if args.targets else set()
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.baseline and EncfsBaseline not in wanted and EncfsUringBaseline not in wanted:
        ap.error("--baseline is measured as the target encfs-baseline (or encfs-uring-baseline): add it to --targets")

    workloads = [w for w in WORKLOADS if not args.workloads or w.__name__[2:] in args.workloads.split(",")]
    unknown = set(args.workloads.split(",")) - {w.__name__[2:] for w in WORKLOADS} if args.workloads else set()
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")

    workdir = Path(tempfile.mkdtemp(prefix="encfs-bench-", dir=args.workdir or "/var/tmp"))
    ctx = Context(scale, workdir)
    ctx.baseline = Path(args.baseline).resolve() if args.baseline else None
    targets = [cls(ctx) for cls in wanted]
    status: dict[str, dict[str, Any]] = {}
    for t in targets:
        try:
            if os.geteuid() != 0:
                raise Unavailable("needs root (mounts, loop devices, drop_caches)")
            t.check()
            status[t.name] = {"status": "ok", "kind": t.kind, "description": t.description, "reason": None}
        except Unavailable as e:
            status[t.name] = {"status": "unavailable", "kind": t.kind, "description": t.description,
                              "reason": str(e)}
    if args.list:
        for name, s in status.items():
            print(f"{name:20} {s['status']:12} {s['reason'] or s['description']}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 0

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    if args.out:
        out = Path(args.out)
    elif scale.name == "full":
        out = HERE / "results" / stamp  # full runs are kept with the repository
    else:
        out = Path(tempfile.gettempdir()) / f"encfs-bench-{stamp}-{scale.name}"
    out.mkdir(parents=True, exist_ok=True)
    store = backing_store(workdir)
    if store["journal"] is False:
        ctx.note(f"the backing store ({describe_backing_store(store)}) has no journal: ext4 then scans the "
                 "inodes freed in the last minutes at every create, so small-file creates and untar depend "
                 "on what the targets before deleted; give --workdir a journaled filesystem "
                 "(benchmarks/README.md)")
    reporting = free_page_reporting()
    if reporting and reporting.startswith("on"):
        ctx.note("free page reporting is on: cold-cache reads vary by up to 2x as the host reclaims and "
                 "refaults the page cache; for steadier numbers run with "
                 f"`echo {NO_REPORTING_ORDER} > /sys/module/page_reporting/parameters/page_reporting_order` "
                 "and restore the old value afterwards")
    if reporting and reporting.startswith("off") and scale.name == "full":
        log("touching free memory once (pages the host took back are slow to refill) ...")
        log(f"  {refault_memory()[0]:.1f} s")
    started = time.perf_counter()
    samples: dict[str, dict[str, list[float]]] = {}
    key_samples: dict[str, list[float]] = {}
    snap_samples: dict[str, list[float]] = {}
    snapshots = not args.no_snapshots and status.get("encfs-volume", {}).get("status") == "ok"
    rekey_samples: dict[str, list[float]] = {}
    keyd_samples: dict[str, list[float]] = {}
    rekeys = not args.no_rekey and status.get("encfs-volume", {}).get("status") == "ok"
    try:
        if any(status[t.name]["status"] == "ok" and t.name.startswith("encfs") for t in targets):
            env = encfs_env(ctx)
            run([sys.executable, "-m", "encfs", "hsm", "init"], env=env)
            run([sys.executable, "-m", "encfs", "key", "create", "--alias", "bench"], env=env)
        log(f"generating the {scale.tree_entries}-entry source tree ...")
        ctx.tree_entries = make_tree_tar(ctx.tree_tar, scale.tree_entries)
        for rep in range(1, repeats + 1):
            for t in targets:
                if status[t.name]["status"] != "ok":
                    continue
                ctx.current = t.name
                log(f"[rep {rep}/{repeats}] {t.name} ...")
                try:
                    d = t.setup()
                    for w in workloads:
                        for k, v in w(ctx, d).items():
                            samples.setdefault(t.name, {}).setdefault(k, []).append(v)
                except Unavailable as e:
                    status[t.name].update(status="unavailable", reason=str(e))
                except Exception as e:
                    status[t.name].update(status="failed", reason=f"{type(e).__name__}: {e}")
                    log(f"  {t.name} failed: {e}")
                finally:
                    try:
                        t.teardown()
                    except Exception as e:
                        ctx.note(f"{t.name}: teardown: {e}")
            for wanted, what, rows, section in ((snapshots, "snapshot", snapshot_rows, snap_samples),
                                                (rekeys, "re-key", rekey_rows, rekey_samples),
                                                (not args.no_keys, "key service", key_service, key_samples),
                                                (not args.no_keys, "key daemon", keyd_rows, keyd_samples)):
                if not wanted:
                    continue
                log(f"[rep {rep}/{repeats}] {what} rows ...")
                try:
                    for k, v in rows(ctx).items():
                        section.setdefault(k, []).append(v)
                except Exception as e:
                    ctx.note(f"{what} benchmark failed: {type(e).__name__}: {e}")
    except BaseException:
        with contextlib.suppress(OSError):
            out.rmdir()  # an interrupted run leaves no empty results directory (rmdir: only if empty)
        raise
    finally:
        for t in targets:
            try:
                t.teardown()
            except Exception as e:
                log(f"warning: {t.name} teardown: {e}")
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": scale.__dict__, "repeats": repeats, "seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine(), "backing_store": store}, "targets": status,
        "metrics": {k: {"label": v[0], "unit": v[1]} for k, v in {**METRICS, **KEY_METRICS}.items()},
        "results": {t: {k: summarize(v) for k, v in m.items()} for t, m in samples.items()},
        "key_service": {k: summarize(v) for k, v in key_samples.items()},
        "snapshots": _rows(ctx.snapshot_bench, snap_samples),
        "rekey": _rows(ctx.rekey_bench, rekey_samples),
        "keyd": _rows(ctx.keyd_bench, keyd_samples),
        "ratios": {}, "notes": ctx.notes, "extra": ctx.extra,
    }
    for label, a, b in RATIOS:
        for key in METRICS:
            sa, sb = result["results"].get(a, {}).get(key), denominator(result["results"], b, key)[1]
            result["ratios"].setdefault(label, {})[key] = (sa["median"] / sb["median"]) if sa and sb else None
    table = markdown(result)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    (out / "results.md").write_text(
        f"# encfs bench, {result['date']}\n\nMachine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} RAM, "
        f"kernel {m['kernel']}, Python {m['python']}; backing store in {args.workdir or '/var/tmp'} "
        f"({describe_backing_store(store)}); "
        f"free page reporting to the hypervisor: {m['free_page_reporting'] or 'none'}.\n\n"
        f"```\n{m['disks']}\n```\n\nTools: " + ", ".join(f"{k}: {v}" for k, v in m["tools"].items())
        + f"\n\nWall time: {result['seconds']} s.\n\n{table}\n")
    pngs = charts(result, out)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in pngs))
    return 0 if any(s["status"] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
