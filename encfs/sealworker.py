"""A helper process that seals large writes and opens large reads, so that AES-GCM runs on a
second core.

Why: cryptography's AES-GCM calls share the GIL with the rest of a server. In one process,
two threads sealing 1 MiB each took 3.6 times as long as one thread sealing one (they fight
over the GIL), and a volume's daemon writing 1 GiB stayed at one core (1.42 s of CPU in
1.55 s) while the other core waited on I/O. Two processes sealing side by side each run at
full speed. The volume daemon and the filesystem daemon each start one worker.

Invariants:
- Keys reach the worker over a private socket (never argv or the environment): add_key()
  sends a data key, its scope and its nonce prefix if it has one, and returns a key id; ids
  are never reused, so a job under a dropped id fails instead of sealing under another key.
  The worker seals with its server's cipher class: encfs.blocks.BlockCipher (the one
  framing), or in the benchmark's null-cipher daemons their null cipher, so that they take
  the same path with only the encryption left out. It does nothing else: no files, no token.
- Nonces: without counters, fresh random nonces drawn in the worker. With counters (a key
  added with a nonce prefix), job k's blocks take counter nonces from counters[k] on,
  exactly as BlockCipher.seal_range(..., counter=counters[k]) in the server would; the
  worker keeps no counter of its own, so the caller's counter stays the only one. Counters
  sent to the worker are spent even if seal() returns None (it may have sealed some blocks):
  the caller seals those same jobs in process with the same counters (counter mode is
  deterministic: the same bytes, no nonce on other data) or uses fresh counters.
- Plaintext and sealed bytes pass through one shared memory arena (a memfd), one slot
  per server thread; what a slot holds stays valid until that thread's next seal() or
  open(). A slot also holds the thread's FUSE request buffer (request_buffer()), so a WRITE
  body is sealed where the kernel put it; plaintext from anywhere else is copied in. A
  read is read from the backing file into the slot (areas()) and opened there.
- A block that fails authentication in the worker raises BlockAuthError in the caller,
  exactly as BlockCipher.open_into would (that block's plaintext zeroed).
- The worker is not dumpable and has no core limit (encfs.daemon.keep_secrets_in_memory).
- The worker ends with its parent (PR_SET_PDEATHSIG, and end-of-file on its sockets);
  close() ends it and waits for it. One that fails a request or leaves it unanswered for
  REPLY_TIMEOUT is killed at once. If it is gone or fails, seal() returns None and the
  caller seals in its own process: a worker never loses a write.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
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

from encfs.blocks import NONCE_PREFIX_LEN, OVERHEAD, BlockAuthError, BlockCipher, RunViews
from encfs.daemon import keep_secrets_in_memory
from encfs.fuseproto.wire import BUFFER_SIZE

log = logging.getLogger("encfs.seal")

MAX_PLAIN = 1 << 20  # FUSE's largest write
MAX_SEALED = MAX_PLAIN + (MAX_PLAIN // 4096) * OVERHEAD  # 4 KiB blocks have the most overhead
REQUEST_BYTES = -(-BUFFER_SIZE // mmap.PAGESIZE) * mmap.PAGESIZE
SLOT_BYTES = REQUEST_BYTES + MAX_PLAIN + MAX_SEALED  # request buffer, plaintext copied in, sealed
SLOTS = 8
# Requests of this many bytes or more are worth sending to the worker: its round trip adds
# latency that only large requests repay, in GIL time given back (benchmarks/HISTORY.md, fa5f9c0).
WORKER_MIN_BYTES = 256 * 1024
REPLY_TIMEOUT = 30.0  # seconds; a worker this slow is treated as gone
_HEAD = struct.Struct("<cII")  # _SEAL, _SEAL_COUNTED or _OPEN, key id, number of jobs
# source offset and length, destination offset; block numbers start, stop, step; the job's first
# counter (u64: every value is a counter, so the request's op, not the field, says whether it is used)
_JOB = struct.Struct("<QQQqqqQ")
# Jobs in one request: a 1 MiB write of 4 KiB blocks could be one job per block. The worker reads a
# request in one recv() of this size (a longer one would be cut short and fail), so more are refused.
MAX_JOBS = MAX_PLAIN // 4096
_REQUEST_MAX = _HEAD.size + MAX_JOBS * _JOB.size
_SEAL, _SEAL_COUNTED, _OPEN = b"s", b"c", b"o"  # seal with random nonces, seal with counter nonces, open
# control messages: _ADD + u32 key id + key (32) + u8 prefix length (0 or 4) + nonce prefix + scope;
# _DROP + u32 key id
_ADD, _DROP = b"a", b"d"
_KEY_ID = struct.Struct("<I")
_COUNTER_LIMIT = 1 << 64
_KEY_LEN = 32
_OK, _FAILED, _AUTH = b"\0", b"\1", b"\2"  # answers; _AUTH is followed by the block number
_BLOCK_NO = struct.Struct("<q")
# Places in the arena whose per-block views (RunViews) the worker keeps for runs of at least
# VIEWS_MIN_BLOCKS full blocks: a slot's large reads and writes use two or three (its areas, its
# request buffer's WRITE body); a worker that met more forgets them all and starts again. The
# views of a 1 MiB run of 4 KiB blocks take about 140 KiB and 100 us to make.
VIEWS_KEPT = 4 * SLOTS
VIEWS_MIN_BLOCKS = 16
_PR_SET_PDEATHSIG = 1
_PR_SET_IO_FLUSHER = 57

Job = tuple[range, memoryview]


def worth_the_worker(plain_len: int, sealed_len: int) -> bool:
    """Whether a read of ``plain_len`` plaintext bytes, ``sealed_len`` sealed, goes to the worker:
    large enough to repay the round trip, small enough for a slot's areas()."""
    return WORKER_MIN_BYTES <= plain_len <= MAX_PLAIN and sealed_len <= MAX_SEALED


