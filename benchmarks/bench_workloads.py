"""The workloads of `encfs bench` (bench.py), run in every target's directory: sequential write and
cold read, two writers, fio random 4 KiB I/O, small files, untar of a generated source tree, SQLite.
Each returns its rates (higher is better) by metric key (bench_report.METRICS). WORKLOADS lists them
in run order.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import sqlite3
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_util import MiB, run

if TYPE_CHECKING:
    from bench import Context


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
