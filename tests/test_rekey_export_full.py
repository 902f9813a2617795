"""`encfs rekey --full DIR` of a snapshot export directory (issue #21), through the real CLI: a
fresh export key, every object re-encrypted (and so renamed), every manifest rewritten with the
same snapshot ids; the old CMK can go; a run killed at any moment (chosen points, then kill -9 at
random ones) leaves DIR a whole export and is finished by the same command. ENCFS_STRESS=1 runs
more kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rekey_kills import kill_and_rerun
from test_rekey_rewrap import home, key_id, ok  # noqa: F401  (the fixture)
from volume_tool import contents, write

from encfs.atomicfile import remove_dead_temporaries
from encfs.block import exportrekey
from encfs.block.exportformat import KeyFile
from encfs.block.exportrekey import ExportBusy, new_path, swap_path
from encfs.diskio import RENAME_EXCHANGE, renameat2
from encfs.keys.blob import CiphertextBlob

MiB = 1 << 20
STRESS = bool(os.environ.get("ENCFS_STRESS"))
KILLS_WANTED = 10 if STRESS else 3


def objects(directory: Path) -> set[str]:
    return {p.name for p in (directory / "objects").rglob("*") if p.is_file()}


def manifests(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "manifests").iterdir())


def export_cmk(directory: Path) -> str:
    blob = KeyFile.parse((directory / "key").read_bytes(), "key").wrapped_key
    return str(CiphertextBlob.parse(blob).header.key_id)


def exported(home: Path, tmp_path: Path, mib: int = 4) -> tuple[Path, dict[str, bytes]]:
    """An export directory of two snapshots sharing most chunks; {snapshot id: contents}."""
    image, directory = tmp_path / "vol.img", tmp_path / "export"
    ok(home, "volume", "create", image, "--size", f"{2 * mib}M", "--key", "a")
    write(image, home, {0: os.urandom(mib * MiB), mib * MiB + 5: os.urandom(MiB // 3)}, tmp_path)
    ids = [json.loads(ok(home, "snapshot", "create", image, "--description", "one", "--json"))["SnapshotId"]]
    write(image, home, {MiB: os.urandom(MiB)}, tmp_path)
    ids.append(json.loads(ok(home, "snapshot", "create", image, "--description", "two", "--json"))["SnapshotId"])
    expected = {}
    for sid in ids:
        ok(home, "snapshot", "export", f"{image}@{sid}", directory)
        ok(home, "snapshot", "restore", f"{image}@{sid}", tmp_path / f"{sid}.img")
        expected[sid] = contents(tmp_path / f"{sid}.img", home)
        (tmp_path / f"{sid}.img").unlink()
    return directory, expected


def imports(home: Path, directory: Path, expected: dict[str, bytes], scratch: Path, key: str) -> None:
    """Every snapshot imports (each object verified) to exactly its contents."""
    for sid, data in expected.items():
        target = scratch / f"import-{sid}.img"
        ok(home, "snapshot", "import", directory, target, "--snapshot", sid, "--key", key)
        assert contents(target, home) == data, sid
        target.unlink()


def test_full_reencrypts_every_object_under_a_fresh_export_key(home: Path, tmp_path: Path) -> None:
    directory, expected = exported(home, tmp_path)
    before, key_file = objects(directory), (directory / "key").read_bytes()
    dry = json.loads(ok(home, "rekey", directory, "--full", "--key", "b", "--dry-run", "--json"))
    assert dry["DryRun"] and objects(directory) == before and (directory / "key").read_bytes() == key_file
    out = json.loads(ok(home, "rekey", directory, "--full", "--key", "b", "--json"))
    assert (out["KeyId"], out["Resumed"], out["Snapshots"]) == (key_id(home, "b"), False, sorted(expected))
    after = objects(directory)
    assert len(after) == len(before) == out["ObjectsWritten"] == dry["ObjectsWritten"] and not after & before
    assert manifests(directory) == sorted(expected) and export_cmk(directory) == key_id(home, "b")
    assert (directory / "key").read_bytes() != key_file
    assert not new_path(directory).exists() and not swap_path(directory).exists()
    ok(home, "key", "disable", "a")
    imports(home, directory, expected, tmp_path, "b")


def test_a_damaged_object_stops_it_and_changes_nothing(home: Path, tmp_path: Path) -> None:
    directory, _expected = exported(home, tmp_path)
    victim = sorted((directory / "objects").rglob("*/*"))[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    p = subprocess.run([sys.executable, "-m", "encfs", "rekey", str(directory), "--full", "--key", "b"],
                       env=dict(os.environ, ENCFS_HOME=str(home)), capture_output=True)
    line = p.stderr.decode().strip()
    assert p.returncode != 0 and line.count("\n") == 0 and victim.name in line and "authentication" in line, line
    assert {q: q.read_bytes() for q in directory.rglob("*") if q.is_file()} == before
    assert not new_path(directory).exists() and not swap_path(directory).exists()


def test_an_export_without_a_complete_snapshot_is_refused_in_one_line(home: Path, tmp_path: Path) -> None:
    directory, _expected = exported(home, tmp_path)
    for m in (directory / "manifests").iterdir():  # as a first export killed before its manifest leaves it
        m.unlink()
    p = subprocess.run([sys.executable, "-m", "encfs", "rekey", str(directory), "--full"],
                       env=dict(os.environ, ENCFS_HOME=str(home)), capture_output=True)
    assert p.returncode != 0 and p.stderr.decode() == f"encfs: {directory} holds no complete snapshot export: " \
                                                      "nothing to re-key\n", p.stderr
    assert not new_path(directory).exists() and not swap_path(directory).exists()


_DIES = textwrap.dedent("""
    # `encfs rekey --full DIR` that dies as a kill -9 would (os._exit: no cleanup) at a chosen point.
    import os, sys
    import encfs.block.exportrekey as er
    from encfs.cli import main
    point = os.environ["DIE_AT"]
    if point == "writing-swap":  # DIR.rekey.swap written and synced under its temporary name, not renamed
        real_replace = os.replace
        def replace(src, dst, **kwargs):
            if ".rekey.swap.tmp." in os.fsdecode(src):
                os._exit(137)
            return real_replace(src, dst, **kwargs)
        os.replace = replace
    elif point == "second-export":
        real_export, calls = er.export_snapshot, []
        def export_snapshot(src, directory, ks):
            calls.append(1)
            if len(calls) == 2:
                os._exit(137)
            return real_export(src, directory, ks)
        er.export_snapshot = export_snapshot
    else:
        real_exchange = er._exchange
        def exchange(a, b):
            if point == "after-exchange":
                real_exchange(a, b)
            os._exit(137)
        er._exchange = exchange
    sys.argv = ["encfs", *sys.argv[1:]]
    raise SystemExit(main())