class SealWorker:
    """A running worker for one block size; thread-safe (one arena slot per thread)."""

    def __init__(self, block_size: int = 4096, cipher_class: type[BlockCipher] = BlockCipher) -> None:
        self._fd = os.memfd_create("encfs-seal-arena", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, SLOTS * SLOT_BYTES)
        self._map = mmap.mmap(self._fd, SLOTS * SLOT_BYTES)
        self._arena = memoryview(self._map)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(SLOTS + 1)))
        self._control, *socks = ours  # the control socket carries keys; one socket per slot carries jobs
        self._socks: list[socket.socket] = socks
        for s in ours:
            s.settimeout(REPLY_TIMEOUT)
        fds = [s.fileno() for s in theirs]
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "encfs.sealworker", str(self._fd), str(block_size), class_spec(cipher_class),
             *map(str, fds)],
            stdin=subprocess.DEVNULL, pass_fds=[self._fd, *fds], close_fds=True)
        for s in theirs:
            s.close()
        self._free = list(range(SLOTS))
        self._lock = threading.Lock()  # guards the free slots, the control socket and the key ids
        self._local = threading.local()
        self._next_key_id = 1
        self._prefixed: dict[int, bool] = {}  # the live key ids: whether each has a nonce prefix
        self._alive = True

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._alive

    def add_key(self, key: bytes, scope: bytes, nonce_prefix: bytes | None = None) -> int | None:
        """A key id for sealing under (key, scope), or None if the worker is gone. With
        ``nonce_prefix`` (4 bytes) its jobs may be sealed with counter nonces (seal's counters)."""
        if len(key) != _KEY_LEN:
            raise ValueError("a data key is 32 bytes")
        prefix = b"" if nonce_prefix is None else bytes(nonce_prefix)
        if nonce_prefix is not None and len(prefix) != NONCE_PREFIX_LEN:
            raise ValueError(f"a nonce prefix is {NONCE_PREFIX_LEN} bytes, not {len(prefix)}")
        with self._lock:
            key_id, self._next_key_id = self._next_key_id, self._next_key_id + 1
            ok = self._alive and self._control_call(_ADD + _KEY_ID.pack(key_id) + key + bytes([len(prefix)])
                                                    + prefix + scope)
            if ok:
                self._prefixed[key_id] = nonce_prefix is not None
        return key_id if ok else None

    def drop_key(self, key_id: int) -> None:
        """Forget a key (its file is closed); its id is never given out again."""
        with self._lock:
            self._prefixed.pop(key_id, None)
            if self._alive:
                self._control_call(_DROP + _KEY_ID.pack(key_id))

    def _control_call(self, message: bytes) -> bool:
        try:
            self._control.sendall(message)
        except OSError:
            self._gone()
            return False
        return self._answered(self._control)

    def _answered(self, sock: socket.socket) -> bool:
        """True if the worker answers OK on ``sock``; BlockAuthError if a block it opened did
        not authenticate; otherwise False, and the worker is taken out of use."""
        try:
            answer = sock.recv(1 + _BLOCK_NO.size)
        except OSError:
            answer = b""
        if answer == _OK:
            return True
        if answer[:1] == _AUTH and len(answer) == 1 + _BLOCK_NO.size:
            raise BlockAuthError(_BLOCK_NO.unpack_from(answer, 1)[0])
        self._gone()
        return False

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

    def areas(self) -> tuple[memoryview, memoryview] | None:
        """This thread's plaintext area (MAX_PLAIN bytes) and sealed area (MAX_SEALED) for open();
        None if no slot is free."""
        slot = self._slot()
        if slot is None:
            return None
        plain_at = slot * SLOT_BYTES + REQUEST_BYTES
        return self._arena[plain_at:plain_at + MAX_PLAIN], self._arena[plain_at + MAX_PLAIN:(slot + 1) * SLOT_BYTES]

    def open(self, key_id: int, jobs: Sequence[tuple[range, bytes | bytearray | memoryview, memoryview]]) -> bool:
        """Open each (block numbers, sealed, out) as BlockCipher.open_into would, with ``sealed``
        and ``out`` parts of this thread's areas(). True once done; False if the worker cannot
        (then open them in process: ``sealed`` is unchanged); BlockAuthError as open_into."""
        if not self._alive or len(jobs) > MAX_JOBS:
            return False
        slot = self._slot()
        if slot is None:
            return False
        message = [_HEAD.pack(_OPEN, key_id, len(jobs))]
        for numbers, sealed, out in jobs:
            at, out_at = self._arena_offset(sealed), self._arena_offset(out)
            if at is None or out_at is None:
                raise ValueError("open() takes views of this thread's areas()")
            message.append(_JOB.pack(at, len(sealed), out_at, numbers.start, numbers.stop, numbers.step, 0))
        return self._send(slot, message) and self._answered(self._socks[slot])

    def _send(self, slot: int, message: list[bytes]) -> bool:
        """Send a job message on ``slot``'s socket; False, and the worker out of use, if it cannot."""
        try:
            self._socks[slot].sendall(b"".join(message))
        except OSError:
            self._gone()
            return False
        return True

    def _arena_offset(self, data: bytes | bytearray | memoryview) -> int | None:
        """Where ``data`` lies in the arena, if it is a view of it (a request buffer's bytes)."""
        if not isinstance(data, memoryview) or data.obj is not self._map or data.readonly \
                or not data.c_contiguous:
            return None
        return ctypes.addressof(ctypes.c_char.from_buffer(data)) - self._address

    def seal(self, key_id: int, jobs: Sequence[Job], counters: Sequence[int] | None = None) -> list[memoryview] | None:
        """Each (block numbers, plaintext) sealed under ``key_id`` as BlockCipher.seal_range
        would, job k with ``counter=counters[k]`` if counters are given (its blocks take
        consecutive counter values from it), else with random nonces; None if the worker cannot
        do it (gone, busy slots, more than MAX_PLAIN bytes or MAX_JOBS jobs): seal in process
        then, with the same counters or fresh ones (see the module docstring). ValueError, with
        counters, if the key has no nonce prefix or a counter is out of range."""
        pending = self.submit(key_id, jobs, counters)
        return pending if pending is not None and self.wait() else None

    def submit(self, key_id: int, jobs: Sequence[Job], counters: Sequence[int] | None = None) \
            -> list[memoryview] | None:
        """Start sealing ``jobs`` (as seal()); wait() says whether the returned buffers hold the
        result. None if the worker cannot take them (then nothing is pending)."""
        if counters is not None:
            self._check_counters(key_id, jobs, counters)
        if not self._alive or len(jobs) > MAX_JOBS or sum(len(p) for _n, p in jobs) > MAX_PLAIN:
            return None
        slot = self._slot()
        if slot is None:
            return None
        base = slot * SLOT_BYTES + REQUEST_BYTES
        message, results = [_HEAD.pack(_SEAL if counters is None else _SEAL_COUNTED, key_id, len(jobs))], []
        plain_at, sealed_at = base, base + MAX_PLAIN
        for k, (numbers, plaintext) in enumerate(jobs):
            at = self._arena_offset(plaintext)
            if at is None:
                at = plain_at
                self._arena[at:at + len(plaintext)] = plaintext
                plain_at += len(plaintext)
            sealed_len = len(plaintext) + len(numbers) * OVERHEAD
            message.append(_JOB.pack(at, len(plaintext), sealed_at, numbers.start, numbers.stop, numbers.step,
                                     0 if counters is None else counters[k]))
            results.append(self._arena[sealed_at:sealed_at + sealed_len])
            sealed_at += sealed_len
        return results if self._send(slot, message) else None

    def _check_counters(self, key_id: int, jobs: Sequence[Job], counters: Sequence[int]) -> None:
        """ValueError where BlockCipher would refuse these counters, before the worker sees them
        (a request the worker fails takes it out of use)."""
        if len(counters) != len(jobs):
            raise ValueError(f"{len(counters)} counters for {len(jobs)} jobs")
        if self._prefixed.get(key_id) is False:
            raise ValueError("counter nonces need a key added with a nonce prefix")
        for (numbers, _p), counter in zip(jobs, counters):
            if not 0 <= counter <= _COUNTER_LIMIT - len(numbers):
                raise ValueError(f"counters {counter} to {counter + len(numbers) - 1} are not all in 0 to 2**64 - 1")

    def wait(self) -> bool:
        """True once this thread's submitted jobs are sealed; False if the worker failed them."""
        return self._answered(self._socks[self._local.slot])

    def _gone(self) -> None:
        if self._alive:
            self._alive = False
            log.warning("the sealing worker (pid %d) is gone or failed; sealing in the server process",
                        self._proc.pid)
            # One that stopped answering (REPLY_TIMEOUT) may still run, holding keys: end it.
            # It writes nothing but the arena, whose jobs the caller now does itself.
            with contextlib.suppress(OSError):
                self._proc.kill()

    def close(self) -> None:
        """End the worker and wait for it."""
        self._alive = False
        self._control.close()
        for s in self._socks:
            s.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._fd)


