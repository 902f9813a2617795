"""`encfs mount`, `umount`, `info`, `init` and the fstab helper, driven as a user would, on real mounts.

Every test that mounts something runs inside ``guard(cipherdir, mountpoint)``:
on the way out it unmounts (fusermount3 -u), waits a bounded time for the
daemons serving that CIPHERDIR (found by PID with `pgrep -f` on the unique
cipherdir path), kills only those PIDs if they linger, and lazy-unmounts as
a last resort (docs/dev/testing.md). Every wait is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_encfs
from fsconfig_tool import remac
from fuse_helpers import Mount
from procs import run_on_terminal

from encfs.fuse import mountlock
from encfs.fuse.fsconfig import features_for
from encfs.fuse.mount import is_mounted
from encfs.fuse.server import READ_AHEAD_KIB

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MINIMAL_ENV = ["env", "-i", "PATH=/usr/bin:/bin"]
HELPER = Path("/sbin/mount.fuse.encfs")
HELPER_LOCK = "/run/lock/encfs-test-mount-helper.lock"


# -- process and mount bookkeeping ------------------------------------------------------------

def daemon_pids(cipherdir: Path) -> list[int]:
    """PIDs of processes whose command line names ``cipherdir`` (followed by a space: not a prefix)."""
    proc = subprocess.run(["pgrep", "-f", f"{cipherdir} "], capture_output=True, text=True, timeout=10)
    return [int(p) for p in proc.stdout.split() if int(p) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a reparented daemon may linger as a zombie of pid 1: it has exited


def wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mount_count(mountpoint: Path) -> int:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.split()[1:2] == [target])


def force_cleanup(mountpoint: Path, pids: list[int]) -> None:
    """Unmount, let the daemons exit, kill only ``pids`` if they do not, lazy-unmount last."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
    if not wait_gone(pids, 15):
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            for pid in pids:
                if _alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if wait_gone(pids, wait):
                break
    while is_mounted(mountpoint):
        if subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
            break


@contextmanager
def guard(cipherdir: Path, mountpoint: Path) -> Iterator[None]:
    """Whatever happens inside, leave nothing mounted at ``mountpoint`` and no daemon of ``cipherdir``."""
    try:
        yield
    finally:
        force_cleanup(mountpoint, daemon_pids(cipherdir))


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"expected a failure, got exit 0: stdout={out!r} stderr={err!r}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs: "), f"expected one 'encfs: ' line, got {err!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def encfs_ok(*args: str, home: Path, env: dict[str, str] | None = None) -> str:
    proc = run_encfs(*args, home=home, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def new_fs(base: Path, home: Path, key: str = "fs", name: str = "cipher") -> tuple[Path, Path]:
    cipherdir, mountpoint = base / name, base / f"{name}-plain"
    mountpoint.mkdir(parents=True)
    encfs_ok("init", str(cipherdir), "--key", key, home=home)
    return cipherdir, mountpoint


def backing_subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and "." not in p.name)


def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"


# -- shared state for the failure cases -------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, fs_home: Path) -> dict[str, Path]:
    """A template filesystem under 'fs', a home whose key is disabled, another home, a wrong-PIN home."""
    base = tmp_path_factory.mktemp("cli-world")
    w: dict[str, Path] = {"base": base}
    w["template"], _ = new_fs(base, fs_home, name="template")
    w["dis_home"] = base / "dis-home"
    encfs_ok("hsm", "init", home=w["dis_home"])
    encfs_ok("key", "create", "--alias", "dis", home=w["dis_home"])
    w["dis_template"], _ = new_fs(base, w["dis_home"], key="dis", name="dis-template")
    encfs_ok("key", "disable", "dis", home=w["dis_home"])
    w["other_home"] = base / "other-home"  # a provisioned token with a different key
    encfs_ok("hsm", "init", home=w["other_home"])
    encfs_ok("key", "create", "--alias", "fs", home=w["other_home"])
    w["pin_home"] = base / "pin-home"
    shutil.copytree(fs_home, w["pin_home"])
    (w["pin_home"] / "softhsm" / "user.pin").write_text("wrong-pin-0000\n")
    (base / "bad.pin").write_text("1234\n")
    return w


def _set_config_field(cipherdir: Path, key: str, value, names=("encfs.conf", "encfs.conf.bak")) -> None:
    """Change a field of config copies WITHOUT computing their MACs again: damage."""
    for name in names:
        p = cipherdir / name
        d = json.loads(p.read_bytes())
        d[key] = value
        p.write_text(json.dumps(d))