""")


@pytest.mark.parametrize("point", ["second-export", "writing-swap", "before-exchange", "after-exchange"])
def test_a_run_killed_at_each_step_is_finished_by_running_it_again(home: Path, tmp_path: Path, point: str) -> None:
    directory, expected = exported(home, tmp_path)
    total = len(objects(directory))
    env = dict(os.environ, ENCFS_HOME=str(home), DIE_AT=point)
    env.pop("SOFTHSM2_CONF", None)
    args = ["rekey", str(directory), "--full", "--key", "b"]
    p = subprocess.run([sys.executable, "-c", _DIES, *args], env=env, capture_output=True, timeout=120)
    assert p.returncode == 137, p.stderr.decode()
    assert new_path(directory).exists()
    imports(home, directory, expected, tmp_path, "a" if point != "after-exchange" else "b")  # a whole export
    out = json.loads(ok(home, *args, "--json"))
    assert out["Resumed"] and out["KeyId"] == key_id(home, "b")
    assert out["ObjectsWritten"] < total  # carried on: what the killed run wrote stays
    assert not new_path(directory).exists() and not swap_path(directory).exists()
    assert not list(tmp_path.glob("*.tmp.*"))  # the marker's temporary of the killed run: gone
    assert manifests(directory) == sorted(expected) and export_cmk(directory) == key_id(home, "b")
    ok(home, "key", "disable", "a")
    imports(home, directory, expected, tmp_path, "b")


def test_full_killed_at_random_moments_is_finished_by_running_it_again(home: Path, tmp_path: Path) -> None:
    directory, expected = exported(home, tmp_path, mib=24)
    new = new_path(directory)

    def after_kill(dest: str) -> None:
        assert manifests(directory) == sorted(expected)  # DIR is a whole export, old or new
        ok(home, "fsck", directory)

    def after_rerun(dest: str) -> None:
        out = json.loads(ok(home, "rekey", directory, "--full", "--key", dest, "--json"))
        assert not new.exists() and not swap_path(directory).exists()
        assert out["KeyId"] == export_cmk(directory) == key_id(home, dest)
        assert manifests(directory) == sorted(expected)
        ok(home, "fsck", directory)  # every object and manifest verifies

    _rounds, dest = kill_and_rerun(directory, home, KILLS_WANTED,
                                   lambda: new.exists() or swap_path(directory).exists(), after_kill, after_rerun)
    ok(home, "key", "disable", "b" if dest == "a" else "a")
    imports(home, directory, expected, tmp_path, dest)


def test_only_other_processes_regular_temporaries_of_the_marker_are_removed(tmp_path: Path) -> None:
    """Under DIR's lock no other run writes DIR.rekey.swap: a temporary of any other pid is stale,
    a live one's too (pids are reused: pid 1 stands for one). This process's own, other files'
    and anything not a regular file stay."""
    swap = tmp_path / "export.rekey.swap"
    stale = [tmp_path / f"export.rekey.swap.tmp.{pid}" for pid in (1, 999_999_999)]
    kept = [tmp_path / f"export.rekey.swap.tmp.{os.getpid()}", tmp_path / "other.rekey.swap.tmp.1",
            tmp_path / "export.rekey.swap.tmp.x"]
    for p in stale + kept:
        p.write_bytes(b"")
    (tmp_path / "export.rekey.swap.tmp.2").mkdir()
    (tmp_path / "target").write_bytes(b"kept")
    os.symlink(tmp_path / "target", tmp_path / "export.rekey.swap.tmp.3")
    remove_dead_temporaries(swap, locked=True)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (tmp_path / "export.rekey.swap.tmp.2").is_dir() and (tmp_path / "export.rekey.swap.tmp.3").is_symlink()
    assert (tmp_path / "target").read_bytes() == b"kept"


def test_a_run_that_locked_a_directory_exchanged_meanwhile_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run's exchange of DIR with its rebuilt copy comes between this run's open of DIR and
    its lock: the lock is then on the old inode (now DIR.rekey.new), which guards nothing, and the
    run must not go on (it would remove the lock holder's temporaries): refused, busy."""
    directory = tmp_path / "export"
    directory.mkdir()
    new_path(directory).mkdir()
    (tmp_path / "export.rekey.swap.tmp.1").write_bytes(b"the lock holder's")
    real_flock = exportrekey.fcntl.flock

    def exchanged_first(fd: int, op: int) -> None:
        renameat2(directory, new_path(directory), RENAME_EXCHANGE)
        real_flock(fd, op)

    monkeypatch.setattr(exportrekey.fcntl, "flock", exchanged_first)
    with pytest.raises(ExportBusy):
        exportrekey.rekey_export(directory, None)  # type: ignore[arg-type]  # refused before any key use
    assert (tmp_path / "export.rekey.swap.tmp.1").exists()
