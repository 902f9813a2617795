"""Broken state directories end in one clear line, never an internal error (issue #18, item 8).

Each case runs the real CLI on a real embedded token: an unwritable audit log, a state
directory another user owns, a damaged softhsm2.conf, a lost or damaged keys.json. Each
must print one line ``encfs: <cause>`` naming the path, exit non-zero but not 70 (the
internal-error code), change nothing, and work again once the damage is undone. A lost
keys.json comes back from its copy, keys.json.bak, with a warning; with both lost, a
token that still holds keys refuses instead of listing none.

Cases needing another user run as uid 65534 through setpriv, like test_fuse_unprivileged.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_encfs

from encfs.fuse.mount import is_mounted
from encfs.keys.softhsm import EmbeddedSoftHSM, softhsm_module

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
SECRET = b"kept safe through every failure"


def one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode not in (0, 70), (proc.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1 and err.startswith("encfs: "), f"not one 'encfs: ' line: {err!r}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def ok(*args: str, home: Path, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    proc = run_encfs(*args, home=home, input=input)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def token_objects(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "softhsm" / "tokens").glob("*/*.object") if p.name != "token.object")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An embedded token holding two keys ('a' and 'b'); tmp_path/blob is SECRET under 'a'."""
    home = tmp_path / "home"
    ok("hsm", "init", home=home)
    ok("key", "create", "--alias", "a", home=home)
    ok("key", "create", "--alias", "b", home=home)
    (tmp_path / "blob").write_bytes(ok("key", "encrypt", "a", home=home, input=SECRET).stdout)
    return home


def still_works(home: Path) -> None:
    """Nothing was lost: both keys are listed and the old blob still decrypts."""
    listed = ok("key", "list", home=home).stdout.decode()
    assert len([line for line in listed.splitlines()[1:] if line.strip()]) == 2, listed
    blob = (home.parent / "blob").read_bytes()
    assert ok("key", "decrypt", home=home, input=blob).stdout == SECRET


# -- the audit log ---------------------------------------------------------------------------


def test_unwritable_audit_log_refuses_before_acting(home: Path, tmp_path: Path) -> None:
    log = home / "audit.log"
    log.rename(tmp_path / "audit.saved")
    log.mkdir()  # root writes any file; a directory in its place it cannot
    keys, objects = (home / "keys.json").read_bytes(), token_objects(home)
    for args, stdin in ((("key", "create", "--alias", "c"), b""), (("key", "list"), b""),
                        (("key", "encrypt", "a"), b"x"), (("key", "rotate", "a"), b"")):
        one_line_error(run_encfs(*args, home=home, input=stdin), "cannot write the audit log", str(log),
                       "Is a directory")
    assert (home / "keys.json").read_bytes() == keys and token_objects(home) == objects
    cipher, mp = tmp_path / "cipher", tmp_path / "plain"
    mp.mkdir()
    one_line_error(run_encfs("init", str(cipher), "--key", "a", home=home), str(log))
    assert not cipher.exists()
    log.rmdir()
    (tmp_path / "audit.saved").rename(log)
    still_works(home)


# -- another user's files (as uid 65534) -----------------------------------------------------


