"""The rows of `encfs bench` (bench.py) that are measured once per repetition rather than per target:
the key service (keys_bench.py), the key daemon (keyd_bench.py), snapshots (snapshot_bench.py) and
re-key and fsck (rekey_bench.py), each given the volumes or filesystems it needs from bench_targets.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tarfile
from typing import TYPE_CHECKING

from bench_report import KEY_METRICS
from bench_targets import EncfsFuse, EncfsVolume, encfs_env
from bench_util import HERE, REPO, log, run, stop_proc, unmount

if TYPE_CHECKING:
    from bench import Context


def key_service(ctx: Context) -> dict[str, float]:
    """Data keys generated and decrypted per second (benchmarks/keys_bench.py, 1 thread, 1 repetition)."""
    out = ctx.workdir / "keys.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("SOFTHSM2_CONF", None)
    run([sys.executable, str(HERE / "keys_bench.py"), "--seconds", f"{ctx.scale.key_seconds:g}",
         "--threads", "1", "--repeats", "1", "--json", str(out)], env=env, timeout=300)
    res = json.loads(out.read_text())["results"]
    return {r["operation"]: r["median"] for r in res if r["operation"] in KEY_METRICS}


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
