"""`encfs keyd` as a process among others: a second daemon on one state directory (#24)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keyd_rig import home_with_key, keyd


def keyd_exit(home: Path, sock: Path, seconds: float, what: str) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of `encfs keyd` on ``home``, which must end within
    ``seconds``; else it is killed and the test fails saying ``what`` it did."""
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.Popen([sys.executable, "-m", "encfs", "keyd", "--home", str(home), "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(what) from None
    return proc.returncode, out, err


def test_a_second_daemon_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home_with_key(home)
    with keyd(home, tmp_path / "one.sock") as first:
        status, _out, err = keyd_exit(home, tmp_path / "two.sock", 8,
                                      "a second key daemon serves the same token, policies and secrets")
        assert status == 75, err
        assert err.decode().startswith("encfs: another key daemon serves ") and err.count(b"\n") == 1, err
        assert not (tmp_path / "two.sock").exists()
        assert first.poll() is None


def test_a_daemon_with_a_wrong_pin_refuses_to_start(tmp_path: Path) -> None:
    """The worker logs in before the daemon serves: a wrong PIN is one line and exit 77 at start,
    not a daemon that answers every request "wrong PIN" (each a failed C_Login: a real HSM locks
    its user PIN after a few)."""
    home = tmp_path / "home"
    home_with_key(home)
    pin = home / "softhsm" / "user.pin"
    pin.write_text("X" * len(pin.read_text()))
    status, out, err = keyd_exit(home, tmp_path / "k.sock", 20, "a key daemon with a wrong PIN serves")
    assert status == 77, err
    assert err.decode() == "encfs: wrong PIN for token 'encfs'\n" and not out, (out, err)