@pytest.fixture
def nobody_world() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="encfs-state-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as_nobody(world: Path, home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    from test_fuse_unprivileged import _user_python

    python, pyenv = _user_python(world)
    env = dict(os.environ, ENCFS_HOME=str(home), **pyenv)
    env.pop("SOFTHSM2_CONF", None)
    return subprocess.run([*SETPRIV, python, "-m", "encfs", *args], env=env, capture_output=True,
                          timeout=120, cwd=world, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_state_directory_of_another_user(nobody_world: Path) -> None:
    home = nobody_world / "root-home"
    ok("hsm", "init", home=home)  # root's home, mode 0700
    ok("key", "create", "--alias", "a", home=home)
    before = sorted(p.name for p in home.iterdir())
    for args in (("key", "list"), ("key", "create", "--alias", "mine"), ("hsm", "init"),
                 ("init", str(nobody_world / "c"), "--key", "a")):
        one_line_error(run_as_nobody(nobody_world, home, *args), str(home), "owner root (uid 0)", "mode 0700",
                       "uid 65534")
    assert sorted(p.name for p in home.iterdir()) == before
    assert not (nobody_world / "c").exists()
    assert "Enabled" in ok("key", "list", home=home).stdout.decode()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_audit_log_of_another_user(nobody_world: Path) -> None:
    """Root ran a command in a user's home: the user meets root's 0600 audit log."""
    home = nobody_world / "home"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    assert run_as_nobody(nobody_world, home, "hsm", "init").returncode == 0
    proc = run_as_nobody(nobody_world, home, "key", "create", "--alias", "a")
    assert proc.returncode == 0, proc.stderr
    log = home / "audit.log"
    os.chown(log, 0, 0)
    keys = (home / "keys.json").read_bytes()
    one_line_error(run_as_nobody(nobody_world, home, "key", "create", "--alias", "b"), "cannot write the audit log",
                   str(log), "Permission denied")
    assert (home / "keys.json").read_bytes() == keys
    os.chown(log, NOBODY, NOBODY)
    assert run_as_nobody(nobody_world, home, "key", "create", "--alias", "b").returncode == 0


# -- softhsm2.conf -------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "needles"), [
    ("this line is garbage\n", ("damaged", "line 1 is not 'name = value'")),
    ("", ("damaged", "names no token directory", "directories.tokendir")),
    ("# a comment only\nlog.level = ERROR\n", ("names no token directory",)),
    ("directories.tokendir = /nonexistent/tokens\n", ("/nonexistent/tokens", "does not exist")),
], ids=["garbage", "empty", "no-tokendir", "missing-tokendir"])
def test_broken_softhsm2_conf(content: str, needles: tuple[str, ...], home: Path) -> None:
    conf = home / "softhsm" / "softhsm2.conf"
    good = conf.read_bytes()
    conf.write_text(content)
    objects = token_objects(home)
    blob = (home.parent / "blob").read_bytes()
    for args, stdin in ((("key", "encrypt", "a"), b"x"), (("key", "decrypt"), blob), (("hsm", "status"), b""),
                        (("key", "create"), b"")):
        msg = one_line_error(run_encfs(*args, home=home, input=stdin), str(conf), *needles)
        assert not msg.rstrip().endswith(":"), msg
    assert token_objects(home) == objects
    conf.write_bytes(good)
    still_works(home)


def test_vendor_module_with_broken_softhsm2_conf(tmp_path: Path) -> None:
    """Not encfs's own token: the module's failure is named, with the config that caused it."""
    emb = EmbeddedSoftHSM(tmp_path / "vendor")
    emb.provision()
    sel = ("--pkcs11-module", softhsm_module(), "--token", "encfs", "--pin-file", str(emb.user_pin))
    ok_env = {"SOFTHSM2_CONF": str(emb.conf)}
    assert run_encfs("hsm", "init", *sel, home=tmp_path / "home", env=ok_env).returncode == 0
    emb.conf.write_text(f"directories.tokendir = {tmp_path / 'gone'}\n")
    proc = run_encfs("hsm", "status", *sel, home=tmp_path / "home", env=ok_env)
    msg = one_line_error(proc, "cannot load PKCS#11 module", f"SOFTHSM2_CONF={emb.conf}")
    assert not msg.rstrip().endswith(":"), msg


# -- keys.json -------------------------------------------------------------------------------


def test_deleted_keys_json_comes_back_from_its_copy(home: Path) -> None:
    keys = home / "keys.json"
    saved = keys.read_bytes()
    assert (home / "keys.json.bak").read_bytes() == saved  # every metadata write keeps the copy
    keys.unlink()
    proc = ok("key", "list", home=home)
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("encfs: warning: "), err
    assert str(keys) in err and "keys.json.bak" in err and "restored" in err
    assert len(proc.stdout.decode().splitlines()) == 3  # header and both keys
    assert keys.read_bytes() == saved
    assert ok("key", "list", home=home).stderr == b""  # repaired: no more warnings
    still_works(home)


