#!/usr/bin/env python3
"""One writer against two writers on two files of one encfs mount (issue #22 part 4).

Usage: .venv/bin/python benchmarks/two_writers.py [--mib 512] [--rounds 3] [--server encfs|pyfuse3]
                                                    [--tree DIR --tree DIR2 ...]

Each round writes ``--mib`` MiB with dd (bs=1M, conv=fsync) into one file, then two dd processes
each write ``--mib`` MiB into a file of their own, started together; the figure is the aggregate
MB/s (all bytes over the wall time from the first start to the last end), with the share of a
core that the daemon and its sealing worker used meanwhile. Rounds alternate the
two on one mount, and the files are removed between them. The mount and its daemon are torn down
by mountpoint and PID, also on errors.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_util  # the harness's commands and mount helpers

MiB = 1 << 20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def writers(d: Path, n: int, mib: int, watched: dict[str, int], direct: bool = False) -> tuple[float, dict[str, float]]:
    """Aggregate MB/s of ``n`` dd processes writing ``mib`` MiB each into files of their own,
    and the share of one core each ``watched`` process (name -> pid) used meanwhile."""
    paths = [d / f"w{i}.bin" for i in range(n)]
    cpu0 = {name: cpu_seconds(pid) for name, pid in watched.items()}
    t0 = time.perf_counter()
    flags = ["oflag=direct"] if direct else []
    procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={p}", "bs=1M", f"count={mib}", "conv=fsync", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for p in paths]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"dd failed: {err.decode(errors='replace').strip()}")
    elapsed = time.perf_counter() - t0
    busy = {name: (cpu_seconds(pid) - cpu0[name]) / elapsed for name, pid in watched.items()}
    for p in paths:
        if p.stat().st_size != mib * MiB:
            raise RuntimeError(f"{p} has {p.stat().st_size} bytes, not {mib * MiB}")
        p.unlink()
    return n * mib * MiB / elapsed / 1e6, busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server", default="encfs")
    ap.add_argument("--direct", action="store_true",
                    help="dd with oflag=direct: each write(2) is a WRITE request from its writer, not "
                         "the page cache's writeback")
    ap.add_argument("--tree", action="append", default=[],
                    help="an encfs source tree to run the daemon from (PYTHONPATH); repeat it to compare "
                         "trees side by side, round by round (default: the installed encfs)")
    args = ap.parse_args()
    trees = args.tree or [""]
    base = Path(tempfile.mkdtemp(prefix="two-writers-"))
    env = dict(os.environ, ENCFS_HOME=str(base / "home"), ENCFS_RUN_DIR=str(base / "run"))
    env.pop("SOFTHSM2_CONF", None)
    mounts: list[tuple[Path, subprocess.Popen[bytes]]] = []
    try:
        bench_util.run([sys.executable, "-m", "encfs", "hsm", "init"], env=env)
        bench_util.run([sys.executable, "-m", "encfs", "key", "create", "--alias", "bench"], env=env)
        for i, tree in enumerate(trees):
            cipher, mnt = base / f"cipher{i}", base / f"plain{i}"
            mnt.mkdir()
            tree_env = dict(env, PYTHONPATH=os.path.abspath(tree)) if tree else env
            bench_util.run([sys.executable, "-m", "encfs", "init", str(cipher), "--key", "bench"], env=tree_env)
            with open(base / f"mount{i}.log", "ab") as lf:
                proc = subprocess.Popen([sys.executable, "-m", "encfs", "mount", "--foreground", "--server",
                                         args.server, str(cipher), str(mnt)],
                                        stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=tree_env)
            mounts.append((mnt, proc))
            bench_util.wait_for(functools.partial(bench_util.is_mounted, mnt), "encfs mount", proc=proc,
                           logfile=base / f"mount{i}.log")
        rates: dict[tuple[int, int], list[float]] = {(i, n): [] for i in range(len(trees)) for n in (1, 2)}
        for r in range(args.rounds):
            for i, (mnt, proc) in enumerate(mounts):
                watched = {"daemon": proc.pid, **{f"sealing worker {pid}": pid for pid in children(proc.pid)}}
                for n in (1, 2):
                    rate, busy = writers(mnt, n, args.mib, watched, args.direct)
                    rates[i, n].append(rate)
                    cores = ", ".join(f"{name} {share:.2f}" for name, share in busy.items())
                    print(f"round {r + 1} {trees[i] or 'encfs'}: {n} writer(s) {rate:.0f} MB/s aggregate "
                          f"(cores busy: {cores})", flush=True)
        for i, tree in enumerate(trees):
            m1, m2 = statistics.median(rates[i, 1]), statistics.median(rates[i, 2])
            print(f"{tree or 'encfs'}: median of {args.rounds}: one writer {m1:.0f} MB/s, two writers "
                  f"{m2:.0f} MB/s ({m2 / m1:.2f} of one)")
    finally:
        for mnt, proc in mounts:
            bench_util.unmount(mnt)
            bench_util.stop_proc(proc)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
