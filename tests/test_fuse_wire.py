"""The FUSE protocol layer without a kernel (issue #22): requests checked against the opcode table
before any handler runs, INIT negotiation, dirent packing, the debug trace, and the servers'
reader-writer lock. The "kernel" is one end of a SOCK_SEQPACKET pair, which keeps message
boundaries as /dev/fuse does; the same servers run on real mounts in the other suites."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from encfs.fuseproto import server as fuseserver
from encfs.fuseproto.rwlock import SharedExclusiveLock
from encfs.fuseproto.server import FuseServer
from encfs.fuseproto.wire import (
    DIRENT,
    FORGET,
    IN_HEADER,
    INIT,
    INIT_IN,
    INIT_OUT,
    INTERRUPT,
    LOOKUP,
    OPS,
    OUT_HEADER,
    PROTOCOL_MINOR,
    READ,
    READ_IN,
    SETXATTR,
    SETXATTR_IN,
    Request,
    pack_dirent,
)

WANTED = 0b1011


class RecordingServer(FuseServer):
    """Answers INIT with WANTED flags, and LOOKUP, READ, SETXATTR and FORGET by recording them."""

    def __init__(self, fd: int, trace: bool = False) -> None:
        super().__init__(fd, trace)
        self.seen: list[int] = []
        self.handlers = {INIT: lambda req: self.init_reply(req, WANTED), LOOKUP: self._record,
                         READ: self._record, SETXATTR: self._record, FORGET: self._forget}

    def _record(self, req: Request) -> None:
        self.seen.append(req.opcode)
        self.reply(req.unique, b"ok")

    def _forget(self, req: Request) -> None:
        self.seen.append(req.opcode)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RecordingServer, socket.socket]]:
    monkeypatch.setattr(fuseserver, "keep_freed_memory", lambda: False)
    interval = sys.getswitchinterval()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = RecordingServer(ours.fileno(), trace=True)
    loop = threading.Thread(target=server.serve, daemon=True)
    loop.start()
    try:
        yield server, theirs
    finally:
        theirs.close()  # the loop's next read returns nothing: it ends
        loop.join(10)
        ours.close()
        sys.setswitchinterval(interval)
    assert not loop.is_alive()


def request(opcode: int, unique: int, body: bytes) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 42, 0, 0) + body


def answer(sock: socket.socket, timeout: float = 10) -> tuple[int, int, bytes] | None:
    """(unique, errno, payload) of the next reply; None if none comes within ``timeout``."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except TimeoutError:
        return None
    length, error, unique = OUT_HEADER.unpack_from(data)
    assert length == len(data)
    return unique, -error, data[OUT_HEADER.size:]


def test_a_body_too_short_for_its_opcode_is_refused_before_its_handler(
        kernel: tuple[RecordingServer, socket.socket]) -> None:
    server, sock = kernel
    sock.send(request(READ, 1, bytes(READ_IN.size - 1)))
    sock.send(request(LOOKUP, 2, b"no terminating nul"))
    sock.send(request(SETXATTR, 3, SETXATTR_IN.pack(1, 0)))  # no name at all
    sock.send(request(FORGET, 4, b""))  # no reply, even refused
    sock.send(request(LOOKUP, 5, b"name\0"))
    assert [answer(sock) for _ in range(4)] == [
        (1, errno.EINVAL, b""), (2, errno.EINVAL, b""), (3, errno.EINVAL, b""), (5, 0, b"ok")]
    assert server.seen == [LOOKUP]


def test_an_opcode_without_a_handler_is_enosys_and_one_without_a_reply_gets_none(
        kernel: tuple[RecordingServer, socket.socket]) -> None:
    _server, sock = kernel
    sock.send(request(99, 1, b""))  # not even in the table
    sock.send(request(INTERRUPT, 2, struct.pack("<Q", 1)))
    sock.send(request(LOOKUP, 3, b"x\0"))
    assert [answer(sock), answer(sock)] == [(1, errno.ENOSYS, b""), (3, 0, b"ok")]