def _setup_failure(case: str, w: dict[str, Path], tmp: Path, fs_home: Path):
    """(cipherdir, mountpoint, home, extra args, needles in the error line)."""
    cipher, mp = tmp / "cipher", tmp / "plain"
    mp.mkdir()
    shutil.copytree(w["dis_template"] if case == "key-disabled" else w["template"], cipher)
    home, extra, needles = fs_home, [], []
    fs_key = json.loads((cipher / "encfs.conf").read_bytes())["key_id"]
    if case == "not-encfs":
        shutil.rmtree(cipher)
        cipher.mkdir()
        (cipher / "somefile").write_text("x")
        needles = ["not an encfs filesystem"]
    elif case == "format-99":  # authenticated: written by a newer encfs
        remac(cipher, fs_home, {"format": 99})
        needles = ["format 99", "upgrade encfs"]
    elif case == "unknown-feature":
        remac(cipher, fs_home, {"features": [*features_for(32768), "time-travel"]})
        needles = ["unknown feature", "time-travel"]
    elif case == "two-block-sizes":
        remac(cipher, fs_home, {"features": [*features_for(32768), "aes256gcm-4k-blocks"]})
        needles = ["exactly one content block size"]
    elif case == "copies-disagree":  # both copies verify, but their block sizes differ
        remac(cipher, fs_home, {"features": list(features_for(32768))}, names=("encfs.conf.bak",))
        needles = ["encfs.conf and encfs.conf.bak", "disagree", "block size (4096 in encfs.conf, 32768 in"]
    elif case == "format-99-forged":  # not authenticated: damage, in both copies
        _set_config_field(cipher, "format", 99)
        needles = ["encfs.conf is damaged (its MAC does not verify)", "encfs.conf.bak is damaged"]
    elif case == "key-disabled":
        home, needles = w["dis_home"], [fs_key, "disabled"]
    elif case == "key-missing":
        home, needles = w["other_home"], [fs_key]
    elif case == "no-token":  # a mistyped home: nothing there, and mount must not provision a token in it
        home, needles = tmp / "empty-home", ["no key store", "hsm init"]
    elif case == "hsm-unavailable":
        extra = ["--pkcs11-module", "/nonexistent.so", "--token", "x", "--pin-file", str(w["base"] / "bad.pin")]
        needles = ["/nonexistent.so"]
    elif case == "wrong-pin":
        home, needles = w["pin_home"], ["PIN"]
    elif case == "mountpoint-missing":
        mp.rmdir()
        needles = [str(mp), "does not exist"]
    elif case == "mountpoint-not-dir":
        mp.rmdir()
        mp.write_text("")
        needles = [str(mp), "not a directory"]
    elif case == "mountpoint-not-empty":
        (mp / "occupied").write_text("")
        needles = [str(mp), "not empty"]
    elif case == "mountpoint-busy":
        needles = [str(mp), "busy"]
    else:
        raise AssertionError(case)
    return cipher, mp, home, extra, needles


FAILURES = ["not-encfs", "format-99", "unknown-feature", "two-block-sizes", "copies-disagree", "format-99-forged",
            "key-disabled", "key-missing", "no-token",
            "hsm-unavailable", "wrong-pin", "mountpoint-missing", "mountpoint-not-dir", "mountpoint-not-empty",
            "mountpoint-busy"]


# -- 1. mount failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
@pytest.mark.parametrize("case", FAILURES)
def test_mount_failure_is_one_line_and_leaves_nothing(case: str, foreground: bool, world, tmp_path: Path,
                                                      fs_home: Path) -> None:
    cipher, mp, home, extra, needles = _setup_failure(case, world, tmp_path, fs_home)
    fg = ["--foreground"] if foreground else []
    busy_cipher = tmp_path / "busy-cipher"
    with guard(cipher, mp), guard(busy_cipher, mp):
        first = None
        if case == "mountpoint-busy":
            shutil.copytree(world["template"], busy_cipher)
            first = Mount(busy_cipher, mp, fs_home)
            (mp / "kept").write_text("still here")
        try:
            proc = run_encfs("mount", *fg, str(cipher), str(mp), *extra, home=home, timeout=30)
            assert_one_line_error(proc, *needles)
            assert proc.stdout == b""
            assert daemon_pids(cipher) == [], "a daemon is left running"
            if first is None:
                assert not is_mounted(mp), "something is left mounted"
            else:
                assert mount_count(mp) == 1, "a second mount was stacked on the busy mountpoint"
                assert (mp / "kept").read_text() == "still here"
                assert first.proc.poll() is None
            if case == "no-token":
                assert not (home / "softhsm").exists(), "mount provisioned a token in a mistyped home"
        finally:
            if first is not None:
                first.stop()


