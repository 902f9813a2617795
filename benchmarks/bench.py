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

The harness's modules, beside this file: bench_util.py (commands, mounts, loop devices, daemons),
bench_targets.py (the targets), bench_workloads.py (the workloads run in each target), bench_rows.py
(the rows measured once per repetition: key service, key daemon, snapshots, re-key), bench_durability.py
(the fsync probe: whether a target's fsync survives its daemon's kill), bench_machine.py (the machine
and backing store), bench_report.py (metrics, ratios, results.json/.md, bench.png). This file holds the
scales, a run's context and the run itself (main).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent

# The harness's modules (benchmarks/<name>.py), each after those it imports.
MODULES = ("bench_util", "bench_machine", "bench_report", "bench_targets", "bench_durability", "bench_workloads",
           "bench_rows")


def _module(name: str) -> ModuleType:
    """benchmarks/<name>.py loaded by path, as _sibling below (this file is itself loaded by path, not
    as a package), but once, and registered in sys.modules under its own name: the harness's modules
    import one another by name (`from bench_util import run`), and dataclasses look their module up."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


for _name in MODULES:
    _module(_name)

from bench_durability import ProbeInconclusive, fsync_probe
from bench_machine import (
    NO_REPORTING_ORDER,
    backing_store,
    describe_backing_store,
    free_page_reporting,
    machine,
    refault_memory,
)
from bench_report import (
    KEY_METRICS,
    METRICS,
    PEERS,
    denominator,
    markdown,
    summarize,
    summarize_rows,
    write_results,
)
from bench_rows import key_service, keyd_rows, rekey_rows, snapshot_rows
from bench_targets import ALL_TARGETS, EncfsBaseline, EncfsUringBaseline, EncfsVolumeBaseline, Gocryptfs, encfs_env
from bench_util import ENCFS_PY, Unavailable, log, run
from bench_workloads import WORKLOADS, make_tree_tar

# What callers use: `encfs bench` and this file as a script main, the tests the rest.
__all__ = ["PEERS", "SCALES", "Context", "Gocryptfs", "Scale", "backing_store", "denominator", "free_page_reporting",
           "main", "markdown", "refault_memory"]


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


def _sibling(name: str) -> Any:
    """benchmarks/<name>.py as a module (this file is itself loaded by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"encfs_bench_{name}", HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Context:
    """One run: its scale and working directory, what the workloads share (the source tree), the
    notes and extras for results.json, and the sibling scripts that measure the per-repetition rows."""

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


def probe_fsync(ctx: Context, t: Any, status: dict[str, Any]) -> None:
    """Run the fsync probe (bench_durability.py) on ``t`` and keep its outcome in ``status``
    (durable None: no verdict, and the target counts as a best peer as without the probe)."""
    log(f"fsync probe: {t.name} ...")
    try:
        probe = fsync_probe(t)
    except ProbeInconclusive as e:
        probe = (None, f"no verdict ({e})")
    except Exception as e:  # the repetitions still run; their own set-up reports a broken target
        probe = (None, f"could not run ({type(e).__name__}: {e})")
    if probe is not None:
        status["fsync_probe"] = {"durable": probe[0], "detail": probe[1]}
        log(f"  {probe[1]}")


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
    ap.add_argument("--no-fsync-probe", action="store_true",
                    help="skip the fsync probe (each daemon killed once after an fsync; a target that loses "
                         "the file is no 'best peer' on the rows that wait for fsync)")
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
        [t for t in ALL_TARGETS if t not in (EncfsBaseline, EncfsUringBaseline, EncfsVolumeBaseline) or args.baseline]
    unknown = set(args.targets.split(",")) - {t.name for t in ALL_TARGETS} if args.targets else set()
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.baseline and not {EncfsBaseline, EncfsUringBaseline, EncfsVolumeBaseline} & set(wanted):
        ap.error("--baseline is measured as the target encfs-baseline (or encfs-uring-baseline, "
                 "encfs-volume-baseline): add it to --targets")

    workloads = [w for w in WORKLOADS if not args.workloads or w.__name__[2:] in args.workloads.split(",")]
    unknown = set(args.workloads.split(",")) - {w.__name__[2:] for w in WORKLOADS} if args.workloads else set()
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")

    if args.baseline and not (Path(args.baseline) / "encfs" / "__init__.py").is_file():
        ap.error(f"--baseline {args.baseline}: not an encfs checkout (no encfs/__init__.py)")
    try:
        workdir = Path(tempfile.mkdtemp(prefix="encfs-bench-", dir=args.workdir or "/var/tmp"))
    except OSError as e:
        ap.error(f"--workdir {args.workdir or '/var/tmp'}: {e.strerror}")
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
            run([*ENCFS_PY, "-m", "encfs", "hsm", "init"], env=env)
            run([*ENCFS_PY, "-m", "encfs", "key", "create", "--alias", "bench"], env=env)
        log(f"generating the {scale.tree_entries}-entry source tree ...")
        ctx.tree_entries = make_tree_tar(ctx.tree_tar, scale.tree_entries)
        for t in targets:
            if t.kind == "fs" and status[t.name]["status"] == "ok":
                if args.no_fsync_probe:
                    status[t.name]["fsync_probe"] = {"durable": None, "detail": "not run (--no-fsync-probe)"}
                else:
                    probe_fsync(ctx, t, status[t.name])
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
        "snapshots": summarize_rows(ctx.snapshot_bench, snap_samples),
        "rekey": summarize_rows(ctx.rekey_bench, rekey_samples),
        "keyd": summarize_rows(ctx.keyd_bench, keyd_samples),
        "ratios": {}, "notes": ctx.notes, "extra": ctx.extra,
    }
    write_results(result, out, args.workdir or "/var/tmp")
    return 0 if any(s["status"] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