def test_init_answers_protocol_7_31_with_the_flags_both_sides_have(
        kernel: tuple[RecordingServer, socket.socket]) -> None:
    _server, sock = kernel
    sock.send(request(INIT, 1, INIT_IN.pack(7, 40, 1 << 20, 0b0110)))
    unique, error, payload = answer(sock) or (0, -1, b"")
    major, minor, readahead, flags, *_rest = INIT_OUT.unpack(payload)
    assert (unique, error, major, minor, readahead, flags) == (1, 0, 7, PROTOCOL_MINOR, 1 << 20, 0b0010)


@pytest.mark.parametrize(("offered", "body2", "agreed_upper"), [
    (1 << 30, struct.pack("<I", 1 << 4), 1 << 4),  # FUSE_INIT_EXT: flags2 carries bit 36
    (0, struct.pack("<I", 1 << 4), 0),  # flags2 without FUSE_INIT_EXT is not read
    (1 << 30, b"", 0),  # FUSE_INIT_EXT but a body too short for flags2
], ids=["init_ext", "no_init_ext", "short_body"])
def test_init_agrees_upper_flags_only_through_flags2_with_init_ext(
        kernel: tuple[RecordingServer, socket.socket], offered: int, body2: bytes, agreed_upper: int) -> None:
    server, sock = kernel
    server.handlers[INIT] = lambda req: server.init_reply(req, WANTED | 1 << 36)
    sock.send(request(INIT, 1, INIT_IN.pack(7, 40, 1 << 20, 0b0110 | offered) + body2))
    unique, error, payload = answer(sock) or (0, -1, b"")
    _major, _minor, _readahead, flags, *rest = INIT_OUT.unpack(payload)
    flags2 = rest[-1]
    assert (unique, error, flags2) == (1, 0, agreed_upper)
    assert flags == 0b0010 | (1 << 30 if agreed_upper else 0)  # FUSE_INIT_EXT answered only with flags2
    assert server.agreed_flags == 0b0010 | (agreed_upper << 32) | (1 << 30 if agreed_upper else 0)


def test_init_of_another_major_version_is_eproto_and_ends_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuseserver, "keep_freed_memory", lambda: False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server = RecordingServer(ours.fileno())
        theirs.send(request(INIT, 1, INIT_IN.pack(8, 0, 0, 0)))
        loop = threading.Thread(target=server.serve, daemon=True)
        loop.start()
        assert answer(theirs) == (1, errno.EPROTO, b"")
        loop.join(10)
        assert not loop.is_alive()
    finally:
        theirs.close()
        ours.close()


