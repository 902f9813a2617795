"""Smoke test of the benchmark harness (benchmarks/bench.py): structure, not speed.

Runs the smallest scale against the native directory and an encfs FUSE mount only, through
`encfs bench`, and checks that the JSON and markdown outputs are complete and every number is
positive. It asserts nothing about timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchscripts import load_script, mounted_under

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="the harness needs root and /dev/fuse")


def _harness() -> ModuleType:
    return load_script("bench")


def _sysfs(root: Path, devices: dict[str, tuple[str, str]], order: str | None) -> Path:
    for name, (kind, features) in devices.items():
        d = root / "bus/virtio/devices" / name
        d.mkdir(parents=True)
        (d / "device").write_text(kind + "\n")
        (d / "features").write_text(features + "\n")
    if order is not None:
        params = root / "module/page_reporting/parameters"
        params.mkdir(parents=True)
        (params / "page_reporting_order").write_text(order + "\n")
    return root


def test_free_page_reporting_state(tmp_path: Path) -> None:
    """Read from a sysfs layout like this VM's: a balloon with feature bit 5 (free page reporting)."""
    detect = _harness().free_page_reporting
    reporting, no_reporting = "0110010100" + "0" * 54, "0110000100" + "0" * 54
    assert detect(_sysfs(tmp_path / "a", {"virtio0": ("0x0005", reporting), "virtio1": ("0x0002", reporting)},
                         "9")) == "on (order 9)"
    assert detect(_sysfs(tmp_path / "b", {"virtio0": ("0x0005", reporting)}, "11")) == "off (order 11)"
    assert detect(_sysfs(tmp_path / "c", {"virtio0": ("0x0005", no_reporting)}, "9")) is None
    # bit 5 set on a device that is not a balloon (virtio-blk) reports nothing
    assert detect(_sysfs(tmp_path / "d", {"virtio1": ("0x0002", reporting)}, "9")) is None
    assert detect(tmp_path / "empty") is None


@pytest.mark.skipif(os.geteuid() != 0 or any(shutil.which(t) is None for t in ("losetup", "mkfs.ext4", "mount")),
                    reason="needs root, losetup, mkfs.ext4 and mount")
