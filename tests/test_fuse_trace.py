"""`encfs mount --debug`: every FUSE request in the daemon's log by opcode name (issue #22),
on a real mount."""

from __future__ import annotations

from pathlib import Path

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
    with Mount(cipher, plain, home, log=quiet):
        assert (plain / "f").read_bytes() == b"x"
    log = traced.read_text()
    for name in ("INIT unique=", "CREATE unique=", "WRITE unique=", "LOOKUP unique="):
        assert name in log, log[-3000:]
    assert "-> ENOENT" in log  # the lookup of "missing"
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
