"""The targets of `encfs bench` (bench.py): what the workloads run in, each set up fresh and torn down
by mountpoint, loop device and PID: the native directory, encfs and its variants (null cipher, io_uring,
pyfuse3, 32 KiB blocks, a --baseline checkout), encfs volumes, a plain loop device, and the peers
(gocryptfs, securefs, CryFS, LUKS through nbdkit, kernel fscrypt). ALL_TARGETS lists them in run order.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bench_util import (
    ENCFS_PY,
    HERE,
    REPO,
    MiB,
    Unavailable,
    is_mounted,
    lodetach,
    losetup,
    mkfs_ext4,
    run,
    stop_proc,
    unmount,
    wait_for,
)

if TYPE_CHECKING:
    from bench import Context


class DaemonCall(NamedTuple):
    """How a target's daemon was started; remount() starts it so again."""

    cmd: list[str]
    mountpoint: Path
    env: dict[str, str] | None
    stdin: bytes | None
    cwd: Path | None


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
        self.daemon_call: DaemonCall | None = None

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
        self.daemon_call = DaemonCall(cmd, mountpoint, env, stdin, cwd)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        wait_for(lambda: is_mounted(mountpoint), f"{self.name} mount", proc=proc, logfile=logfile)
        return proc

    def remount(self) -> Path:
        """The last daemon started again, over the store it served (its mount gone: the fsync probe,
        bench_durability.py)."""
        assert self.daemon_call is not None
        call = self.daemon_call
        self.daemon(call.cmd, call.mountpoint, env=call.env, stdin=call.stdin, cwd=call.cwd)
        return call.mountpoint

    def ext4_on(self, dev: str, mnt: Path, *mkfs_extra: str) -> Path:
        mkfs_ext4(dev, *mkfs_extra)
        mnt.mkdir()
        run(["mount", dev, str(mnt)])
        self.mounts.append(mnt)
        return mnt


def encfs_env(ctx: Context) -> dict[str, str]:
    """The environment of every encfs process the harness starts: its home and run directory, and
    this harness's checkout first on the path (run it with ENCFS_PY: the working directory, which
    `-m` would put first, stays off), whatever encfs the interpreter has installed."""
    env = dict(os.environ, ENCFS_HOME=str(ctx.encfs_home), ENCFS_RUN_DIR=str(ctx.workdir / "run"),
               PYTHONPATH=str(REPO))
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
    python: list[str] = ENCFS_PY  # how `encfs init` runs
    launcher: list[str] = [*python, "-m", "encfs", "mount", "--foreground"]
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

    def check(self) -> None:
        if self.ctx.baseline is None:  # a DIR that is no encfs checkout: bench.py refuses it first
            raise Unavailable("no --baseline DIR given")

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

    def env(self) -> dict[str, str]:
        return encfs_env(self.ctx)

    def cwd(self) -> Path | None:
        return None

    def setup(self) -> Path:
        _image, dev = self.attach(self.ctx.scale.volume_mib)
        assert self.base is not None
        return self.ext4_on(dev, self.base / "mnt")

    def attach(self, mib: int) -> tuple[Path, str]:
        """A fresh volume of ``mib`` MiB, attached: (image, loop device)."""
        base = self.fresh()
        env, cwd = self.env(), self.cwd()
        self.image = base / "vol.img"
        run([*ENCFS_PY, "-m", "encfs", "volume", "create", str(self.image), "--size",
             f"{mib}M", "--key", "bench", *self.create_extra], env=env, cwd=cwd)
        self.attached = True
        dev = run([*ENCFS_PY, "-m", "encfs", "volume", "attach", str(self.image)], env=env,
                  cwd=cwd).stdout.decode().strip()
        return self.image, dev

    def _teardown_extra(self) -> None:
        if getattr(self, "attached", False):
            self.attached = False
            proc = run([*ENCFS_PY, "-m", "encfs", "volume", "detach", str(self.image)],
                       env=self.env(), cwd=self.cwd(), check=False, timeout=120)
            if proc.returncode != 0 and b"is not an attached" not in proc.stderr:  # detached already
                raise RuntimeError(f"encfs volume detach: {proc.stderr.decode(errors='replace').strip()}")


class EncfsVolumeV1(EncfsVolume):
    name = "encfs-volume-v1"
    description = "ext4 on an encfs volume of format 1 (`encfs volume create --format 1`: two-slot sectors)"
    create_extra = ["--format", "1"]


class EncfsVolumeBaseline(EncfsVolume):
    """The volume as the --baseline checkout serves it (see EncfsBaseline)."""
    name = "encfs-volume-baseline"
    description = "ext4 on an encfs volume of format 2 served by the checkout given with --baseline"

    def check(self) -> None:
        if self.ctx.baseline is None:
            raise Unavailable("no --baseline DIR given")

    env = EncfsBaseline.env
    cwd = EncfsBaseline.cwd


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


ALL_TARGETS = [Native, EncfsNull, EncfsFuse, EncfsAwake, EncfsUring, EncfsBaseline, EncfsUringBaseline, EncfsFuse32k, EncfsNull32k, EncfsPyfuse3Null, EncfsPyfuse3, EncfsVolume, EncfsVolumeBaseline, EncfsVolumeV1, EncfsVolumeNull,
               EncfsVolumeNullV1, LoopPlain, Gocryptfs, Securefs, Cryfs, LuksNbdkit, Fscrypt]

