"""The mount lock (issue #18 item 4): a mounted CIPHERDIR refuses a second mount, in one line, here and
across hosts sharing the storage; a crashed mount never leaves it stuck. Real mounts, real kill -9.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_cli_helpers import assert_one_line_error, daemon_pids, encfs_ok, guard, new_fs
from fuse_helpers import Mount

from encfs.fuse import mountlock
from encfs.fuse.mount import is_mounted
from encfs.fuse.mountlock import LOCK_NAME, MountBusy, MountLock

UNCLEAN = "did not end cleanly"


def _record(cipher: Path) -> dict:
    return json.loads((cipher / LOCK_NAME).read_bytes())


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def _write_record(cipher: Path, **fields: object) -> None:
    now = time.time()
    rec = {"version": 1, "state": "mounted", "mode": "rw", "host": "other-host.example",
           "boot_id": "0b6c9d0e-1111-2222-3333-444455556666", "pid": 4242, "pid_start": 1,
           "owner": "feedface", "mountpoint": "/mnt/elsewhere", "mounted_at": now - 100, "heartbeat": now}
    rec.update(fields)
    (cipher / LOCK_NAME).write_text(json.dumps(rec))


def _mount_cli(cipher: Path, mp: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_encfs("mount", str(cipher), str(mp), *extra, home=home, timeout=60)


def _plain(tmp_path: Path, name: str) -> Path:
    mp = tmp_path / name
    mp.mkdir()
    return mp


# -- one machine ------------------------------------------------------------------------------------

@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_second_mount_is_refused_and_the_first_keeps_working(foreground: bool, tmp_path: Path,
                                                             fs_home: Path) -> None:
    cipher, mp1 = new_fs(tmp_path, fs_home)
    mp2 = _plain(tmp_path, "second")
    with guard(cipher, mp1), guard(cipher, mp2):
        with Mount(cipher, mp1, fs_home, log=tmp_path / "m1.log") as m1:
            (mp1 / "f").write_bytes(b"first " * 1000)
            fg = ["--foreground"] if foreground else []
            refused = _mount_cli(cipher, mp2, fs_home, *fg)
            line = assert_one_line_error(refused, str(cipher), "already mounted",
                                         f"at {mp1.resolve()}", f"pid {m1.pid}", f"host {socket.gethostname()}")
            assert refused.returncode == 75  # busy (README "Exit codes"), daemon or not
            assert "Traceback" not in line
            assert not is_mounted(mp2)
            assert daemon_pids(cipher) == [m1.pid], "the refused mount left a daemon"
            # a read-only second mount is refused too (it would serve stale data)
            assert_one_line_error(_mount_cli(cipher, mp2, fs_home, "--read-only", *fg), "already mounted",
                                  f"pid {m1.pid}")
            with open(mp1 / "f", "ab") as f:
                f.write(b"appended")
                os.fsync(f.fileno())
            assert (mp1 / "f").read_bytes() == b"first " * 1000 + b"appended"
            assert _record(cipher)["state"] == "mounted"
        assert _record(cipher)["state"] == "clean"
        with Mount(cipher, mp2, fs_home):
            assert (mp2 / "f").read_bytes() == b"first " * 1000 + b"appended"


def test_two_mounts_started_together_one_wins(tmp_path: Path, fs_home: Path) -> None:
    """The check before forking can pass for both: the daemons' own locks decide."""
    cipher, mp1 = new_fs(tmp_path, fs_home)
    mp2 = _plain(tmp_path, "second")
    env = dict(os.environ, ENCFS_HOME=str(fs_home))
    env.pop("SOFTHSM2_CONF", None)
    with guard(cipher, mp1), guard(cipher, mp2):
        procs = [subprocess.Popen([sys.executable, "-m", "encfs", "mount", str(cipher), str(mp)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for mp in (mp1, mp2)]
        results = [subprocess.CompletedProcess(p.args, p.wait(timeout=60), *p.communicate(timeout=10))
                   for p in procs]
        ok = [r for r in results if r.returncode == 0]
        assert len(ok) == 1, [r.stderr for r in results]
        loser = next(r for r in results if r.returncode != 0)
        line = assert_one_line_error(loser)
        assert "already mounted" in line or "in use by another encfs process" in line, line
        assert [is_mounted(mp1), is_mounted(mp2)].count(True) == 1
        assert len(daemon_pids(cipher)) == 1


def test_kill9_leaves_no_stuck_lock_and_the_next_mount_recovers(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        m = Mount(cipher, mp, fs_home, log=tmp_path / "m1.log")
        try:
            (mp / "f").write_bytes(b"saved")
            os.sync()
        finally:
            m.kill9()
        info = json.loads(encfs_ok("info", "--json", str(cipher), home=fs_home))
        assert info["Lock"].startswith(f"not unmounted cleanly: last mounted read-write at {mp.resolve()} "
                                       f"by pid {m.pid}"), info["Lock"]
        with Mount(cipher, mp, fs_home, log=tmp_path / "m2.log") as m2:
            assert (mp / "f").read_bytes() == b"saved"
            rec = _record(cipher)
            assert rec["pid"] == m2.pid and rec["state"] == "mounted"
            assert "mounted read-write" in json.loads(encfs_ok("info", "--json", str(cipher), home=fs_home))["Lock"]
        log2 = (tmp_path / "m2.log").read_text()
        assert UNCLEAN in log2 and f"pid {m.pid}" in log2 and "ended without unmounting" in log2, log2
        with Mount(cipher, mp, fs_home, log=tmp_path / "m3.log"):
            pass
        assert UNCLEAN not in (tmp_path / "m3.log").read_text()
        assert UNCLEAN not in (tmp_path / "m1.log").read_text()


def test_sigterm_is_a_clean_unmount(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        m = Mount(cipher, mp, fs_home, log=tmp_path / "m1.log")
        try:
            (mp / "f").write_text("x")
            os.kill(m.pid, signal.SIGTERM)
            assert m.proc.wait(timeout=30) == 0
        finally:
            m.stop()
        assert _record(cipher)["state"] == "clean"
        with Mount(cipher, mp, fs_home, log=tmp_path / "m2.log"):
            pass
        assert UNCLEAN not in (tmp_path / "m2.log").read_text()


def test_read_only_mounts_coexist_and_exclude_read_write(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp1 = new_fs(tmp_path, fs_home)
    mp2, mp3 = _plain(tmp_path, "ro2"), _plain(tmp_path, "rw3")
    with guard(cipher, mp1), guard(cipher, mp2), guard(cipher, mp3):
        with Mount(cipher, mp1, fs_home):
            (mp1 / "f").write_text("shared")
        before = (cipher / LOCK_NAME).read_bytes()
        with Mount(cipher, mp1, fs_home, "--read-only"), Mount(cipher, mp2, fs_home, "--read-only"):
            assert (mp1 / "f").read_text() == (mp2 / "f").read_text() == "shared"
            for fg in ([], ["--foreground"]):
                assert_one_line_error(_mount_cli(cipher, mp3, fs_home, *fg), "already mounted read-only")
            assert not is_mounted(mp3)
            assert json.loads(encfs_ok("info", "--json", str(cipher), home=fs_home))["Lock"] == "mounted read-only"
        assert (cipher / LOCK_NAME).read_bytes() == before, "a read-only mount wrote the owner record"
        with Mount(cipher, mp3, fs_home) as rw:
            for fg in ([], ["--foreground"]):
                assert_one_line_error(_mount_cli(cipher, mp1, fs_home, "--read-only", *fg), "already mounted",
                                      f"at {mp3.resolve()}", f"pid {rw.pid}")
            assert not is_mounted(mp1)
            assert (mp3 / "f").read_text() == "shared"


@pytest.fixture
def read_only_bind(tmp_path: Path):
    """A read-only bind mount of a directory (read-only media), removed afterwards."""
    made: list[Path] = []

    def bind(src: Path) -> Path:
        dst = tmp_path / f"{src.name}-ro"
        dst.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, timeout=30)
        made.append(dst)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True, timeout=30)
        return dst

    yield bind
    for dst in made:
        subprocess.run(["umount", str(dst)], capture_output=True, timeout=30)


def test_read_only_media(read_only_bind, tmp_path: Path, fs_home: Path) -> None:
    """No lock file and no way to create one: a read-only mount goes ahead (warned), a read-write one
    cannot lock and says so."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_text("on a CD")
    (cipher / LOCK_NAME).unlink()  # as on a filesystem written before the lock existed
    ro = read_only_bind(cipher)
    with guard(ro, mp):
        with Mount(ro, mp, fs_home, "--read-only", log=tmp_path / "ro.log"):
            assert (mp / "f").read_text() == "on a CD"
        assert "mounting read-only without a lock" in (tmp_path / "ro.log").read_text()
        assert_one_line_error(_mount_cli(ro, mp, fs_home), "cannot open the mount lock", "Read-only file system")
        assert not is_mounted(mp)


# -- other hosts (storage shared without shared locks) ----------------------------------------------

@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_record_of_another_host_with_a_fresh_heartbeat_refuses(foreground: bool, tmp_path: Path,
                                                                fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    _write_record(cipher)
    fg = ["--foreground"] if foreground else []
    with guard(cipher, mp):
        assert_one_line_error(_mount_cli(cipher, mp, fs_home, *fg), str(cipher),
                              "already mounted at /mnt/elsewhere by pid 4242 on host other-host.example",
                              "if that host crashed, retry in")
        assert not is_mounted(mp)
        assert_one_line_error(_mount_cli(cipher, mp, fs_home, "--read-only", *fg), "on host other-host.example")
        # the same host name after a reboot (another boot id) is judged the same way
        _write_record(cipher, host=socket.gethostname())
        assert_one_line_error(_mount_cli(cipher, mp, fs_home, *fg), "already mounted")
        assert _record(cipher)["pid"] == 4242, "a refused mount wrote the record"


def test_record_of_another_host_with_an_old_heartbeat_is_taken_over(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    _write_record(cipher, heartbeat=time.time() - mountlock.LEASE - 5)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home, log=tmp_path / "m.log") as m:
            (mp / "f").write_text("taken over")
            assert _record(cipher)["pid"] == m.pid
        log = (tmp_path / "m.log").read_text()
        assert UNCLEAN in log and "presumed crashed" in log and "other-host.example" in log, log
        rec = _record(cipher)
        assert rec["state"] == "clean" and rec["host"] == socket.gethostname() and rec["boot_id"] == _boot_id()


def test_record_of_this_host(tmp_path: Path, fs_home: Path) -> None:
    """Locks that do not work (a record says "mounted", the fcntl lock is free): a live owner
    (same pid and start time) refuses; a pid that now belongs to another process is stale."""
    cipher, mp = new_fs(tmp_path, fs_home)
    me = os.getpid()
    with guard(cipher, mp):
        _write_record(cipher, host=socket.gethostname(), boot_id=_boot_id(), pid=me, pid_start=_start_time(me))
        assert_one_line_error(_mount_cli(cipher, mp, fs_home), f"already mounted at /mnt/elsewhere by pid {me}")
        _write_record(cipher, host=socket.gethostname(), boot_id=_boot_id(), pid=me, pid_start=_start_time(me) - 1)
        with Mount(cipher, mp, fs_home, log=tmp_path / "m.log"):
            pass
        assert "ended without unmounting" in (tmp_path / "m.log").read_text()


# -- MountLock itself ---------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from encfs.fuse.mountlock import MountLock
lock = MountLock.acquire(Path(sys.argv[1]), "/mnt/holder", read_only=sys.argv[2] == "ro")
print("locked", flush=True)
sys.stdin.read()
lock.release(clean=True)
"""


def _holder(cipher: Path, mode: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(cipher), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "locked\n", p.stderr.read() if p.stderr else ""
    return p


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    holder = _holder(cipher, "rw")
    try:
        with pytest.raises(MountBusy, match=f"already mounted at /mnt/holder by pid {holder.pid}"):
            MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
        with pytest.raises(MountBusy, match=f"by pid {holder.pid}"):
            MountLock.acquire(cipher, tmp_path / "mp", read_only=True)
        with pytest.raises(MountBusy, match=f"by pid {holder.pid}"):
            mountlock.check(cipher, read_only=False)
        assert _record(cipher)["pid"] == holder.pid
    finally:
        holder.communicate("", timeout=30)
    lock = MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
    try:
        assert not lock.recovering
        assert _record(cipher)["pid"] == os.getpid()
    finally:
        lock.release(clean=True)


def test_shared_locks(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    reader = _holder(cipher, "ro")
    try:
        ro = MountLock.acquire(cipher, tmp_path / "mp", read_only=True)
        ro.release(clean=True)
        with pytest.raises(MountBusy, match=f"already mounted read-only \\(pid {reader.pid}\\)"):
            MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
    finally:
        reader.communicate("", timeout=30)


def test_kill9_of_a_holder_releases_the_lock_and_leaves_recovery(tmp_path: Path) -> None:
    cipher = tmp_path / "c"
    cipher.mkdir()
    holder = _holder(cipher, "rw")
    holder.kill()
    holder.communicate(timeout=30)
    lock = MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
    try:
        assert lock.recovering
        assert lock.previous is not None and lock.previous["pid"] == holder.pid
    finally:
        lock.release(clean=True)
    lock = MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
    try:
        assert not lock.recovering
    finally:
        lock.release(clean=True)


def test_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountlock, "HEARTBEAT", 0.02)
    cipher = tmp_path / "c"
    cipher.mkdir()
    lock = MountLock.acquire(cipher, tmp_path / "mp", read_only=False)
    try:
        first = _record(cipher)["heartbeat"]
        size = (cipher / LOCK_NAME).stat().st_size
        assert size % 512 == 0
        deadline = time.monotonic() + 10
        while _record(cipher)["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat in 10 s"
            time.sleep(0.01)
        assert (cipher / LOCK_NAME).stat().st_size == size  # rewritten in place, same length
    finally:
        lock.release(clean=True)
    assert _record(cipher)["state"] == "clean"