def test_backing_store_tells_an_ext4_without_a_journal(tmp_path: Path) -> None:
    """Real ext4 images on loop devices, one made without a journal (as this VM's root filesystem):
    the harness finds each one's journal, or its lack, from /proc."""
    store = _harness().backing_store
    found = {}
    for name, features in (("journaled", []), ("plain", ["-O", "^has_journal"])):
        image, mnt = tmp_path / f"{name}.img", tmp_path / name
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
        mnt.mkdir()
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            subprocess.run(["mount", dev, str(mnt)], check=True)
            try:
                (mnt / "d").mkdir()
                found[name] = store(mnt / "d")
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", dev], check=True)
    assert found["journaled"]["fstype"] == "ext4" and found["journaled"]["journal"] is True
    assert found["journaled"]["source"].startswith("/dev/loop")
    assert found["plain"]["fstype"] == "ext4" and found["plain"]["journal"] is False
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "bench-test", str(tmpfs)], check=True)
    try:
        assert store(tmpfs) == {"fstype": "tmpfs", "source": "bench-test", "journal": None}
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_refault_memory_touches_the_free_memory_it_is_asked_to() -> None:
    """The warm-up before a run with page reporting off: every page of the span is written once
    (its peak resident size grows by that much), leaving ``margin`` of free memory untouched. The
    span is what was free at the call less the margin: tests running beside this one change the
    free memory between the two readings, so the span is checked against what the call reports."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench\n"
            "free = next(int(ln.split()[1]) * 1024 for ln in open('/proc/meminfo') if ln.startswith('MemFree:'))\n"
            "before = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "_s, touched = bench.refault_memory(margin=free - (256 << 20))\n"
            "after = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "print((after - before) // 1024, touched >> 20)\n"
            "print(bench.refault_memory(margin=free * 2)[1])\n")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent.parent / "benchmarks")], capture_output=True, text=True,
                         check=True).stdout.split()
    resident, touched = int(out[0]), int(out[1])
    assert 64 <= touched <= 1024, out  # about the 256 MiB asked for, give or take the tests beside it
    assert touched - 24 <= resident <= touched + 24, out  # every page of the span written once
    assert out[2] == "0", out  # nothing to touch once the margin is all that is free


@pytest.mark.parametrize("arg", ["--workdir", "--baseline"])
def test_a_missing_directory_is_one_line_and_exit_2(tmp_path: Path, arg: str) -> None:
    missing = tmp_path / "missing"
    extra = ["--targets", "encfs,encfs-baseline"] if arg == "--baseline" else []
    proc = subprocess.run([sys.executable, "-m", "encfs", "bench", "--scale", "smoke", arg, str(missing), *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"error: {arg} {missing}: " + ("No such file or directory" if arg == "--workdir"
                                       else "not an encfs checkout (no encfs/__init__.py)"))


@needs_root
@pytest.mark.timeout(120)
def test_bench_smoke(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.run([sys.executable, "-m", "encfs", "bench", "--scale", "smoke", "--targets", "native,encfs",
                           "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mounted_under(tmp_path) == []
    assert list(work.iterdir()) == []  # the harness removed its working directory

    result = json.loads((out / "results.json").read_text())
    assert result["scale"]["name"] == "smoke" and result["repeats"] == 1
    assert set(result["targets"]) == {"native", "encfs"}
    assert all(t["status"] == "ok" for t in result["targets"].values()), result["targets"]
    # encfs's fsync survives its daemon's SIGKILL; the native directory has no daemon to kill
    assert result["targets"]["encfs"]["fsync_probe"] == {"durable": True, "detail": "read back whole"}
    assert "fsync_probe" not in result["targets"]["native"]
    expected = {"seq_write", "seq_read_cold", "two_writers", "small_create", "small_stat", "small_read", "small_delete",
                "untar", "sqlite"}
    import shutil
    if shutil.which("fio"):
        expected |= {"rand_read_4k", "rand_write_4k"}
    for target in ("native", "encfs"):
        metrics = result["results"][target]
        assert expected <= set(metrics), (target, sorted(metrics))
        for name, s in metrics.items():
            assert s["samples"] and all(v > 0 for v in s["samples"]), (target, name, s)
            assert s["min"] <= s["median"] <= s["max"]
    for name in ("generate_data_key", "decrypt"):
        assert result["key_service"][name]["median"] > 0
        for n in (1, 16, 256):  # the key daemon beside the key service in process
            assert result["keyd"][f"{name}_keyd_{n}"]["median"] > 0
            assert result["keyd"][f"{name}_ratio_{n}"]["median"] > 0
    for label in ("encfs / null cipher", "encfs / gocryptfs", "encfs volume / plain loop",
                  "encfs volume / userspace LUKS"):
        assert label in result["ratios"]
    assert result["ratios"]["encfs / null cipher"]["seq_write"] is None  # null target not selected
    assert result["machine"]["cpus"] and result["machine"]["kernel"]
    assert result["machine"]["free_page_reporting"] == _harness().free_page_reporting()

    table = (out / "results.md").read_text()
    assert "| workload | unit | native | encfs |" in table
    assert "n/a" in table and "encfs / null cipher" in table
    assert "| workload |" in proc.stdout
    assert "free page reporting to the hypervisor: " in table


@needs_root
@pytest.mark.timeout(180)
def test_bench_volumes_and_snapshots_smoke(tmp_path: Path) -> None:
    """Both volume formats beside their null-cipher volumes, and the snapshot rows."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    targets = ["encfs-volume", "encfs-volume-v1", "encfs-volume-null", "encfs-volume-null-v1"]
    proc = subprocess.run([sys.executable, "-m", "encfs", "bench", "--scale", "smoke", "--targets", ",".join(targets),
                           "--no-keys", "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mounted_under(tmp_path) == []
    assert list(work.iterdir()) == []

    result = json.loads((out / "results.json").read_text())
    assert {t: s["status"] for t, s in result["targets"].items()} == dict.fromkeys(targets, "ok"), result["targets"]
    for label in ("encfs volume / null-cipher volume", "volume format 2 / format 1",
                  "format-1 volume / its null cipher"):
        assert result["ratios"][label]["seq_write"] > 0, label

    snaps = result["snapshots"]
    quarter, full = result["scale"]["snapshot_mib"] // 4, result["scale"]["snapshot_mib"]
    for name in ("fill", "create_cli", "create_reported", "create_detached", "create_daemon", "list"):
        for fill in (quarter, full):
            s = snaps[f"{name}_{fill}"]
            assert s["samples"] and all(v > 0 for v in s["samples"]), (name, fill, s)
            assert s["unit"] in ("s", "MB/s") and f"{fill} MiB" in s["label"]
    assert snaps[f"create_daemon_{full}"]["median"] < snaps[f"create_cli_{full}"]["median"]
    assert not any("snapshot benchmark failed" in n for n in result["notes"]), result["notes"]
    rekey = result["rekey"]
    for name in ("fill", "rewrap_volume", "full_volume", "fsck_volume"):  # per volume size
        s = rekey[f"{name}_{full}"]
        assert s["samples"] and all(v > 0 for v in s["samples"]), (name, s)
    assert [k for k in rekey if k.startswith("rewrap_fs_") and rekey[k]["median"] > 0], rekey  # a CIPHERDIR too
    assert not any("re-key benchmark failed" in n or "rows skipped" in n for n in result["notes"]), result["notes"]
    table = (out / "results.md").read_text()
    assert "| `encfs snapshot create` (whole command), " in table
    assert "| `encfs rekey VOL --full` (every sector re-encrypted), " in table


@needs_root
@pytest.mark.timeout(120)
def test_bench_pyfuse3_targets_smoke(tmp_path: Path) -> None:
    """The second server's targets run and fill their ratio columns against our server's."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    targets = ["encfs-null", "encfs-pyfuse3-null"]
    proc = subprocess.run([sys.executable, "-m", "encfs", "bench", "--scale", "smoke", "--targets", ",".join(targets),
                           "--no-keys", "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mounted_under(tmp_path) == []
    result = json.loads((out / "results.json").read_text())
    assert {t: s["status"] for t, s in result["targets"].items()} == dict.fromkeys(targets, "ok"), result["targets"]
    ratios = result["ratios"]["pyfuse3 server / encfs server, null cipher"]
    assert ratios["seq_write"] is not None and ratios["seq_write"] > 0, ratios
    assert "encfs-pyfuse3" in proc.stdout


def test_best_peer_ratio_takes_each_rows_fastest_peer() -> None:
    bench = _harness()
    def s(median: float) -> dict[str, float]:
        return {"median": median, "min": median, "max": median}

    res = {"encfs": {"small_create": s(3000.0), "sqlite": s(300.0)},
           "gocryptfs": {"small_create": s(2000.0), "sqlite": s(400.0)},
           "securefs": {"small_create": s(4000.0)},
           "cryfs": {"sqlite": s(1000.0)}}
    assert bench.denominator(res, bench.PEERS, "small_create") == ("securefs", s(4000.0))
    assert bench.denominator(res, bench.PEERS, "sqlite") == ("cryfs", s(1000.0))
    assert bench.denominator(res, bench.PEERS, "seq_write")[1] is None
    assert bench.denominator(res, "gocryptfs", "sqlite") == ("gocryptfs", s(400.0))
    ok = {"status": "ok", "kind": "fs", "description": "", "reason": None}
    result = {"results": res, "targets": dict.fromkeys(res, ok), "repeats": 3,
              "scale": {"name": "full", "snapshot_mib": 16}, "key_service": {},
              "snapshots": {}, "rekey": {}, "keyd": {}, "notes": [], "extra": {}}
    table = bench.markdown(result)
    row = [line for line in table.splitlines() if line.startswith("| small files: create")][-1]  # ratios
    header = next(line for line in table.splitlines() if line.startswith("| workload |") and "best peer" in line)
    column = header.split(" | ").index("encfs / best peer")
    assert row.split(" | ")[column] == "0.75 (securefs)"


def test_peer_targets_get_fresh_cipher_and_mount_directories(tmp_path: Path) -> None:
    """The peers' set-up (gocryptfs, securefs, CryFS), which the suite cannot run without them."""
    bench = _harness()
    ctx = bench.Context(bench.SCALES["smoke"], tmp_path)
    base, cipher, mnt = bench.Gocryptfs(ctx).fresh_fs_dirs()
    assert base.parent == tmp_path and cipher == base / "cipher" and mnt == base / "plain"
    assert cipher.is_dir() and mnt.is_dir() and not any(cipher.iterdir())


def _marked_copy(repo: Path, dest: Path, parts: tuple[str, ...], mark: Path) -> None:
    """Copy ``parts`` of this checkout to ``dest``; its encfs appends each importing process's
    command line to ``mark``."""
    import shutil

    for part in parts:
        shutil.copytree(repo / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "results"))
    with open(dest / "encfs" / "__init__.py", "a") as f:
        f.write(f"\nimport sys as _sys\nopen({str(mark)!r}, 'a').write(' '.join(_sys.orig_argv) + '\\n')\n")


def _smoke_run(tmp_path: Path, bench_py: Path, *args: str, env_drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A smoke run of the small-file workload by ``bench_py`` (from this checkout's directory):
    its results.json; fails if it failed or left a mount."""
    repo = Path(__file__).parent.parent
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    for name in ("SOFTHSM2_CONF", *env_drop):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(bench_py), "--scale", "smoke", "--workloads", "small", "--no-keys",
                           *args, "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=170, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mounted_under(tmp_path) == []
    result: dict[str, Any] = json.loads((out / "results.json").read_text())
    return result


def _run_beside_a_baseline(tmp_path: Path, targets: str) -> tuple[dict[str, Any], list[str]]:
    """A smoke run of ``targets`` with --baseline a copy of this checkout that leaves a mark when
    imported: (results.json, the command line of every process that imported the copy)."""
    repo = Path(__file__).parent.parent
    base, mark = tmp_path / "base", tmp_path / "base" / "imported"
    _marked_copy(repo, base, ("encfs",), mark)
    result = _smoke_run(tmp_path, repo / "benchmarks" / "bench.py", "--targets", targets, "--baseline", str(base))
    return result, mark.read_text().splitlines()


@needs_root
@pytest.mark.timeout(180)
def test_baseline_checkout_is_measured_beside_encfs_in_one_run(tmp_path: Path) -> None:
    """--baseline DIR: the target encfs-baseline is served by that checkout's code (here a copy
    of this one that leaves a mark when imported), and "encfs / baseline checkout" compares it."""
    result, imported = _run_beside_a_baseline(tmp_path, "encfs,encfs-baseline")
    assert result["targets"]["encfs-baseline"]["status"] == "ok", result["targets"]
    assert set(result["results"]["encfs-baseline"]) == {"small_create", "small_stat", "small_read", "small_delete"}
    assert result["ratios"]["encfs / baseline checkout"]["small_create"] > 0
    assert any(" init " in line for line in imported), imported
    assert any(" mount " in line for line in imported), imported
    assert any("encfs.sealworker" in line for line in imported), imported  # the mount's helper too


@needs_root
@pytest.mark.timeout(180)
def test_the_harness_measures_its_own_checkout_wherever_it_runs(tmp_path: Path) -> None:
    """The encfs targets, null cipher included, run the code of the checkout that holds bench.py
    (here a copy of this one that leaves a mark when imported), not the encfs the interpreter has
    installed nor the working directory's (2026-12-07T150150Z's encfs-null ran the installed one)."""
    repo = Path(__file__).parent.parent
    copy, mark = tmp_path / "checkout", tmp_path / "imported"
    _marked_copy(repo, copy, ("encfs", "benchmarks"), mark)
    result = _smoke_run(tmp_path, copy / "benchmarks" / "bench.py", "--targets", "encfs,encfs-null",
                        "--no-fsync-probe", env_drop=("PYTHONPATH",))
    assert result["targets"]["encfs"]["status"] == "ok" and result["targets"]["encfs-null"]["status"] == "ok"
    imported = mark.read_text().splitlines() if mark.exists() else []  # none: nothing ran the copy
    assert any(" init " in line for line in imported), imported
    assert any(" mount " in line for line in imported), imported
    assert any("null_mount.py" in line for line in imported), imported
    assert any("encfs.sealworker" in line for line in imported), imported


@needs_root
@pytest.mark.timeout(180)
def test_baseline_checkout_is_measured_as_a_volume_too(tmp_path: Path) -> None:
    """encfs-volume-baseline: a volume made, attached and served by the --baseline checkout."""
    result, imported = _run_beside_a_baseline(tmp_path, "encfs-volume,encfs-volume-baseline")
    assert result["targets"]["encfs-volume-baseline"]["status"] == "ok", result["targets"]
    assert result["ratios"]["encfs volume / its baseline checkout"]["small_create"] > 0
    assert any(" volume " in line and " create " in line for line in imported), imported
    assert any(" volume " in line and " attach " in line for line in imported), imported
    assert any(" volume " in line and " detach " in line for line in imported), imported


@needs_root
@pytest.mark.timeout(180)
def test_baseline_checkout_is_measured_over_io_uring_too(tmp_path: Path, uring_enabled: None) -> None:
    """encfs-uring-baseline: the --baseline checkout mounted with --io-uring, beside encfs-uring."""
    result, imported = _run_beside_a_baseline(tmp_path, "encfs-uring,encfs-uring-baseline")
    assert result["targets"]["encfs-uring-baseline"]["status"] == "ok", result["targets"]
    assert result["ratios"]["encfs over io_uring / its baseline checkout"]["small_create"] > 0
    assert any(" mount " in line and "--io-uring" in line for line in imported), imported
