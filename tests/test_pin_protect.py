"""The embedded token's PINs sealed under a passphrase (encfs.keys.pinseal, `encfs hsm
protect-pin` / `unprotect-pin`, `encfs hsm init --protect-pin`): real CLI processes, each with
its own embedded SoftHSM2 token; a real terminal (pty) for the prompts and a real FUSE mount
for the daemon."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from encfs.fuse.mount import is_mounted
from tests.conftest import run_encfs
from tests.fuse_cli_helpers import assert_one_line_error, guard
from tests.procs import run_on_terminal

PASS = "correct horse battery staple"


def ok(*args: str, home: Path) -> bytes:
    r = run_encfs(*args, home=home)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def state_files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    return str(path)


def test_protect_unprotect_and_change_passphrase(tmp_path: Path, cli_home: Path) -> None:
    good, bad = secret_file(tmp_path, "good", PASS), secret_file(tmp_path, "bad", "not the passphrase")
    new = secret_file(tmp_path, "new", "another long passphrase")
    ok("hsm", "init", home=cli_home)
    ok("key", "create", "--alias", "app", home=cli_home)
    blob = ok("key", "encrypt", "app", "--base64", home=cli_home)
    d = cli_home / "softhsm"
    pins = {name: (d / name).read_bytes() for name in ("user.pin", "so.pin")}

    assert b"sealed under a passphrase" in ok("hsm", "protect-pin", "--passphrase-file", good, home=cli_home)
    assert not (d / "user.pin").exists() and not (d / "so.pin").exists()
    assert stat.S_IMODE((d / "pins.sealed").stat().st_mode) == 0o600
    for data in state_files(cli_home).values():  # neither PIN is anywhere in the state directory
        assert all(pin not in data for pin in pins.values())

    # every command that needs the token asks; without a terminal or passphrase file: one line
    assert_one_line_error(run_encfs("key", "decrypt", "--base64", input=blob, home=cli_home),
                          "no terminal to ask for the passphrase")
    before = state_files(cli_home)
    assert_one_line_error(run_encfs("key", "decrypt", "--base64", "--passphrase-file", bad, input=blob,
                                    home=cli_home), "wrong passphrase")
    assert_one_line_error(run_encfs("hsm", "unprotect-pin", "--passphrase-file", bad, home=cli_home),
                          "wrong passphrase")
    assert_one_line_error(run_encfs("hsm", "protect-pin", "--passphrase-file", bad, "--new-passphrase-file",
                                    new, home=cli_home), "wrong passphrase")
    after = state_files(cli_home)
    after.pop("audit.log"), before.pop("audit.log")  # failures are audited; nothing else changed
    assert after == before
    r = run_encfs("key", "decrypt", "--base64", "--passphrase-file", good, input=blob, home=cli_home)
    assert r.returncode == 0 and r.stdout == b"", r.stderr  # encrypted an empty stdin

    ok("hsm", "protect-pin", "--passphrase-file", good, "--new-passphrase-file", new, home=cli_home)
    assert_one_line_error(run_encfs("hsm", "status", "--passphrase-file", good, home=cli_home), "wrong passphrase")
    ok("hsm", "status", "--passphrase-file", new, home=cli_home)

    ok("hsm", "unprotect-pin", "--passphrase-file", new, home=cli_home)
    assert {name: (d / name).read_bytes() for name in ("user.pin", "so.pin")} == pins
    assert not (d / "pins.sealed").exists()
    r = run_encfs("key", "decrypt", "--base64", input=blob, home=cli_home)  # no passphrase needed any more
    assert r.returncode == 0, r.stderr
    assert_one_line_error(run_encfs("hsm", "unprotect-pin", "--passphrase-file", new, home=cli_home),
                          "not sealed")


def test_init_protect_pin_and_passphrase_rules(tmp_path: Path, cli_home: Path) -> None:
    short = secret_file(tmp_path, "short", "abc")
    assert_one_line_error(run_encfs("hsm", "init", "--protect-pin", "--passphrase-file", short, home=cli_home),
                          "shorter than 8")
    assert (cli_home / "softhsm" / "user.pin").exists()  # the token was made; its PIN stays plain
    good = secret_file(tmp_path, "good", PASS)
    out = ok("hsm", "init", "--protect-pin", "--passphrase-file", good, home=cli_home)
    assert b"sealed under a passphrase" in out
    ok("key", "create", "--alias", "k", "--passphrase-file", good, home=cli_home)
    assert_one_line_error(run_encfs("key", "create", "--passphrase-file", good, "--pkcs11-module",
                                    "/usr/lib/softhsm/libsofthsm2.so", home=cli_home), "--passphrase-file")


def test_daemonized_mount_asks_once_on_the_terminal(tmp_path: Path, cli_home: Path) -> None:
    """The parent asks for the passphrase before forking; the daemon logs in with the PIN it
    inherited in memory and never asks (it has no terminal)."""
    good = secret_file(tmp_path, "good", PASS)
    ok("hsm", "init", "--protect-pin", "--passphrase-file", good, home=cli_home)
    cipher, mnt = tmp_path / "c", tmp_path / "m"
    mnt.mkdir()
    ok("key", "create", "--alias", "fs", "--passphrase-file", good, home=cli_home)
    ok("init", str(cipher), "--key", "fs", "--passphrase-file", good, home=cli_home)
    env = dict(os.environ, ENCFS_HOME=str(cli_home))
    env.pop("SOFTHSM2_CONF", None)
    with guard(cipher, mnt):
        code, out, prompts = run_on_terminal([sys.executable, "-m", "encfs", "mount", str(cipher), str(mnt)], env,
                                          {b"passphrase for token": PASS})
        assert code == 0 and prompts == 1, out
        assert is_mounted(mnt)
        (mnt / "x").write_text("hello")  # new file: a data key from the token, in the daemon
        assert (mnt / "x").read_text() == "hello"
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, capture_output=True, timeout=30)


def test_sealed_file_damage_and_parameters(tmp_path: Path) -> None:
    import json

    import pytest

    from encfs.errors import PinIncorrect, StateError
    from encfs.keys import pinseal

    where = tmp_path / "pins.sealed"
    data = pinseal.seal({"so": "s0", "user": "u1"}, PASS)
    doc = json.loads(data)
    assert (doc["n"], doc["r"], doc["p"]) == (2**17, 8, 1) and doc["format"] == 1
    assert pinseal.unseal(data, PASS, where) == {"so": "s0", "user": "u1"}
    with pytest.raises(PinIncorrect):
        pinseal.unseal(data, PASS + "x", where)
    for change in ({"n": 2**23}, {"n": 1000}, {"format": 2}, {"kdf": "pbkdf2"}, {"nonce": "AAAA"}, {"salt": "!"}):
        with pytest.raises(StateError, match="damaged"):
            pinseal.unseal(json.dumps({**doc, **change}).encode(), PASS, where)
    with pytest.raises(StateError, match="damaged"):
        pinseal.unseal(b"not json", PASS, where)