def class_spec(cls: type[BlockCipher]) -> str:
    """How the worker finds ``cls``: "module:name" for a class of an importable module, or
    "path/to/file.py:name" for one defined in a script (the benchmark's null cipher)."""
    name = cls.__module__
    if name == "encfs" or name.startswith("encfs."):
        return f"{name}:{cls.__qualname__}"
    path = getattr(sys.modules[name], "__file__", None)
    if not path:
        raise ValueError(f"the sealing worker cannot load {cls!r}: its module has no file")
    return f"{os.path.abspath(path)}:{cls.__qualname__}"


def load_class(spec: str) -> type[BlockCipher]:
    """The BlockCipher subclass that class_spec() named."""
    where, _, qualname = spec.rpartition(":")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("_encfs_sealworker_cipher", where)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {where}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    cls = module
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, BlockCipher)):
        raise TypeError(f"{spec} is not a BlockCipher")
    return cls


def _worker(arena_fd: int, block_size: int, cipher_class: type[BlockCipher], fds: list[int]) -> int:
    libc = ctypes.CDLL(None)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above took effect
        return 0
    libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0)  # it serves the writeback of its daemon's mount
    keep_secrets_in_memory()  # before the first key arrives; an exec'd program starts dumpable
    ciphers: dict[int, BlockCipher] = {}
    arena = memoryview(mmap.mmap(arena_fd, 0))
    control_fd = fds[0]
    socks = {fd: socket.socket(fileno=fd) for fd in fds}
    kept: dict[tuple[int, int], RunViews] = {}

    def full_blocks(sealed_at: int, plain_at: int, sealed_len: int, count: int) -> RunViews | None:
        """Kept views for a run of ``count`` full blocks sealed at ``sealed_at`` and plain at
        ``plain_at``; None for a short run or one with a short block (sliced as it comes)."""
        step = block_size + OVERHEAD
        if count < VIEWS_MIN_BLOCKS or sealed_len != count * step:
            return None
        views = kept.get((sealed_at, plain_at))
        if views is None or len(views.plains) < count:
            if views is None and len(kept) >= VIEWS_KEPT:
                kept.clear()
            views = kept[sealed_at, plain_at] = RunViews(arena[sealed_at:sealed_at + sealed_len],
                                                         arena[plain_at:plain_at + count * block_size], block_size)
        return views

    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN)
    while control_fd in socks:
        for fd, _events in poller.poll():
            sock = socks[fd]
            message = sock.recv(_REQUEST_MAX)
            if not message:  # the server closed its end
                poller.unregister(fd)
                sock.close()
                del socks[fd]
                continue
            try:
                if fd == control_fd:
                    (key_id,) = _KEY_ID.unpack_from(message, 1)
                    if message[:1] == _ADD:
                        at = 1 + _KEY_ID.size
                        key, prefix_len = message[at:at + _KEY_LEN], message[at + _KEY_LEN]
                        at += _KEY_LEN + 1
                        prefix, scope = message[at:at + prefix_len], message[at + prefix_len:]
                        ciphers[key_id] = cipher_class(key, scope, block_size, nonce_prefix=prefix or None)
                    else:
                        del ciphers[key_id]
                else:
                    op, key_id, count = _HEAD.unpack_from(message)
                    if op not in (_SEAL, _SEAL_COUNTED, _OPEN):
                        raise ValueError(f"unknown request {op!r}")
                    cipher = ciphers[key_id]
                    for k in range(count):
                        at, length, out_at, start, stop, step, counter = _JOB.unpack_from(
                            message, _HEAD.size + k * _JOB.size)
                        numbers = range(start, stop, step)
                        if op != _OPEN:
                            sealed_len, first = length + len(numbers) * OVERHEAD, counter if op == _SEAL_COUNTED else None
                            if (views := full_blocks(out_at, at, sealed_len, len(numbers))) is not None:
                                cipher.seal_views(numbers, views, first)
                            else:
                                cipher.seal_into(numbers, arena[at:at + length], arena[out_at:out_at + sealed_len], first)
                        elif (views := full_blocks(at, out_at, length, len(numbers))) is not None:
                            cipher.open_views(numbers, views)
                        else:
                            cipher.open_into(numbers, arena[at:at + length],
                                             arena[out_at:out_at + length - len(numbers) * OVERHEAD])
            except BlockAuthError as e:
                sock.send(_AUTH + _BLOCK_NO.pack(e.block_no))
            except Exception:  # noqa: BLE001 - the server does this request itself
                sock.send(_FAILED)
            else:
                sock.send(_OK)
            del message
    return 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), int(sys.argv[2]), load_class(sys.argv[3]), [int(a) for a in sys.argv[4:]]))
