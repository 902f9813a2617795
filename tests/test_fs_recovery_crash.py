"""A filesystem's recovery key across kills and tampering (issue #23 review, docs/FORMAT.md
§6.10), through the real CLI, a real token and real mounts: a killed `recovery-key add` is
finished by the same command (a real SIGKILL in its re-key; a kill between its marker and
its config, with --new-recovery-key), a mount by the recovery key and `rekey --recovery-key`
work whatever re-key was interrupted, a planted older config copy does not bring a removed
recovery key back, and a recovery key file is 64 hex digits."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import init_home, run_encfs
from fuse_helpers import Mount
from test_fs_recovery_key import new_key, ok

from encfs.errors import ConfigError
from encfs.recoverykey import read_recovery_key


def add_marker(cipherdir: Path, key: str) -> None:
    """The marker `recovery-key add` writes before its key file and config (rewrap.py)."""
    marker = {"version": 1, "operation": "full", "key_id": key, "recovering": False, "adding": True}
    (cipherdir / "encfs.rekey").write_text(json.dumps(marker) + "\n")


def test_a_planted_old_copy_does_not_bring_a_removed_recovery_key_back(tmp_path: Path, fs_home: Path) -> None:
    """Someone who can write the backing store but has no key copies a pre-removal encfs.conf
    over the backup: the copy without the recovery key wins (and is written back), as it does
    after a `remove` killed between its two copies; only an add's marker lets the other win."""
    cipherdir, key, rk = tmp_path / "cipher", new_key(fs_home), tmp_path / "fs.rk"
    ok("init", str(cipherdir), "--key", key, "--new-recovery-key", str(rk), home=fs_home)
    with_key = (cipherdir / "encfs.conf").read_bytes()
    ok("recovery-key", "remove", str(cipherdir), home=fs_home)
    (cipherdir / "encfs.conf.bak").write_bytes(with_key)  # the whole attack: one file copied back

    out = json.loads(ok("recovery-key", "add", str(cipherdir), "--recovery-key", str(rk), "--json", home=fs_home))
    assert out["AlreadySet"] is False and out["Resumed"] is False

    ok("recovery-key", "remove", str(cipherdir), home=fs_home)
    without = (cipherdir / "encfs.conf").read_bytes()
    (cipherdir / "encfs.conf").write_bytes(with_key)  # a `remove` killed between its copies (backup first)
    gone = json.loads(ok("recovery-key", "remove", str(cipherdir), "--json", home=fs_home))
    assert gone["Changed"] is False  # nothing to remove: the copy without is the config...
    assert (cipherdir / "encfs.conf").read_bytes() == without  # ...and written back over the other


