"""What `encfs rekey` and the commands that refuse an interrupted re-key print after a kill -9:
a refusal is one line (no warning before it), and a resumed run reports what it did. Real token,
real CLI processes."""

from __future__ import annotations

import os
from pathlib import Path

import test_rekey_rewrap
from conftest import run_encfs
from fuse_helpers import Mount
from rekey_kills import killed_at
from test_rekey_rewrap import ok

from encfs.fuse.rewrap import MARKER

home = test_rekey_rewrap.home  # the fixture: a home with CMKs "a" and "b"


def make(tmp_path: Path, home: Path, files: int = 6) -> Path:
    """A filesystem of a few files with random (wrapped) keys: a header each for a re-wrap."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a", "--wrapped-file-keys")
    with Mount(cipher, plain, home):
        for i in range(files):
            (plain / f"f{i}").write_bytes(os.urandom(1000 * i + 1))
    return cipher


def one_line(home: Path, *args: str | Path) -> str:
    """The refusal of `encfs ARGS`: exactly one line on stderr, and nothing else."""
    p = run_encfs(*map(str, args), home=home)
    err = p.stderr.decode()
    assert p.returncode != 0 and err.count("\n") == 1 and err.startswith("encfs: "), (p.returncode, err)
    assert "warning" not in err and "Traceback" not in err, err
    return err


def test_refusals_after_a_killed_full_rekey_are_one_line(tmp_path: Path, home: Path) -> None:
    """The killed run's lock record says "mounted" by a dead pid: that it did not end cleanly is
    what its marker says already, and the refusals name the command that finishes it."""
    cipher = make(tmp_path, home)
    killed_at(home, "rekeyed", 2, "rekey", cipher, "--full", "--key", "b")
    assert (cipher / MARKER).exists()
    assert "--full" in one_line(home, "rekey", cipher, "--key", "b")
    assert "encfs rekey --full" in one_line(home, "recovery-key", "remove", cipher)
    assert "encfs rekey --full" in one_line(home, "fsck", cipher)
    out = run_encfs("rekey", str(cipher), "--full", "--key", "b", home=home)
    assert out.returncode == 0 and b"did not end cleanly" not in out.stderr, out.stderr
    assert not (cipher / MARKER).exists()


def test_a_resumed_rewrap_counts_the_headers_its_replay_wrote(tmp_path: Path, home: Path) -> None:
    """Killed once the third of the batch's six headers was written: the rerun's replay writes the
    other three (the config follows), and it says so rather than "re-wrapped 0 file keys"."""
    cipher = make(tmp_path, home)
    killed_at(home, "header", 3, "rekey", cipher, "--key", "b")
    out = ok(home, "rekey", cipher, "--key", "b")
    assert "re-wrapped 3 file keys and the filesystem key" in out, out


def test_a_resumed_full_rekey_or_recovery_key_add_says_so_without_a_stray_comma(tmp_path: Path, home: Path) -> None:
    cipher = make(tmp_path, home)
    killed_at(home, "rekeyed", 2, "rekey", cipher, "--full", "--key", "b")
    out = ok(home, "rekey", cipher, "--full", "--key", "b")
    assert ", finishing an interrupted re-key (" in out, out
    rk = tmp_path / "fs.rk"
    killed_at(home, "rekeyed", 2, "recovery-key", "add", cipher, "--new-recovery-key", rk)
    out = ok(home, "recovery-key", "add", cipher, "--new-recovery-key", rk)
    assert ", finishing an interrupted add; " in out, out
