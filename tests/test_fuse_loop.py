"""FuseServer's request loop: one reading thread, large reads handed to their own thread.

A unit test of the loop's own logic over a SOCK_SEQPACKET socket pair, which
keeps message boundaries as /dev/fuse does (one request per read, one reply
per write); the kernel side is exercised on real mounts elsewhere.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from encfs.fuseproto import server as fuseserver
from encfs.fuseproto.server import OVERLAP_BYTES, FuseServer
from encfs.fuseproto.wire import GETATTR, IN_HEADER, OUT_HEADER, READ, READ_IN, Request


class GatedServer(FuseServer):
    """Answers READ and GETATTR with an empty reply; request 1 waits for ``gate`` first."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.gate = threading.Event()
        self.handlers = {READ: self._answer, GETATTR: self._answer}

    def _answer(self, req: Request) -> None:
        if req.unique == 1 and not self.gate.wait(30):
            raise AssertionError("gate never opened")
        self.reply(req.unique)


def _request(opcode: int, unique: int, body: bytes) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 0, 0, 0) + body


def _read(size: int) -> bytes:
    return READ_IN.pack(7, 0, size, 0) + bytes(16)  # + lock_owner, flags, padding


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GatedServer, socket.socket]]:
    monkeypatch.setattr(fuseserver, "keep_freed_memory", lambda: False)  # not in the test process
    interval = sys.getswitchinterval()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = GatedServer(ours.fileno())
    before = set(threading.enumerate())
    loop = threading.Thread(target=server.serve, args=(3,), daemon=True)
    loop.start()
    try:
        yield server, kernel
    finally:
        server.gate.set()
        kernel.close()  # every thread's next read returns nothing: each ends in turn
        started = set(threading.enumerate()) - before
        for t in started:
            t.join(10)
        ours.close()  # only now: a thread still reading would take the next test's descriptor
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in started)


def _replied(kernel: socket.socket, timeout: float) -> int | None:
    kernel.settimeout(timeout)
    try:
        data = kernel.recv(4096)
    except TimeoutError:
        return None
    return OUT_HEADER.unpack_from(data)[2]


def test_a_large_read_runs_alongside_the_next_request(served: tuple[GatedServer, socket.socket]) -> None:
    server, kernel = served
    kernel.send(_request(READ, 1, _read(OVERLAP_BYTES)))
    kernel.send(_request(GETATTR, 2, bytes(16)))
    assert _replied(kernel, 10) == 2  # answered while the read still waits
    server.gate.set()
    assert _replied(kernel, 10) == 1


def test_a_small_read_is_handled_by_the_reading_thread_in_order(served: tuple[GatedServer, socket.socket]) -> None:
    server, kernel = served
    kernel.send(_request(READ, 1, _read(OVERLAP_BYTES - 4096)))
    kernel.send(_request(GETATTR, 2, bytes(16)))
    assert _replied(kernel, 0.5) is None  # nobody else reads while the reading thread is busy
    server.gate.set()
    assert [_replied(kernel, 10), _replied(kernel, 10)] == [1, 2]