# -- 2. daemonized mount and umount -------------------------------------------------------------------

def test_daemonized_mount_is_usable_on_return_and_umount_flushes(tmp_path: Path, fs_home: Path) -> None:
    cipher = tmp_path / "cipher"
    mp = tmp_path / "mnt é x"  # mountinfo escapes the spaces; the name is not ASCII
    mp.mkdir()
    encfs_ok("init", str(cipher), "--key", "fs", home=fs_home)
    data = os.urandom(300_000)
    with guard(cipher, mp):
        proc = run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b""
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        # no sleep, no polling: the mount must be there when `encfs mount` returns
        (mp / "big").write_bytes(data)
        (mp / "dir").mkdir()
        (mp / "dir" / "small").write_text("hello")
        assert (mp / "big").read_bytes() == data
        assert set(os.listdir(mp)) == {"big", "dir"}
        # a root mount gets encfs's read-ahead (found through mountinfo, despite the spaces)
        dev = mp.stat().st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        assert int(ra) == READ_AHEAD_KIB

        busy = run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=30)
        assert_one_line_error(busy, "busy")

        proc = run_encfs("umount", str(mp), home=fs_home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(pids, 30), "the daemon did not exit after `encfs umount`"
        assert daemon_pids(cipher) == []
        assert os.listdir(mp) == []

    with guard(cipher, mp), Mount(cipher, mp, fs_home):  # a new daemon: nothing served from a cache
        assert (mp / "big").read_bytes() == data
        assert (mp / "dir" / "small").read_text() == "hello"


def test_umount_of_something_not_mounted_is_one_line(tmp_path: Path, fs_home: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run_encfs("umount", str(tmp_path / "plain"), home=fs_home), "not mounted")
    assert_one_line_error(run_encfs("umount", str(tmp_path / "missing"), home=fs_home), "not mounted")


def test_umount_refuses_a_mount_that_is_not_encfs(tmp_path: Path, fs_home: Path) -> None:
    """As root, fusermount3 -u unmounts anything: `encfs umount` must only touch encfs mounts."""
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True, timeout=30)
    try:
        assert_one_line_error(run_encfs("umount", str(mp), home=fs_home), "tmpfs", "not an encfs")
        assert is_mounted(mp)
    finally:
        subprocess.run(["umount", str(mp)], capture_output=True, timeout=30)
    assert not is_mounted(mp)


# -- 3. SIGTERM --------------------------------------------------------------------------------------

def _write_sample(mp: Path) -> dict[str, bytes]:
    files = {"a": os.urandom(50_000), "sub/b": b"x" * 10_000, "sub/" + "L" * 220: b"long name"}
    (mp / "sub").mkdir()
    for name, data in files.items():
        (mp / name).write_bytes(data)
    os.rename(mp / "a", mp / "renamed")
    files["renamed"] = files.pop("a")
    return files


