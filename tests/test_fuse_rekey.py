"""A file whose data key has spent its nonce budget gets a fresh key at its next write, through
a real mount, and a kill -9 at any moment of that re-key loses nothing (docs/FORMAT.md §6.4).
The budget is reached by writing the seal count into the file's state (filestate_tool.py)
rather than by 2^31 writes. ENCFS_STRESS=1 runs more kill rounds."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from conftest import run_encfs
from filestate_tool import set_seals
from fuse_helpers import Mount, cold_read, crash_during

from encfs.fuse.fileheader import REKEY_AT, FileHeader

STRESS = bool(os.environ.get("ENCFS_STRESS"))
KILL_ROUNDS = 24 if STRESS else 8


def backing_files(cipherdir: Path) -> list[Path]:
    return sorted(p for p in cipherdir.iterdir() if p.is_file() and "." not in p.name)


def file_id(path: Path) -> bytes:
    with open(path, "rb") as f:
        return FileHeader.parse(f.read(128)).file_id


def make(tmp_path: Path, fs_home: Path, data: bytes) -> tuple[Path, Path, Path]:
    cipherdir, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipherdir), "--key", "fs", home=fs_home).returncode == 0
    with Mount(cipherdir, plain, fs_home), open(plain / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    (backing,) = backing_files(cipherdir)
    return cipherdir, plain, backing


def test_a_file_past_its_budget_gets_a_fresh_key_at_its_next_write(tmp_path: Path, fs_home: Path) -> None:
    data = bytearray(os.urandom((3 << 20) + 777))
    cipherdir, plain, backing = make(tmp_path, fs_home, data)
    with Mount(cipherdir, plain, fs_home):
        os.link(plain / "f", plain / "g")
        os.setxattr(plain / "f", "user.note", b"kept")
    old_id, ino = file_id(backing), backing.stat().st_ino
    set_seals(cipherdir, fs_home, backing, REKEY_AT - 1)
    m = Mount(cipherdir, plain, fs_home)
    try:
        with open(plain / "f", "r+b") as f:
            f.seek(5000)
            f.write(b"first")  # REKEY_AT - 1 < REKEY_AT: still the old key...
            f.flush()
            f.seek(100000)
            f.write(b"second")  # ...now at REKEY_AT: this write re-keys first
            os.fsync(f.fileno())
        data[5000:5005], data[100000:100006] = b"first", b"second"
        assert file_id(backing) != old_id and backing.stat().st_ino == ino
        assert cold_read(plain / "g") == data and os.getxattr(plain / "f", "user.note") == b"kept"
    finally:
        m.stop()
    assert "gave it a fresh data key" in m.log.read_text()
    assert not list((cipherdir / "encfs.journal").iterdir())
    set_seals(cipherdir, fs_home, backing, 5)  # the new key's state authenticates
    with Mount(cipherdir, plain, fs_home):
        assert cold_read(plain / "f") == data


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("R", flush=True)
os.pwrite(fd, b"N" * 10, int(sys.argv[2]))
print("W", flush=True)
os.fsync(fd)
print("S", flush=True)
"""


def side_files(cipherdir: Path) -> list[str]:
    journal = cipherdir / "encfs.journal"
    return [p.name for p in journal.iterdir() if ".rekey" in p.name] if journal.exists() else []


def wait_for_side_file(cipherdir: Path, complete: bool, deadline: float) -> bool:
    """Poll until the re-key's side file appears (``complete``: renamed into place)."""
    while time.monotonic() < deadline:
        names = side_files(cipherdir)
        if any(n.endswith(".rekey") if complete else n.endswith(".tmp") for n in names):
            return True
    return False


def test_kill_9_during_a_rekey_loses_nothing(tmp_path: Path, fs_home: Path) -> None:
    """Each round: the file is at its budget, a writer's one write starts a re-key of the whole
    file, and the daemon is killed at a random moment while the side file is written (even
    rounds) or copied back (odd rounds), found by watching the journal directory. The file
    must then read back whole: its old contents, or with the write (always, once fsync'd)."""
    rng = random.Random(int(os.environ.get("ENCFS_SEED", "19")))
    base = os.urandom(64 << 20)
    cipherdir, plain, backing = make(tmp_path, fs_home, base)
    expected = bytearray(base)
    phases: dict[str, int] = {"tmp": 0, "complete": 0}
    for round_no in range(KILL_ROUNDS):
        set_seals(cipherdir, fs_home, backing, REKEY_AT)
        offset = rng.randrange(len(base) - 10)
        m = Mount(cipherdir, plain, fs_home)
        complete = bool(round_no % 2)

        def inside_a_rekey() -> None:
            if wait_for_side_file(cipherdir, complete, time.monotonic() + 30):
                time.sleep(rng.uniform(0, 0.01 if complete else 0.1))
        out = crash_during(m, WRITER, str(plain / "f"), str(offset), when=inside_a_rekey)
        for name in side_files(cipherdir):
            phases["tmp" if name.endswith(".tmp") else "complete"] += 1
        new = bytearray(expected)
        new[offset:offset + 10] = b"N" * 10
        with Mount(cipherdir, plain, fs_home):
            actual = cold_read(plain / "f")
        assert actual in (expected, new), f"round {round_no}: the file is neither before nor after the write"
        if "S" in out.split():
            assert actual == new, f"round {round_no}: an fsync'd write was lost"
        expected = bytearray(actual)
        assert not side_files(cipherdir), "a mount left a side file behind"
    assert phases["tmp"] and phases["complete"], f"kills did not land in both phases of a re-key: {phases}"


def test_a_read_only_mount_reads_an_interrupted_rekey_from_its_side_file(tmp_path: Path, fs_home: Path) -> None:
    base = os.urandom(64 << 20)
    cipherdir, plain, backing = make(tmp_path, fs_home, base)
    for _attempt in range(5):  # until a kill lands while the side file is copied back
        set_seals(cipherdir, fs_home, backing, REKEY_AT)
        m = Mount(cipherdir, plain, fs_home)
        crash_during(m, WRITER, str(plain / "f"), "0",
                     when=lambda: wait_for_side_file(cipherdir, True, time.monotonic() + 30))
        if any(n.endswith(".rekey") for n in side_files(cipherdir)):
            break
        with Mount(cipherdir, plain, fs_home):
            base = cold_read(plain / "f")
    else:
        raise AssertionError("no kill landed while a side file was copied back")
    with Mount(cipherdir, plain, fs_home, "--read-only") as m:
        assert cold_read(plain / "f") == base
    assert side_files(cipherdir), "a read-only mount must not finish the re-key"
    assert "read from its side file" in m.log.read_text()
    with Mount(cipherdir, plain, fs_home):
        assert cold_read(plain / "f") == base
    assert not side_files(cipherdir)
