"""The harness's fsync probe (benchmarks/bench_durability.py) and what the report makes of it.

The probe runs against two small filesystems served by a shell "daemon": a tmpfs, which holds the
file only in memory and loses it when its mount goes, and a bind mount of a directory, which keeps
it. Real mounts and processes; the peers it is meant for (CryFS, which fails it) are not needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchscripts import load_script, mounted_under

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the probe's test filesystems need mounts (root)")


def _harness() -> ModuleType:
    return load_script("bench")


def _probe_target(bench: ModuleType, ctx: Any, keeps_data: bool, how: str = "serves") -> Any:
    """A target whose daemon mounts a tmpfs (``keeps_data`` False) or binds a directory of its own
    base (True) on the mountpoint and, as ``how`` says, "serves" (runs until that mount goes),
    "detaches" (exits once mounted, as a daemon that forks into the background) or "once" (serves,
    but refuses to start a second time)."""
    target_class = sys.modules["bench_targets"].Target

    class ShellMount(target_class):  # type: ignore[misc, valid-type]
        name = ("bind" if keeps_data else "tmpfs") + "-" + how

        def setup(self) -> Path:
            _base, store, mnt = self.fresh_fs_dirs()
            mount = f"mount --bind {store} {mnt}" if keeps_data else f"mount -t tmpfs -o size=4m probe {mnt}"
            serve = "true" if how == "detaches" else f"while mountpoint -q {mnt}; do sleep 0.05; done"
            once = f"[ -e {store}.started ] && exit 3; touch {store}.started; " if how == "once" else ""
            self.daemon(["sh", "-c", f"{once}{mount} && {serve}"], mnt)
            return mnt

    return ShellMount(ctx)



@needs_root
@pytest.mark.timeout(60)
def test_fsync_probe_tells_a_store_that_keeps_the_file_from_one_that_loses_it(tmp_path: Path) -> None:
    bench = _harness()
    probe = sys.modules["bench_durability"].fsync_probe
    ctx = bench.Context(bench.SCALES["smoke"], tmp_path)
    memory, kept = _probe_target(bench, ctx, False), _probe_target(bench, ctx, True)
    assert probe(memory) == (False, "the file was gone")
    assert probe(kept) == (True, "read back whole")
    assert mounted_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # each base removed
    for target in (memory, kept):
        assert target.procs == [] and target.mounts == []
    refuses = _probe_target(bench, ctx, True, "once")
    assert probe(refuses) == (False, "it would not mount again")
    background = _probe_target(bench, ctx, True, "detaches")
    with pytest.raises(sys.modules["bench_durability"].ProbeInconclusive, match="had exited before the kill"):
        probe(background)
    assert mounted_under(tmp_path) == []


def test_a_target_that_lost_its_fsync_is_no_best_peer_on_the_rows_that_wait_for_one() -> None:
    bench = _harness()
    report = sys.modules["bench_report"]

    def s(median: float) -> dict[str, float]:
        return {"median": median, "min": median, "max": median}

    res = {"encfs": {"small_stat": s(10_000.0), "sqlite": s(300.0), "rand_write_4k": s(9_000.0)},
           "gocryptfs": {"small_stat": s(12_000.0), "sqlite": s(400.0)},
           "cryfs": {"small_stat": s(20_000.0), "sqlite": s(1000.0), "rand_write_4k": s(30_000.0)}}
    ok = {"status": "ok", "kind": "fs", "description": "", "reason": None}
    targets: dict[str, dict[str, Any]] = {t: dict(ok) for t in res}
    targets["encfs"]["fsync_probe"] = {"durable": True, "detail": "read back whole"}
    targets["cryfs"]["fsync_probe"] = {"durable": False, "detail": "the file was gone"}
    targets["gocryptfs"]["fsync_probe"] = {"durable": None, "detail": "no verdict (a slow mount)"}
    lost = report.not_durable(targets)
    assert lost == {"cryfs"}
    assert bench.denominator(res, bench.PEERS, "sqlite", lost) == ("gocryptfs", s(400.0))
    assert bench.denominator(res, bench.PEERS, "small_stat", lost) == ("cryfs", s(20_000.0))  # no fsync there
    assert bench.denominator(res, bench.PEERS, "sqlite") == ("cryfs", s(1000.0))  # no probe: as before
    assert bench.denominator(res, ("cryfs",), "sqlite", lost)[1] is None

    result = {"results": res, "targets": targets, "repeats": 3, "ratios": {},
              "scale": {"name": "full", "snapshot_mib": 16}, "key_service": {},
              "snapshots": {}, "rekey": {}, "keyd": {}, "notes": [], "extra": {}}
    table = bench.markdown(result)
    header = next(line for line in table.splitlines() if line.startswith("| workload |") and "best peer" in line)
    column = header.split(" | ").index("encfs / best peer")
    sqlite = [line for line in table.splitlines() if line.startswith("| SQLite")][-1]  # the ratios
    assert sqlite.split(" | ")[column] == "0.75 (gocryptfs)"
    random_write = [line for line in table.splitlines() if line.startswith("| fio 4 KiB random write")][-1]
    assert random_write.split(" | ")[column] == "n/a"  # its only other measure lost its fsync
    assert "- n/a `encfs / best peer`: where every peer that measured a row lost its fsync'd file" in table
    assert "encfs read back whole" in table and "cryfs **the file was gone**" in table
    assert "gocryptfs no verdict (a slow mount)" in table  # and still the best peer above
    assert "not a \"best peer\" on the rows that wait for fsync (" in table and "`cryfs`" in table
