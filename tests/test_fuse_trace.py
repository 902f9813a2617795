"""`encfs mount --debug`: every FUSE request in the daemon's log by opcode name (issue #22),
on a real mount."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fuse_helpers import Mount
from test_rekey_rewrap import home, ok  # noqa: F401  (home: the fixture)


def test_debug_logs_each_request_by_opcode_name_and_without_it_nothing(tmp_path: Path, home: Path) -> None:
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    traced, quiet = tmp_path / "traced.log", tmp_path / "quiet.log"
    with Mount(cipher, plain, home, "--debug", log=traced):
        (plain / "f").write_bytes(b"x")
        assert not (plain / "missing").exists()
        with pytest.raises(OSError):
            os.getxattr(plain / "f", "user.missing")
    with Mount(cipher, plain, home, log=quiet):
        assert (plain / "f").read_bytes() == b"x"
    log = traced.read_text()
    for name in ("INIT unique=", "CREATE unique=", "WRITE unique=", "LOOKUP unique="):
        assert name in log, log[-3000:]
    assert "-> ENODATA" in log  # the getxattr of "user.missing"
    assert "unique=" not in quiet.read_text()


def test_fsync_and_fsyncdir_reach_the_daemon_and_succeed(tmp_path: Path, home: Path) -> None:
    """The kernel turns an ENOSYS answer to FSYNC into success (and stops asking), so an fsync(2)
    that returns 0 proves nothing: the trace shows each request and that none was refused.
    tests/test_fs_api.py shows the daemon's fsync reaching the backing file."""
    import os
    import re

    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    log = tmp_path / "traced.log"
    with Mount(cipher, plain, home, "--debug", log=log):
        fd = os.open(plain / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for _ in range(3):
                os.write(fd, b"durable")
                os.fsync(fd)
                os.fdatasync(fd)
        finally:
            os.close(fd)
        dfd = os.open(plain, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    text = log.read_text()
    fsyncs = re.findall(r"\bFSYNC unique=(\d+)", text)
    dirs = re.findall(r"\bFSYNCDIR unique=(\d+)", text)
    assert len(fsyncs) >= 6 and len(dirs) == 2, text[-3000:]
    for unique in fsyncs + dirs:
        assert f"unique={unique} ->" not in text  # no error reply


def test_absent_names_are_negative_entries_until_made_through_the_mount(tmp_path: Path, home: Path) -> None:
    """A LOOKUP of an absent name is answered as a negative entry the kernel keeps (SQLite stats
    its absent -journal and -wal before every transaction); making the name through the mount,
    in any way, shows it at once."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    log = tmp_path / "traced.log"
    makers = {
        "file": lambda p: p.write_bytes(b"x"),
        "dir": lambda p: p.mkdir(),
        "symlink": lambda p: p.symlink_to("file"),
        "hardlink": lambda p: os.link(plain / "file", p),
        "renamed": lambda p: os.rename(plain / "spare", p),
    }
    with Mount(cipher, plain, home, "--debug", log=log):
        (plain / "spare").write_bytes(b"s")
        before = len(re.findall(r"\bLOOKUP unique=", log.read_text()))
        for _ in range(50):
            for name in makers:
                assert not (plain / name).exists()
        lookups = len(re.findall(r"\bLOOKUP unique=", log.read_text())) - before
        assert lookups == len(makers), lookups  # one each: a negative entry is kept an hour
        for name, make in makers.items():
            make(plain / name)
            assert (plain / name).exists() or (plain / name).is_symlink(), name
        assert sorted(os.listdir(plain)) == sorted(makers)
        assert (plain / "renamed").read_bytes() == b"s" and (plain / "hardlink").read_bytes() == b"x"


def test_writes_to_a_file_ask_for_security_capability_at_most_twice(tmp_path: Path, home: Path) -> None:
    """With FUSE_HANDLE_KILLPRIV_V2 the kernel marks a written file as having no privileges to
    drop (S_NOSEC) and stops asking for security.capability before each write(2); without it,
    every write costs a GETXATTR round trip (20 here). The daemon drops it itself
    (tests/test_fuse_killpriv.py)."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    log = tmp_path / "traced.log"
    with Mount(cipher, plain, home, "--debug", log=log):
        (plain / "f").write_bytes(b"x" * 4096)  # an existing file
        start = log.stat().st_size
        fd = os.open(plain / "f", os.O_WRONLY)
        try:
            for i in range(20):
                os.pwrite(fd, b"%02d" % i, i * 100)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(log, "rb") as f:
            f.seek(start)
            traced = f.read().decode()
    assert len(re.findall(r"\bWRITE unique=", traced)) >= 1, traced[-3000:]
    assert len(re.findall(r"\bGETXATTR unique=", traced)) <= 2, traced[-3000:]


def test_names_are_kept_past_the_attribute_timeout(tmp_path: Path, home: Path) -> None:
    """A name looked up more than the attributes' 1 s before is still the kernel's (entries are
    kept an hour on a read-write mount): its unlink sends no LOOKUP. A read-only mount, which
    may run beside another host's read-write one, looks names up again after 1 s."""
    import time

    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    log = tmp_path / "traced.log"
    with Mount(cipher, plain, home, "--debug", log=log):
        for attempt in range(3):
            start = len(log.read_text())
            for i in range(5):
                (plain / f"f{i}").write_bytes(b"x")
            time.sleep(1.5)
            before = log.read_text()
            for i in range(5):
                os.unlink(plain / f"f{i}")
            looked_up = len(re.findall(r"\bLOOKUP unique=", log.read_text())) - len(re.findall(r"\bLOOKUP unique=", before))
            if looked_up == 0:
                break
            # Another process's drop_caches (tests run in parallel) makes the kernel forget names
            # and sends FORGETs before the unlinks: then, and only then, the run is repeated.
            assert "FORGET" in before[start:], f"{looked_up} unlinks looked their names up again"
        else:
            pytest.fail("the kernel forgot the names in every attempt")
        (plain / "kept").write_bytes(b"x")
    log_ro = tmp_path / "traced-ro.log"
    with Mount(cipher, plain, home, "--debug", "--read-only", log=log_ro):
        assert (plain / "kept").exists()
        time.sleep(1.5)
        before = len(re.findall(r"\bLOOKUP unique=", log_ro.read_text()))
        assert (plain / "kept").exists()
        assert len(re.findall(r"\bLOOKUP unique=", log_ro.read_text())) == before + 1
