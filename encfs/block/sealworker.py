"""A helper process that seals a volume's writes, so that encryption runs on a second core.

Why: every 4 KiB sector is one AES-GCM call, and in one process those calls share the
GIL with the rest of the volume server. Writing 1 GiB and fsyncing it kept the daemon at
one core (1.42 s of CPU in 1.55 s) while the other core waited on I/O. In a worker
process the same calls run beside the server instead of taking turns with it.

Invariants:
- The worker gets the volume key through a pipe at start (never argv or the
  environment), seals with encfs.blocks.BlockCipher (the one framing; fresh random
  nonces drawn in the worker) and does nothing else: no files, no token.
- Plaintext and sealed bytes pass through one shared memory arena (a memfd), one slot
  per server thread; a slot's sealed bytes stay valid until that thread's next seal().
  A slot also holds the thread's FUSE request buffer (request_buffer()), so a WRITE
  body is sealed where the kernel put it; plaintext from anywhere else is copied in.
- The worker ends with its parent (PR_SET_PDEATHSIG, and end-of-file on its sockets);
  close() ends it and waits for it. If it is gone or fails, seal() returns None and the
  caller seals in its own process: a worker never loses a write.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence

from encfs.blocks import OVERHEAD, BlockCipher
from encfs.fuseproto import BUFFER_SIZE

log = logging.getLogger("encfs.block")

MAX_PLAIN = 1 << 20  # FUSE's largest write
MAX_SEALED = MAX_PLAIN + (MAX_PLAIN // 4096) * OVERHEAD
REQUEST_BYTES = -(-BUFFER_SIZE // mmap.PAGESIZE) * mmap.PAGESIZE
SLOT_BYTES = REQUEST_BYTES + MAX_PLAIN + MAX_SEALED  # request buffer, plaintext copied in, sealed
SLOTS = 8
REPLY_TIMEOUT = 30.0  # seconds; a worker this slow is treated as gone
_COUNT = struct.Struct("<I")
_JOB = struct.Struct("<QQQqqq")  # plaintext offset and length, sealed offset; block numbers start, stop, step
_OK, _FAILED = b"\0", b"\1"
_PR_SET_PDEATHSIG = 1
_PR_SET_IO_FLUSHER = 57

Job = tuple[range, memoryview]


class SealWorker:
    """A running worker for one key and scope; thread-safe (one arena slot per thread)."""

    def __init__(self, key: bytes, scope: bytes, block_size: int = 4096) -> None:
        self._fd = os.memfd_create("encfs-seal-arena", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, SLOTS * SLOT_BYTES)
        self._map = mmap.mmap(self._fd, SLOTS * SLOT_BYTES)
        self._arena = memoryview(self._map)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(SLOTS)))
        self._socks: list[socket.socket] = list(ours)
        for s in self._socks:
            s.settimeout(REPLY_TIMEOUT)
        fds = [s.fileno() for s in theirs]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "encfs.block.sealworker", str(self._fd), str(block_size), *map(str, fds)],
            stdin=subprocess.PIPE, pass_fds=[self._fd, *fds], close_fds=True)
        for s in theirs:
            s.close()
        assert self._proc.stdin is not None
        self._proc.stdin.write(key + scope)
        self._proc.stdin.close()
        self._free = list(range(SLOTS))
        self._lock = threading.Lock()
        self._local = threading.local()
        self._alive = True

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _slot(self) -> int | None:
        slot: int | None = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                if not self._free:
                    return None
                slot = self._free.pop()
            self._local.slot = slot
        return slot

    def request_buffer(self) -> memoryview | None:
        """This thread's request buffer (REQUEST_BYTES) in the arena; None if no slot is free."""
        slot = self._slot()
        return None if slot is None else self._arena[slot * SLOT_BYTES:slot * SLOT_BYTES + REQUEST_BYTES]

    def _arena_offset(self, data: memoryview | bytes) -> int | None:
        """Where ``data`` lies in the arena, if it is a view of it (a request buffer's bytes)."""
        if not isinstance(data, memoryview) or data.obj is not self._map or data.readonly \
                or not data.c_contiguous:
            return None
        return ctypes.addressof(ctypes.c_char.from_buffer(data)) - self._address

    def seal(self, jobs: Sequence[Job]) -> list[memoryview] | None:
        """Each (block numbers, plaintext) sealed as BlockCipher.seal_range would; None if the
        worker cannot do it (gone, busy slots, more than MAX_PLAIN bytes): seal in process then."""
        pending = self.submit(jobs)
        return pending if pending is not None and self.wait() else None

    def submit(self, jobs: Sequence[Job]) -> list[memoryview] | None:
        """Start sealing ``jobs``; wait() says whether the returned buffers hold the result.
        None if the worker cannot take them (then nothing is pending)."""
        if not self._alive or sum(len(p) for _n, p in jobs) > MAX_PLAIN:
            return None
        slot = self._slot()
        if slot is None:
            return None
        base = slot * SLOT_BYTES + REQUEST_BYTES
        message, results = [_COUNT.pack(len(jobs))], []
        plain_at, sealed_at = base, base + MAX_PLAIN
        for numbers, plaintext in jobs:
            at = self._arena_offset(plaintext)
            if at is None:
                at = plain_at
                self._arena[at:at + len(plaintext)] = plaintext
                plain_at += len(plaintext)
            sealed_len = len(plaintext) + len(numbers) * OVERHEAD
            message.append(_JOB.pack(at, len(plaintext), sealed_at, numbers.start, numbers.stop, numbers.step))
            results.append(self._arena[sealed_at:sealed_at + sealed_len])
            sealed_at += sealed_len
        try:
            self._socks[slot].sendall(b"".join(message))
        except OSError:
            self._gone()
            return None
        return results

    def wait(self) -> bool:
        """True once this thread's submitted jobs are sealed; False if the worker failed them."""
        try:
            answer = self._socks[self._local.slot].recv(1)
        except OSError:
            answer = b""
        if answer == _OK:
            return True
        self._gone()
        return False

    def _gone(self) -> None:
        if self._alive:
            self._alive = False
            log.warning("the sealing worker (pid %d) is gone or failed; sealing in the server process",
                        self._proc.pid)

    def close(self) -> None:
        """End the worker and wait for it."""
        self._alive = False
        for s in self._socks:
            s.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._fd)


def _worker(arena_fd: int, block_size: int, fds: list[int]) -> int:
    libc = ctypes.CDLL(None)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above took effect
        return 0
    libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0)  # it serves the volume's writeback, as the daemon does
    secret = sys.stdin.buffer.read()
    cipher = BlockCipher(secret[:32], secret[32:], block_size)
    del secret
    arena = memoryview(mmap.mmap(arena_fd, 0))
    socks = {fd: socket.socket(fileno=fd) for fd in fds}
    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN)
    while socks:
        for fd, _events in poller.poll():
            sock = socks[fd]
            message = sock.recv(4096)
            if not message:  # the server closed its end
                poller.unregister(fd)
                sock.close()
                del socks[fd]
                continue
            try:
                (count,) = _COUNT.unpack_from(message)
                for k in range(count):
                    p_at, p_len, s_at, start, stop, step = _JOB.unpack_from(message, _COUNT.size + k * _JOB.size)
                    numbers = range(start, stop, step)
                    cipher.seal_into(numbers, arena[p_at:p_at + p_len],
                                     arena[s_at:s_at + p_len + len(numbers) * OVERHEAD])
            except Exception:  # noqa: BLE001 - the server seals this request itself
                sock.send(_FAILED)
            else:
                sock.send(_OK)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), int(sys.argv[2]), [int(a) for a in sys.argv[3:]]))
