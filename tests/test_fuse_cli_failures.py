"""`encfs mount` and `init` failures, driven as a user would: every failure is one line
``encfs: <cause>`` and leaves nothing behind (no mount, no daemon, no half-initialised directory,
no token provisioned in a mistyped home).

The module-scoped ``world`` fixture makes the shared state once: a template filesystem, a home
whose key is disabled, another home, a wrong-PIN home. Every test that mounts something runs
inside ``guard(cipherdir, mountpoint)`` (fuse_cli_helpers.py), which leaves nothing mounted and no
daemon behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_encfs
from fsconfig_tool import remac
from fuse_cli_helpers import assert_one_line_error, daemon_pids, encfs_ok, guard, mount_count, new_fs
from fuse_helpers import Mount

from encfs.fuse.fsconfig import features_for
from encfs.fuse.mount import is_mounted

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


# -- mount failures ------------------------------------------------------------------------------

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


# -- init errors ----------------------------------------------------------------------------------------------

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