def test_the_debug_trace_names_each_request_and_error_reply(
        kernel: tuple[RecordingServer, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    _server, sock = kernel
    with caplog.at_level(logging.DEBUG, logger="encfs.fuse.trace"):
        sock.send(request(LOOKUP, 7, b"a\0"))
        sock.send(request(99, 8, b""))
        answer(sock), answer(sock)
    lines = [r.getMessage() for r in caplog.records if r.name == "encfs.fuse.trace"]
    assert lines[0].startswith("LOOKUP unique=7 node=1 uid=0 pid=42")
    assert lines[1].startswith("UNKNOWN unique=8") and lines[2] == "  unique=8 -> ENOSYS"


def test_every_table_entry_has_a_name_and_no_reply_only_where_the_kernel_expects_none() -> None:
    assert all(op.name.isupper() for op in OPS.values())
    assert {code for code, op in OPS.items() if not op.reply} == {2, 36, 41, 42}  # FORGET, INTERRUPT, NOTIFY_REPLY, BATCH_FORGET


def test_a_dirent_is_packed_to_eight_bytes_with_its_type() -> None:
    for name in (b"a", b"1234567", b"12345678", b"x" * 255):
        rec = pack_dirent(5, 9, name, 0o040755)
        ino, off, namelen, kind = DIRENT.unpack_from(rec)
        assert len(rec) % 8 == 0 and len(rec) - DIRENT.size - len(name) < 8
        assert (ino, off, namelen, kind, rec[DIRENT.size:DIRENT.size + namelen]) == (5, 9, len(name), 4, name)


def test_a_waiting_exclusive_holder_goes_before_later_shared_holders() -> None:
    lock, order = SharedExclusiveLock(), []
    lock.acquire_shared()  # a read in progress

    def writer() -> None:
        with lock.exclusive():
            order.append("exclusive")

    def reader() -> None:
        lock.acquire_shared()
        order.append("shared")
        lock.release_shared()

    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 10
    while not lock._waiting and time.monotonic() < deadline:  # the writer is queued
        time.sleep(0.001)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.2)
    assert order == [] and r.is_alive()  # the new reader waits behind the queued writer
    lock.release_shared()
    w.join(10)
    r.join(10)
    assert order == ["exclusive", "shared"]


class FakeVolume:
    """A VolumeFile whose grow fails as a volume does: a shrink, or a full disk."""

    size = 1 << 20

    def grow(self, new_size: int) -> None:
        from encfs.block.volume import ShrinkRefused, VolumeError

        if new_size < self.size:
            raise ShrinkRefused()
        raise VolumeError("cannot grow /x: No space left on device")

    def flush(self) -> None:
        pass

    def request_buffer(self) -> None:
        return None


def test_the_volume_server_maps_a_refused_resize_by_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from encfs.block.fuseserver import FILE_ID, RESIZE_XATTR, VolumeServer

    monkeypatch.setattr(fuseserver, "keep_freed_memory", lambda: False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = VolumeServer(ours.fileno(), FakeVolume())  # type: ignore[arg-type]
    loop = threading.Thread(target=server.serve, args=(1,), daemon=True)
    loop.start()
    try:
        for unique, size in ((1, b"4096"), (2, b"%d" % (4 << 20))):
            body = SETXATTR_IN.pack(len(size), 0) + RESIZE_XATTR + b"\0" + size
            theirs.send(IN_HEADER.pack(IN_HEADER.size + len(body), SETXATTR, unique, FILE_ID, 0, 0, 0, 0, 0) + body)
        assert [answer(theirs), answer(theirs)] == [(1, errno.EINVAL, b""), (2, errno.ENOSPC, b"")]
    finally:
        theirs.close()
        loop.join(10)
        ours.close()


def test_a_thread_that_finds_the_device_closed_after_serving_ended_ends_quietly() -> None:
    """serve() returns (DESTROY, unmount) and its caller closes the device: a serving thread that
    reads it next gets EBADF, which is the end, not a failure (it printed a traceback)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server = RecordingServer(ours.fileno())

        def closed_meanwhile(buf: memoryview, poller: object) -> int:
            server._running = False  # serving ended in another thread ...
            raise OSError(errno.EBADF, "Bad file descriptor")  # ... and the device was closed

        server._next_request = closed_meanwhile  # type: ignore[method-assign]
        server._loop(False)  # returns, and raises nothing
        # ... and leaves its caller's signals alone: the test process's later children (fio, a
        # key daemon) inherited a blocked SIGINT/SIGTERM when it did not.
        assert not {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} & signal.pthread_sigmask(signal.SIG_BLOCK, [])

        def closed_while_serving(buf: memoryview, poller: object) -> int:
            raise OSError(errno.EBADF, "Bad file descriptor")

        server._running = True
        server._next_request = closed_while_serving  # type: ignore[method-assign]
        with pytest.raises(OSError):  # while serving, EBADF is still a failure
            server._loop(False)
    finally:
        ours.close()
        theirs.close()


def test_the_volume_server_reads_with_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop device keeps several requests in flight (direct I/O): the volume's server reads
    them with four threads unless told otherwise."""
    from encfs.block.fuseserver import VolumeServer

    monkeypatch.setattr(fuseserver, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(sys, "setswitchinterval", lambda _seconds: None)  # not this test process's
    workers = lambda: sum(t.name == "fuse-worker" for t in threading.enumerate())  # noqa: E731
    before = workers()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = VolumeServer(ours.fileno(), FakeVolume())  # type: ignore[arg-type]
    loop = threading.Thread(target=server.serve, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while workers() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert workers() == before + 3
    finally:
        theirs.close()
        loop.join(10)
        ours.close()
