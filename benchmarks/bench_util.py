"""The plumbing of `encfs bench` (bench.py): logging, running commands, and the mounts, loop devices
and daemons that the targets set up and tear down (bench_targets.py).

bench.py loads the harness's modules by path, as its other siblings (benchmarks/ is not a package),
and registers each in sys.modules under its own name, so that they import one another by name.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENCFS_PY = [sys.executable, "-P"]  # -P: `python -m encfs` must not take the working directory's encfs
REPO = HERE.parent  # the encfs checkout the harness measures (bench_targets.encfs_env)
MiB = 1 << 20


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