def _check_sample(mp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name
    assert not (mp / "a").exists()


def test_sigterm_to_foreground_daemon_unmounts_cleanly(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        m = Mount(cipher, mp, fs_home)
        try:
            files = _write_sample(mp)
            os.kill(m.pid, signal.SIGTERM)
            assert m.proc.wait(timeout=30) == 0
            assert not is_mounted(mp)
        finally:
            m.stop()
        with Mount(cipher, mp, fs_home):
            _check_sample(mp, files)


def test_sigterm_to_background_daemon_unmounts_cleanly(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        files = _write_sample(mp)
        os.kill(pids[0], signal.SIGTERM)
        assert wait_gone(pids, 30), "the daemon ignored SIGTERM"
        assert not is_mounted(mp)
        with Mount(cipher, mp, fs_home):
            _check_sample(mp, files)


# -- 4. metadata loss ---------------------------------------------------------------------------------

def _info(cipher: Path, home: Path) -> dict:
    return json.loads(encfs_ok("info", "--json", str(cipher), home=home))


@pytest.mark.parametrize("damage", ["deleted", "garbage", "json-list", "empty-object", "truncated"])
def test_primary_config_lost_falls_back_to_backup(damage: str, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_text("survives")
        conf = cipher / "encfs.conf"
        original = conf.read_bytes()
        if damage == "deleted":
            conf.unlink()
        else:
            conf.write_bytes({"garbage": os.urandom(300), "json-list": b"[1, 2]", "empty-object": b"{}",
                              "truncated": original[: len(original) // 2]}[damage])
        info = _info(cipher, fs_home)
        assert info["Format"] == 2
        assert len(info["Warnings"]) == 1 and info["Warnings"][0].startswith("encfs.conf is "), info["Warnings"]
        text = encfs_ok("info", str(cipher), home=fs_home)
        assert "encfs.conf is" in text
        with Mount(cipher, mp, fs_home):
            assert (mp / "f").read_text() == "survives"
        # a read-write mount restored the lost copy from the good one
        assert json.loads(conf.read_bytes()) == json.loads(original)
        assert _info(cipher, fs_home)["Warnings"] == []


@pytest.mark.parametrize("field", ["wrapped_secret", "fs_id"])
def test_primary_config_that_parses_but_does_not_unlock_falls_back(field: str, tmp_path: Path,
                                                                    fs_home: Path) -> None:
    """Damage `encfs info` cannot see (valid JSON, wrong bytes): the mount tries the other copy."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_text("survives")
        conf = cipher / "encfs.conf"
        original = conf.read_bytes()
        d = json.loads(original)
        value = d[field]
        i = len(value) // 2
        swapped = "1" if value[i] == "0" else "0"  # a digit is valid in both base64 and hex
        d[field] = value[:i] + swapped + value[i + 1:]
        conf.write_text(json.dumps(d))
        with Mount(cipher, mp, fs_home):
            assert (mp / "f").read_text() == "survives"
        assert json.loads(conf.read_bytes()) == json.loads(original)


def test_backup_config_lost_is_reported_and_restored(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        (cipher / "encfs.conf.bak").unlink()
        assert _info(cipher, fs_home)["Warnings"] == ["encfs.conf.bak is missing"]
        with Mount(cipher, mp, fs_home, "--read-only"):
            pass
        assert not (cipher / "encfs.conf.bak").exists(), "a read-only mount wrote to the CIPHERDIR"
        with Mount(cipher, mp, fs_home):
            pass
        assert _info(cipher, fs_home)["Warnings"] == []


def test_both_config_copies_damaged_is_one_line(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    (cipher / "encfs.conf").write_bytes(b"\x00" * 64)
    (cipher / "encfs.conf.bak").unlink()
    with guard(cipher, mp):
        assert_one_line_error(run_encfs("info", str(cipher), home=fs_home), "encfs.conf is damaged")
        assert_one_line_error(run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=30),
                              "encfs.conf is damaged", "encfs.conf.bak is missing")
        assert not is_mounted(mp)


def _tree_with_subdir(mp: Path) -> dict[str, bytes]:
    files = {"top": b"top level", "sub/one": b"1", "sub/two": b"2" * 5000, "sub/" + "N" * 230: b"long",
             "other/three": b"3"}
    (mp / "sub").mkdir()
    (mp / "other").mkdir()
    for name, data in files.items():
        (mp / name).write_bytes(data)
    return files


def _backing_dir_of(cipher: Path, mp: Path, name: str) -> Path:
    """The backing directory of plaintext directory ``name`` (matched by inode: encfs passes them through)."""
    ino = os.stat(mp / name).st_ino
    found = [p for p in backing_subdirs(cipher) if p.stat().st_ino == ino]
    assert len(found) == 1
    return found[0]


def test_lost_dirid_file_is_recovered_from_xattr(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            files = _tree_with_subdir(mp)
            sub = _backing_dir_of(cipher, mp, "sub")
        dirid = (sub / "encfs.dirid").read_bytes()
        assert os.getxattr(sub, "user.encfs.dirid") == dirid
        (sub / "encfs.dirid").unlink()
        with Mount(cipher, mp, fs_home):
            assert sorted(os.listdir(mp / "sub")) == sorted(n.split("/")[1] for n in files if n.startswith("sub/"))
            for name, data in files.items():
                assert (mp / name).read_bytes() == data
        # repaired, so a copy that drops xattrs (cp -r, rsync without -X) keeps the directory readable
        assert (sub / "encfs.dirid").read_bytes() == dirid


def test_lost_dirid_file_and_xattr_breaks_only_that_directory(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            files = _tree_with_subdir(mp)
            sub = _backing_dir_of(cipher, mp, "sub")
        (sub / "encfs.dirid").unlink()
        os.removexattr(sub, "user.encfs.dirid")
        with Mount(cipher, mp, fs_home):
            expect_errno(errno.EIO, os.listdir, mp / "sub")
            expect_errno(errno.EIO, (mp / "sub" / "one").read_bytes)
            expect_errno(errno.EIO, (mp / "sub" / "new").write_bytes, b"x")
            assert sorted(os.listdir(mp)) == ["other", "sub", "top"]
            assert os.listdir(mp / "other") == ["three"]
            assert (mp / "top").read_bytes() == files["top"]
            assert (mp / "other" / "three").read_bytes() == files["other/three"]
            (mp / "new").write_text("still writable")
            (mp / "other" / "newdir").mkdir()
            assert (mp / "new").read_text() == "still writable"
        assert not (sub / "encfs.dirid").exists(), "a new id was invented for a non-empty directory"


def test_lost_long_name_side_file_hides_only_that_entry(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    long_a, long_b = "A" * 200, "B" * 210
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "d").mkdir()
            for name in (long_a, long_b, "short"):
                (mp / "d" / name).write_text(name[:1])
            d = _backing_dir_of(cipher, mp, "d")
        sides = sorted(d.glob("encfs.ln.*.name"))
        assert len(sides) == 2
        sides[0].unlink()
        with Mount(cipher, mp, fs_home):
            listed = os.listdir(mp / "d")
            assert "short" in listed and len(listed) == 2, listed
            survivor = next(n for n in listed if n != "short")
            lost = long_b if survivor == long_a else long_a
            assert (mp / "d" / survivor).read_text() == survivor[:1]
            assert (mp / "d" / "short").read_text() == "s"
            # the entry is not listed, but its name still reaches it (the hashed entry needs no side file)
            assert (mp / "d" / lost).read_text() == lost[:1]


# -- 5. info ----------------------------------------------------------------------------------------------

def test_info_reports_format_ids_features_and_counts(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    key_id = next(line.split()[1] for line in encfs_ok("key", "describe", "fs", home=fs_home).splitlines()
                  if line.startswith("KeyId"))
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f1").write_text("1")
            (mp / "d1").mkdir()
            (mp / "d1" / "d2").mkdir()
            (mp / "d1" / "f2").write_text("2")
            (mp / "d1" / ("F" * 240)).write_text("3")
            os.symlink("f1", mp / "s1")
            os.symlink("x" * 3000, mp / "d1" / "s2")  # a long target, stored beside the tree
        info = _info(cipher, fs_home)
    conf = json.loads((cipher / "encfs.conf").read_bytes())
    assert info["Format"] == 2 and info["Verified"] is False
    assert info["Lock"] == "not mounted (last unmounted cleanly)"
    assert info["FileSystemId"] == conf["fs_id"] and len(info["FileSystemId"]) == 32
    assert info["KeyId"] == key_id
    assert info["Features"] == conf["features"]
    assert {"aes256gcm-4k-blocks", "per-file-keys", "siv-names", "long-names"} <= set(info["Features"])
    assert "aes256gcm-32k-blocks" not in info["Features"] and info["BlockSize"] == 4096
    counts = info["Counts"]
    assert (counts["Files"], counts["Directories"], counts["Symlinks"]) == (3, 2, 2), counts
    assert counts["LongNames"] == 1
    assert info["Warnings"] == []
    text = encfs_ok("info", str(cipher), home=fs_home)
    assert info["FileSystemId"] in text and key_id in text and "siv-names" in text
    assert any(line.split() == ["format", "2"] for line in text.splitlines()), text
    assert any(line.startswith("verified   no ") for line in text.splitlines()), text
    assert_one_line_error(run_encfs("info", str(tmp_path), home=fs_home), "not an encfs filesystem")


def test_info_of_a_mountpoint_is_info_of_its_cipherdir(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            by_mp, by_dir = _info(mp, fs_home), _info(cipher, fs_home)
            text = encfs_ok("info", str(mp), home=fs_home)
        assert by_mp["CipherDir"] == str(cipher) and by_mp["MountPoint"] == str(mp)
        assert by_mp["FileSystemId"] == by_dir["FileSystemId"] and by_mp["Lock"].startswith("mounted read-write")
        assert any(line.split() == ["mountpoint", str(mp)] for line in text.splitlines()), text
        assert_one_line_error(run_encfs("info", str(mp), home=fs_home), "not an encfs filesystem")


# -- 6. --allow-other ----------------------------------------------------------------------------------------

@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="encfs-cli-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for mp in d.iterdir():
            if is_mounted(mp):
                force_cleanup(mp, [])
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody_cat(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, "cat", str(path)], capture_output=True, text=True, timeout=30)


def test_allow_other_lets_the_kernel_check_modes(public_dir: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(public_dir, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", "--allow-other", str(cipher), str(mp), home=fs_home)
        assert "default_permissions" in _mount_options(mp)
        os.chmod(mp, 0o755)
        (mp / "public").write_text("for everyone")
        (mp / "public").chmod(0o644)
        (mp / "private").write_text("root only")
        (mp / "private").chmod(0o600)
        ok = _as_nobody_cat(mp / "public")
        assert ok.returncode == 0 and ok.stdout == "for everyone", ok.stderr
        denied = _as_nobody_cat(mp / "private")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        encfs_ok("umount", str(mp), home=fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        denied = _as_nobody_cat(mp / "public")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        assert (mp / "public").read_text() == "for everyone"  # root still can: it mounted it
        assert "default_permissions" not in _mount_options(mp)  # the mounting user alone: the daemon checks


def test_locks_hold_between_processes_of_different_users(public_dir: Path, fs_home: Path) -> None:
    """fcntl and flock locks taken through an --allow-other mount hold against another user's
    process (the kernel keeps them: the daemon answers no lock requests)."""
    cipher, mp = new_fs(public_dir, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", "--allow-other", str(cipher), str(mp), home=fs_home)
        os.chmod(mp, 0o755)
        target = mp / "locked"
        target.write_text("x")
        target.chmod(0o666)
        probe = ("import fcntl, sys\nf = open(sys.argv[1], 'r+')\n"
                 "for take in (lambda: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB),\n"
                 "             lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)):\n"
                 "    try:\n        take(); print('got')\n    except BlockingIOError:\n        print('blocked')\n")

        def other_user() -> list[str]:
            proc = subprocess.run([*NOBODY, sys.executable, "-c", probe, str(target)], capture_output=True,
                                  text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split()

        assert other_user() == ["got", "got"]  # free: the probe takes both and lets go on exit
        with open(target, "r+") as posix, open(target, "r+") as whole:
            fcntl.lockf(posix, fcntl.LOCK_EX)
            fcntl.flock(whole, fcntl.LOCK_EX)
            assert other_user() == ["blocked", "blocked"]
        assert other_user() == ["got", "got"]
        encfs_ok("umount", str(mp), home=fs_home)


def _mount_options(mp: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return next(line.split()[3] for line in f if line.split()[1] == str(mp)).split(",")


@pytest.mark.parametrize("allow, extra, kernel_checks", [
    (False, [], False), (True, [], True), (False, ["allow_other"], True), (False, ["allow_root"], True),
    (False, ["default_permissions"], True), (True, ["default_permissions,noexec"], True),
])
def test_kernel_checks_modes_whenever_other_users_get_in(allow: bool, extra: list[str],
                                                          kernel_checks: bool) -> None:
    from encfs.fuse.mount import MountOptions, _fuse_options

    options = _fuse_options(Path("/c"), MountOptions(allow_other=allow, extra=extra))
    assert options.count("default_permissions") == int(kernel_checks), options
    assert len(options) == len(set(options)) and "fsname=/c" in options


# -- 7. fstab and mount(8) ------------------------------------------------------------------------------------

@pytest.fixture
def mount_helper(fs_home: Path) -> Iterator[Path]:
    # One test at a time holds /sbin/mount.fuse.encfs (xdist workers share it): otherwise one
    # worker puts back the file it saved while another's test still runs mount(8) through it.
    lock = os.open(HELPER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 240
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{HELPER_LOCK} held for 240 s"
            time.sleep(0.1)
    saved = HELPER.read_bytes() if HELPER.exists() else None
    try:
        # --force: a helper of another checkout may be there; it is put back below
        encfs_ok("install-mount-helper", "--force", "--path", str(HELPER), home=fs_home)
        assert os.access(HELPER, os.X_OK)
        yield HELPER
    finally:
        if saved is None:
            HELPER.unlink(missing_ok=True)
        else:
            HELPER.write_bytes(saved)
        os.close(lock)  # releases the flock


@contextmanager
def fstab_line(line: str) -> Iterator[None]:
    fstab = Path("/etc/fstab")
    saved = fstab.read_bytes()
    try:
        with open(fstab, "ab") as f:
            f.write(b"" if saved.endswith(b"\n") or not saved else b"\n")
            f.write(line.encode() + b"\n")
        yield
    finally:
        fstab.write_bytes(saved)
        assert fstab.read_bytes() == saved


def _system_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MINIMAL_ENV, *args], capture_output=True, text=True, timeout=60, cwd="/")


def test_mount_helper_mounts_from_mount_8_and_fstab(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "file").write_text("from fstab")
        # mount -t: minimal environment, the home only from -o
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"home={fs_home}", str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mp)
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        assert (mp / "file").read_text() == "from fstab"
        (mp / "written").write_text("rw")
        proc = _system_mount("umount", str(mp))
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(pids, 30)

        # read-only through -o ro
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"ro,home={fs_home}", str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert (mp / "written").read_text() == "rw"
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        expect_errno(errno.EROFS, (mp / "written").write_text, "x")
        assert _system_mount("umount", str(mp)).returncode == 0
        assert not is_mounted(mp)

        # an fstab line: `mount MOUNTPOINT`
        with fstab_line(f"{cipher} {mp} fuse.encfs defaults,noauto,home={fs_home} 0 0"):
            proc = _system_mount("mount", str(mp))
            assert proc.returncode == 0, proc.stderr
            assert (mp / "file").read_text() == "from fstab"
            pids = daemon_pids(cipher)
            proc = _system_mount("umount", str(mp))
            assert proc.returncode == 0, proc.stderr
            assert not is_mounted(mp)
            assert wait_gone(pids, 30)


def test_remount_ro_and_rw_through_mount_8(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    """mount -o remount,ro|rw reaches `encfs CIPHERDIR MOUNTPOINT -o remount,...` through the helper:
    the kernel flag flips and the daemon goes on; a read-only daemon is not made writable."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        (mp / "before").write_text("rw")
        proc = _system_mount("mount", "-o", "remount,ro", str(mp))
        assert proc.returncode == 0, proc.stderr
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        assert (mp / "before").read_text() == "rw"
        assert "nosuid" in _mount_options(mp) and "nodev" in _mount_options(mp)  # the remount kept them
        proc = _system_mount("mount", "-o", "remount,rw", str(mp))
        assert proc.returncode == 0, proc.stderr
        (mp / "after").write_text("rw again")
        encfs_ok("umount", str(mp), home=fs_home)
        encfs_ok("mount", "--read-only", str(cipher), str(mp), home=fs_home)
        proc = _system_mount("mount", "-o", "remount,rw", str(mp))
        assert proc.returncode != 0 and "mounted read-only" in proc.stderr, proc.stderr
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        assert (mp / "after").read_text() == "rw again"
        encfs_ok("umount", str(mp), home=fs_home)


@pytest.mark.parametrize("engine, direct", [("libaio", 1), ("io_uring", 0), ("mmap", 0)])
def test_umount_after_heavy_fio_never_finds_the_mount_busy(engine: str, direct: int, tmp_path: Path,
                                                            fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        proc = subprocess.run(["fio", "--name=t", f"--directory={mp}", "--rw=randrw", "--bs=4k", "--size=16m",
                               "--numjobs=2", f"--ioengine={engine}", "--iodepth=16", f"--direct={direct}",
                               "--runtime=2", "--time_based"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        encfs_ok("umount", str(mp), home=fs_home)  # at once, not EBUSY
        assert not is_mounted(mp)


def test_a_root_mount_is_nodev_nosuid_unless_asked(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        os.mknod(mp / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        assert {"nodev", "nosuid"} <= set(_mount_options(mp))
        expect_errno(errno.EACCES, (mp / "null").write_bytes, b"x")  # nodev: device nodes do not open
        encfs_ok("umount", str(mp), home=fs_home)
        encfs_ok("mount", "-o", "dev,suid", str(cipher), str(mp), home=fs_home)
        assert not {"nodev", "nosuid"} & set(_mount_options(mp))
        (mp / "null").write_bytes(b"x")  # /dev/null's device: the write vanishes
        encfs_ok("umount", str(mp), home=fs_home)


def test_a_mount_right_after_umount_finds_the_cipherdir_free(tmp_path: Path, fs_home: Path) -> None:
    """`encfs umount` returns once the daemon has let go of the CIPHERDIR's lock."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        for i in range(5):
            encfs_ok("mount", str(cipher), str(mp), home=fs_home)
            (mp / f"f{i}").write_text(str(i))
            encfs_ok("umount", str(mp), home=fs_home)
            assert not mountlock.serves_read_write(cipher, str(mp))  # at once: the daemon has let go
            encfs_ok("mount", "--read-only", str(cipher), str(mp), home=fs_home)
            assert sorted(p.name for p in mp.iterdir()) == [f"f{j}" for j in range(i + 1)]
            encfs_ok("umount", str(mp), home=fs_home)


def test_mount_helper_failure_is_one_line(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"home={tmp_path / 'nowhere'}", str(cipher),
                             str(mp))
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert "encfs: no key store at " in proc.stderr, proc.stderr
        assert not is_mounted(mp)
        assert daemon_pids(cipher) == []


# -- 8. init errors ----------------------------------------------------------------------------------------------

def test_init_errors_leave_no_half_initialised_directory(world, tmp_path: Path, fs_home: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("mine")
    assert_one_line_error(run_encfs("init", str(full), "--key", "fs", home=fs_home), "not empty")
    assert sorted(os.listdir(full)) == ["precious"]
    assert_one_line_error(run_encfs("init", str(full / "precious"), "--key", "fs", home=fs_home), "precious")
    assert (full / "precious").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_encfs("init", str(empty), "--key", "no-such-key", home=fs_home), "no-such-key")
    assert os.listdir(empty) == []
    new = tmp_path / "new"
    assert_one_line_error(run_encfs("init", str(new), "--key", "no-such-key", home=fs_home), "no-such-key")
    assert not new.exists()

    assert_one_line_error(run_encfs("init", str(empty), "--key", "dis", home=world["dis_home"]), "disabled")
    assert os.listdir(empty) == []
    assert_one_line_error(run_encfs("init", str(new), "--key", "dis", home=world["dis_home"]), "disabled")
    assert not new.exists()


def test_daemonized_mount_prompts_for_the_pin_before_forking(tmp_path: Path) -> None:
    """A vendor token with no PIN source: the parent asks on the terminal, the daemon uses it."""
    from encfs.keys.softhsm import EmbeddedSoftHSM

    emb = EmbeddedSoftHSM(tmp_path / "vendor")
    emb.provision()
    pin = emb.user_pin.read_text()
    env = dict(os.environ, SOFTHSM2_CONF=str(emb.conf), ENCFS_HOME=str(tmp_path / "home"))
    flags = ["--pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "--token", "encfs"]
    cmd = [sys.executable, "-m", "encfs"]
    for args in (["hsm", "init"], ["key", "create", "--alias", "v"], ["init", str(tmp_path / "c"), "--key", "v"]):
        r = subprocess.run(cmd + args + flags + ["--pin-file", str(emb.user_pin)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        code, out, prompts = run_on_terminal(cmd + ["mount", str(tmp_path / "c"), str(mnt)] + flags, env,
                                             {b"PIN for token": pin}, timeout=60)
        assert prompts == 1, out
        assert code == 0, out
        (mnt / "x").write_text("hello")
        assert (mnt / "x").read_text() == "hello"
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)


# -- 7. content block size --------------------------------------------------------------------------------

def test_init_block_size_4096_and_32768(tmp_path: Path, fs_home: Path) -> None:
    """Both block sizes mount and hold the same data; the backing file has that size's framing."""
    data = os.urandom(3 * 32768 + 5000)
    for block in (4096, 32768):
        cipher, mp = tmp_path / f"c{block}", tmp_path / f"p{block}"
        mp.mkdir()
        out = encfs_ok("init", str(cipher), "--key", "fs", "--block-size", str(block), home=fs_home)
        assert f"({block // 1024} KiB blocks)" in out
        with guard(cipher, mp):
            with Mount(cipher, mp, fs_home):
                (mp / "f").write_bytes(data)
            with Mount(cipher, mp, fs_home):
                assert (mp / "f").read_bytes() == data
        info = _info(cipher, fs_home)
        assert info["BlockSize"] == block
        assert f"aes256gcm-{block // 1024}k-blocks" in info["Features"]
        backing = [p for p in cipher.iterdir() if "." not in p.name]
        full, rest = divmod(len(data), block)
        assert [p.stat().st_size for p in backing] == [128 + full * (block + 28) + rest + 28]


def test_init_refuses_other_block_sizes(tmp_path: Path, fs_home: Path) -> None:
    proc = run_encfs("init", str(tmp_path / "c"), "--key", "fs", "--block-size", "8192", home=fs_home)
    assert proc.returncode != 0 and b"--block-size" in proc.stderr
    assert not (tmp_path / "c").exists()