def test_add_killed_between_its_marker_and_config_is_finished_by_the_same_command(tmp_path: Path,
                                                                                  fs_home: Path) -> None:
    """A kill after the marker and the new key file, before the config: the same command (with
    --new-recovery-key) takes the key file it wrote; without an add's marker an existing file is
    refused before anything is written."""
    cipherdir, key, rk = tmp_path / "cipher", new_key(fs_home), tmp_path / "fs.rk"
    ok("init", str(cipherdir), "--key", key, home=fs_home)
    rk.write_text("ab" * 32 + "\n")
    rk.chmod(0o600)
    refused = run_encfs("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(rk), home=fs_home)
    assert refused.returncode == 2 and b"exists" in refused.stderr, refused.stderr
    assert not (cipherdir / "encfs.rekey").exists()

    add_marker(cipherdir, key)  # killed after writing rk, before the config
    out = json.loads(ok("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(rk), "--json",
                        home=fs_home))
    assert out["Resumed"] is True and not (cipherdir / "encfs.rekey").exists()
    assert rk.read_text() == "ab" * 32 + "\n"  # the key file is the one the config uses
    again = json.loads(ok("recovery-key", "add", str(cipherdir), "--recovery-key", str(rk), "--json", home=fs_home))
    assert again["AlreadySet"] is True



def test_the_first_add_after_a_crashed_mount_finishes_and_keeps_the_crash_recovery_due(tmp_path: Path,
                                                                                       fs_home: Path) -> None:
    """The lock record of a killed mount is taken over by add (a crash recovery is due): add
    finishes in one run, and leaves the record "mounted" so that the next mount still recovers."""
    cipherdir, plain, key, rk = tmp_path / "cipher", tmp_path / "plain", new_key(fs_home), tmp_path / "fs.rk"
    plain.mkdir()
    ok("init", str(cipherdir), "--key", key, "--wrapped-file-keys", home=fs_home)  # a file for add to re-key
    m = Mount(cipherdir, plain, fs_home)
    try:
        (plain / "f").write_bytes(b"written before the crash")
        os.sync()
    finally:
        m.kill9()
    out = json.loads(ok("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(rk), "--json",
                        home=fs_home))
    assert out["Files"] == 1 and not (cipherdir / "encfs.rekey").exists()
    assert json.loads((cipherdir / "encfs.lock").read_bytes())["state"] == "mounted"
    with Mount(cipherdir, plain, tmp_path / "no-token", "--recovery-key", str(rk)):
        assert (plain / "f").read_bytes() == b"written before the crash"

def test_the_recovery_key_moves_a_filesystem_whose_full_rekey_was_interrupted(tmp_path: Path,
                                                                              fs_home: Path) -> None:
    """The HSM is lost on a day an `encfs rekey --full` had been killed: its marker no longer
    stops `rekey --key NEW --recovery-key` (every file key is derived), which ends it."""
    cipherdir, key, rk = tmp_path / "cipher", new_key(fs_home), tmp_path / "fs.rk"
    ok("init", str(cipherdir), "--key", key, "--new-recovery-key", str(rk), home=fs_home)
    marker = {"version": 1, "operation": "full", "key_id": key, "recovering": False}
    (cipherdir / "encfs.rekey").write_text(json.dumps(marker) + "\n")

    new_home = init_home(tmp_path / "new-home")
    moved = json.loads(ok("rekey", str(cipherdir), "--key", new_key(new_home), "--recovery-key", str(rk), "--json",
                          home=new_home))
    assert moved["Damaged"] == [] and not (cipherdir / "encfs.rekey").exists()


def test_add_killed_in_its_rekey_mounts_by_the_key_and_is_finished_by_add(tmp_path: Path, fs_home: Path) -> None:
    """A real SIGKILL during add's re-key (lock record left "mounted" by the dead add): a mount
    by the recovery key serves the files already converted and answers EIO for the others;
    the same add then finishes the job and every file reads back by the key."""
    cipherdir, plain, key, rk = tmp_path / "cipher", tmp_path / "plain", new_key(fs_home), tmp_path / "fs.rk"
    plain.mkdir()
    ok("init", str(cipherdir), "--key", key, "--wrapped-file-keys", home=fs_home)  # random keys for `add`
    data = {f"f{i}": os.urandom(64 << 10) for i in range(150)}
    with Mount(cipherdir, plain, fs_home):
        for name, body in data.items():
            (plain / name).write_bytes(body)

    env = dict(os.environ, ENCFS_HOME=str(fs_home))
    env.pop("SOFTHSM2_CONF", None)
    add = subprocess.Popen([sys.executable, "-m", "encfs", "recovery-key", "add", str(cipherdir),
                            "--new-recovery-key", str(rk)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    done_log, deadline = cipherdir / "encfs.rekey.done", time.monotonic() + 60
    try:
        while add.poll() is None and time.monotonic() < deadline:  # until a file has its derived key
            if done_log.exists() and done_log.stat().st_size > 0:
                break
            time.sleep(0.001)
    finally:
        if add.poll() is None:
            os.killpg(add.pid, signal.SIGKILL)
        add.wait()
    if add.returncode == 0 or not (cipherdir / "encfs.rekey").exists():
        pytest.fail("add finished before it could be killed in its re-key: give it more files")

    no_token = tmp_path / "no-token"
    readable = eio = 0
    with Mount(cipherdir, plain, no_token, "--recovery-key", str(rk)):
        for name, body in data.items():
            try:
                assert (plain / name).read_bytes() == body  # never other bytes
                readable += 1
            except OSError as e:
                assert e.errno == errno.EIO, e
                eio += 1
    assert readable and eio, (readable, eio)

    proc = run_encfs("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(rk), "--json", home=fs_home)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["Resumed"] is True and not (cipherdir / "encfs.rekey").exists()
    with Mount(cipherdir, plain, no_token, "--recovery-key", str(rk)):
        for name, body in data.items():
            assert (plain / name).read_bytes() == body


def test_a_recovery_key_file_is_64_hex_digits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = os.urandom(32)
    good, typed, raw = tmp_path / "good", tmp_path / "typed", tmp_path / "raw"
    good.write_text(key.hex() + "\n")
    typed.write_text(key.hex()[:32])  # 32 bytes, all hex characters: half a key, not a raw one
    raw.write_bytes(key.replace(b"\x00", b"\x01")[:31] + b"\xff")
    for f in (good, typed, raw):
        f.chmod(0o600)
    assert read_recovery_key(str(good)) == key and len(read_recovery_key(str(raw))) == 32
    with pytest.raises(ConfigError, match="holds no recovery key"):
        read_recovery_key(str(typed))
    assert not caplog.records
    good.chmod(0o644)
    assert read_recovery_key(str(good)) == key
    assert len(caplog.records) == 1 and "readable by group and others" in caplog.records[0].getMessage()
    assert key.hex() not in caplog.text