def test_damaged_keys_json_comes_back_from_its_copy(home: Path) -> None:
    keys = home / "keys.json"
    saved = keys.read_bytes()
    keys.write_bytes(saved[: len(saved) // 2])  # torn
    proc = ok("key", "encrypt", "b", home=home, input=b"y")
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "damaged" in err and "keys.json.bak" in err, err
    # What the copy held, and the encrypt itself counted (a backing key's nonce budget, FORMAT.md §2,
    # and its use by "other", §4).
    assert uncounted(keys.read_bytes()) == uncounted(saved)
    assert blobs(keys.read_bytes()) == blobs(saved) + 1
    still_works(home)


def uncounted(raw: bytes) -> dict:
    doc = json.loads(raw)
    for rec in doc["keys"].values():
        for v in rec["versions"]:
            v.pop("sealed", None)
            v.pop("used_by", None)
    return doc


def blobs(raw: bytes) -> int:
    return sum(v.get("sealed", 0) for rec in json.loads(raw)["keys"].values() for v in rec["versions"])


def test_lost_key_metadata_refuses_while_the_token_holds_keys(home: Path, tmp_path: Path) -> None:
    keys, bak = home / "keys.json", home / "keys.json.bak"
    saved = keys.read_bytes()
    keys.unlink()
    bak.unlink()
    objects = token_objects(home)
    for args in (("key", "list"), ("key", "create", "--alias", "c"), ("key", "create"), ("key", "describe", "a")):
        one_line_error(run_encfs(*args, home=home), str(keys), "keys.json.bak", "missing", "2 encfs key object")
    assert token_objects(home) == objects and not keys.exists() and not bak.exists()
    # A filesystem under one of the keys cannot be mounted either, but says why.
    keys.write_bytes(saved)
    cipher, mp = tmp_path / "cipher", tmp_path / "plain"
    mp.mkdir()
    ok("init", str(cipher), "--key", "a", home=home)
    keys.unlink()
    bak.unlink(missing_ok=True)
    one_line_error(run_encfs("mount", str(cipher), str(mp), home=home), "keys.json", "missing")
    assert not is_mounted(mp)
    keys.write_bytes(saved)  # the user restores it from a backup
    still_works(home)


def test_damaged_keys_json_without_copy_refuses(home: Path) -> None:
    keys, bak = home / "keys.json", home / "keys.json.bak"
    saved = keys.read_bytes()
    bak.unlink()
    keys.write_text("{not json")
    one_line_error(run_encfs("key", "list", home=home), str(keys), "damaged", "keys.json.bak is missing")
    keys.write_bytes(saved)
    still_works(home)


def test_new_home_lists_no_keys_quietly(tmp_path: Path) -> None:
    ok("hsm", "init", home=tmp_path / "fresh")
    proc = ok("key", "list", home=tmp_path / "fresh")
    assert proc.stderr == b"" and len(proc.stdout.decode().splitlines()) == 1


def test_copy_that_cannot_be_written_is_reported_and_the_change_kept(home: Path) -> None:
    bak = home / "keys.json.bak"
    bak.unlink()
    bak.mkdir()  # nothing can be renamed over it (and it cannot be unlinked)
    proc = ok("key", "create", "--alias", "c", home=home)
    err = "".join(line for line in proc.stderr.decode().splitlines(True)
                  if not line.startswith("encfs: note: back up"))  # key create's backup reminder
    assert err.count("\n") == 1 and err.startswith("encfs: warning: ") and str(bak) in err, err
    assert "alias/c" in (home / "keys.json").read_text()  # the change itself is made and kept
    bak.rmdir()
    ok("key", "create", "--alias", "d", home=home)  # the next write brings the copy back
    assert bak.read_bytes() == (home / "keys.json").read_bytes()


# -- a file no code path expected ------------------------------------------------------------


def test_unexpected_os_error_still_names_its_file(tmp_path: Path, fs_home: Path) -> None:
    """The last net: an OSError that names a file is that file and its cause, not an internal error."""
    missing = tmp_path / "no-such-dir"
    proc = run_encfs("install-mount-helper", "--path", str(missing / "mount.fuse.encfs"), home=fs_home)
    one_line_error(proc, str(missing), "No such file or directory")
    assert proc.returncode == 74
    # The same in a daemon that fails before it is ready: its parent prints the daemon's line.
    cipher, mp = tmp_path / "cipher", tmp_path / "plain"
    mp.mkdir()
    ok("init", str(cipher), "--key", "fs", home=fs_home)
    proc = run_encfs("mount", str(cipher), str(mp), "--log-file", str(missing / "daemon.log"), home=fs_home)
    one_line_error(proc, str(missing / "daemon.log"), "No such file or directory")
    assert not is_mounted(mp)
