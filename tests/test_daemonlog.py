"""encfs.daemonlog without mounts: where the log goes, the rate limit (an injected clock, no
sleeping), the cause of an integrity failure from the exception's type (issue #23)."""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs import daemonlog
from encfs.blocks import BlockAuthError
from encfs.errors import ContextMismatch, KeyNotFound, KeyStateError, TokenError, TokenNotFound
from encfs.fuse.fileheader import HeaderError


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, ListHandler, Clock, daemonlog.RateLimit]]:
    lg = logging.getLogger(f"encfs.test.{os.urandom(4).hex()}")
    lg.propagate = False
    lg.setLevel(logging.INFO)
    h, clock = ListHandler(), Clock()
    limit = daemonlog.RateLimit(h, window=60, max_keys=8, clock=clock)
    lg.addHandler(h)
    yield lg, h, clock, limit
    lg.removeHandler(h)


def test_a_repeating_message_is_logged_once_then_once_with_its_count(logger) -> None:
    lg, h, clock, _ = logger
    for _ in range(101):
        lg.error("%r: %s: integrity failure (%s)", "/a", "block 1", "tampered")
    lg.error("%r: %s: integrity failure (%s)", "/b", "block 1", "tampered")  # another key passes
    assert h.lines == ["'/a': block 1: integrity failure (tampered)", "'/b': block 1: integrity failure (tampered)"]
    clock.now += 60  # the window ends: the next message of any kind brings the count out
    lg.info("something else")
    assert h.lines[2:] == ["'/a': block 1: integrity failure (tampered) (repeated 100 times in 60 s)", "something else"]
    lg.error("%r: %s: integrity failure (%s)", "/a", "block 1", "tampered")  # a new window
    assert h.lines[-1] == "'/a': block 1: integrity failure (tampered)"


def test_distinct_messages_are_capped_and_pending_counts_flushed(logger) -> None:
    lg, h, _, limit = logger
    for i in range(1000):  # far more distinct messages than max_keys
        lg.error("block %d", i)
        lg.error("block %d", i)  # suppressed; reported when its key is evicted to make room
    assert len(limit._seen) <= 8  # memory stays bounded
    assert h.lines[:3] == ["block 0", "block 1", "block 2"]
    assert "block 0 (repeated 1 times in 60 s)" in h.lines
    n = len(h.lines)
    lg.error("block %d", 999)  # tracked: suppressed
    assert len(h.lines) == n
    limit.flush_pending()
    assert h.lines[-1] == "block 999 (repeated 2 times in 60 s)"
    assert not limit._seen


@pytest.mark.parametrize(("exc", "cause"), [
    (BlockAuthError(3), "tampered"),
    (HeaderError("bad"), "tampered"),
    (KeyStateError("key k is disabled: Decrypt needs an Enabled key"), "key disabled"),
    (KeyNotFound("no key k"), "key disabled"),
    (TokenError("cannot log in"), "token unreachable"),
    (TokenNotFound("gone"), "token unreachable"),
    (ContextMismatch("context differs"), "wrong key"),
])
def test_the_cause_comes_from_the_exception_type(exc: Exception, cause: str) -> None:
    assert daemonlog.integrity_cause(exc) == cause


def test_without_syslog_the_log_is_a_private_file_in_the_state_dir_that_survives_rotation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(daemonlog.SYSLOG_SOCKET_ENV, str(tmp_path / "no-such-socket"))
    h = daemonlog.destination(None, tmp_path / "home", "mnt-x", "encfs")
    try:
        path = tmp_path / "home" / "log" / "encfs-mnt-x.log"
        assert stat.S_IMODE((tmp_path / "home" / "log").stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        lg = logging.getLogger("encfs.test.file")
        lg.propagate, lg.handlers = False, [h]
        lg.error("first")
        path.rename(path.with_suffix(".log.1"))  # logrotate
        lg.error("second")
        assert "first" in path.with_suffix(".log.1").read_text() and "second" in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        h.close()


def test_with_a_syslog_socket_the_log_goes_there_as_facility_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(sock_path)
        server.settimeout(10)
        monkeypatch.setenv(daemonlog.SYSLOG_SOCKET_ENV, sock_path)
        h = daemonlog.destination(None, tmp_path / "home", "mnt-x", "encfs")
        try:
            lg = logging.getLogger("encfs.test.syslog")
            lg.propagate, lg.handlers = False, [h]
            lg.error("'/a': block 1: integrity failure (tampered)")
            got = server.recv(4096).decode()
        finally:
            h.close()
    assert got.startswith(f"<27>encfs[{os.getpid()}]: ")  # LOG_DAEMON (3) * 8 + LOG_ERR (3)
    assert "'/a': block 1: integrity failure (tampered)" in got
    assert not (tmp_path / "home" / "log").exists()


def test_log_file_overrides_syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(sock_path)
        monkeypatch.setenv(daemonlog.SYSLOG_SOCKET_ENV, sock_path)
        h = daemonlog.destination(str(tmp_path / "given.log"), tmp_path / "home", "x", "encfs")
        h.close()
    assert isinstance(h, logging.handlers.WatchedFileHandler)
    assert h.baseFilename == str(tmp_path / "given.log")


def test_log_id_is_one_file_name() -> None:
    assert daemonlog.log_id("/tmp/a b/mnt") == "tmp-a-b-mnt"
    assert "/" not in daemonlog.log_id("/x/../y/z")
