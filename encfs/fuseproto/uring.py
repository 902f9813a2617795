"""FUSE over io_uring: one queue per CPU carrying the requests /dev/fuse would.

The kernel (6.14 and later, with the fuse module's ``enable_uring`` on) sends a request
from a process running on CPU n to queue n, whose thread here is pinned to that CPU: the
reply then wakes the caller on the CPU it already runs on, instead of waking a halted
second vCPU (docs/dev/fuse-python.md, "FUSE over io_uring"). The answer and the wait for
the next request are one system call (FUSE_IO_URING_CMD_COMMIT_AND_FETCH).

Python's standard library has no io_uring, and the PyPI binding cannot fill the command
area of a 128-byte SQE; the rings are mapped here with mmap and driven with two system
calls through ctypes (docs/dev/fuse-python.md says why and what was measured).

Invariants:
- A queue's ring is created, filled and entered only by its own thread: with
  IORING_SETUP_SINGLE_ISSUER and DEFER_TASKRUN the kernel copies the next request into
  the entry's buffers in that thread's task, while it waits in io_uring_enter.
- Each queue registers ENTRIES entries, each a header buffer (fuse_uring_req_header) and
  a payload buffer at least the negotiated max_write; every request taken from an entry
  is answered into that entry (``reply``) and committed before the entry is used again.
  A handler that answers nothing gets EIO, so the entry is never lost.
- Only requests go over the rings: FORGET, INTERRUPT and notifications keep /dev/fuse,
  which the server keeps reading (the kernel's fuse_io_uring_ops).
- Once INIT agreed on FUSE_OVER_IO_URING the kernel holds every new request until all
  queues registered or one registration failed; ``prepare`` therefore sets up every ring
  before INIT is answered, so a failure to set one up means io_uring is not offered.
- x86-64's ordering (stores are not reordered with stores, loads not with loads) and the
  system call between filling an SQE and the kernel reading it make plain stores and
  loads of the ring indices enough; no other architecture is claimed (``supported``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import mmap
import os
import platform
import queue
import resource
import struct
import threading
from collections.abc import Callable, Sequence

from encfs.fuseproto.wire import IN_HEADER, OUT_HEADER, Request

log = logging.getLogger("encfs.fuse")

FUSE_OVER_IO_URING = 1 << 41  # INIT flag (flags2 bit 9)
ENABLE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"

_SYS_IO_URING_SETUP, _SYS_IO_URING_ENTER = 425, 426  # the same numbers on every architecture
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQES = 0x10000000
IORING_OP_URING_CMD = 46
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2

_PARAMS = struct.Struct("<IIIIIII12x" + "IIIIIIIIQ" + "IIIIIIIIQ")  # io_uring_params (120 bytes)
_SQE_SIZE = 128
_SQE_HEAD = struct.Struct("<BBHiQQIIQ")  # opcode, flags, ioprio, fd, off (cmd_op), addr, len, op flags, user_data
_CMD_REQ = struct.Struct("<QQH6x")  # fuse_uring_cmd_req: flags, commit_id, qid; at byte 48 of the SQE
_CMD_AT = 48
_CQE = struct.Struct("<QiI")  # user_data, res, flags
_U32 = struct.Struct("<I")
_IOVEC = struct.Struct("<QQ")

# fuse_uring_req_header: in_out (fuse_in_header, then fuse_out_header), op_in, fuse_uring_ent_in_out
IN_OUT_SIZE = OP_IN_SIZE = 128
_ENT_IN_OUT = struct.Struct("<QQII8x")  # flags, commit_id, payload_sz, padding, reserved
HEADER_SIZE = IN_OUT_SIZE + OP_IN_SIZE + _ENT_IN_OUT.size
_ENT_AT = IN_OUT_SIZE + OP_IN_SIZE
WORKERS = 3  # per queue: threads that answer large reads and writes while its thread takes the next
IORING_OP_READ = 22
_WAKE = 1 << 32  # user_data of the eventfd read through which workers hand answered entries back
_CAP_SYS_NICE = 23
COPY_OUTSIDE_GIL = 64 << 10  # reply parts from this size are copied with ctypes.memmove

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def supported() -> bool:
    """Whether this machine could serve FUSE over io_uring: x86-64 Linux with the fuse module's
    ``enable_uring`` on (root decides that; the daemon never turns it on)."""
    if platform.machine() != "x86_64":
        return False
    try:
        with open(ENABLE_PARAMETER) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def possible_cpus() -> list[int]:
    """The kernel's possible CPUs (it makes one queue for each)."""
    with open(POSSIBLE_CPUS) as f:
        return parse_cpu_list(f.read())


def parse_cpu_list(text: str) -> list[int]:
    """A kernel CPU list ("0-3,8") as numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def _address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Ring:
    """One io_uring with 128-byte SQEs, entered by one thread."""

    def __init__(self, entries: int) -> None:
        params = bytearray(_PARAMS.size)
        flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        _PARAMS.pack_into(params, 0, 0, 0, flags, 0, 0, 0, 0, *([0] * 18))
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), pbuf)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        try:
            fields = _PARAMS.unpack_from(params)
            sq_entries, cq_entries, features = fields[0], fields[1], fields[5]
            sq_head, sq_tail, sq_mask, _, _, _, sq_array = fields[7:14]
            cq_head, cq_tail, cq_mask, _, _, cqes = fields[16:22]
            if not features & IORING_FEAT_SINGLE_MMAP:
                raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
            size = max(sq_array + 4 * sq_entries, cqes + _CQE.size * cq_entries)
            self._rings = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._sqes = mmap.mmap(fd, _SQE_SIZE * sq_entries, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self._sq_tail_at, self._sq_array_at = sq_tail, sq_array
        self._sq_head_at = sq_head
        self._sq_mask = _U32.unpack_from(self._rings, sq_mask)[0]
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq_head, cq_tail, cqes
        self._cq_mask = _U32.unpack_from(self._rings, cq_mask)[0]
        self._empty_sqe = bytes(_SQE_SIZE)
        self.unsubmitted = 0

    def prepare_cmd(self, fd: int, cmd_op: int, user_data: int, addr: int, length: int, cmd: bytes) -> None:
        """Fill the next SQE with IORING_OP_URING_CMD; submitted by the next enter()."""
        self._prepare(IORING_OP_URING_CMD, fd, cmd_op, user_data, addr, length, cmd)

    def _prepare(self, opcode: int, fd: int, off: int, user_data: int, addr: int, length: int, cmd: bytes) -> None:
        tail = _U32.unpack_from(self._rings, self._sq_tail_at)[0]
        index = tail & self._sq_mask
        at = index * _SQE_SIZE
        sqes = self._sqes
        sqes[at:at + _SQE_SIZE] = self._empty_sqe
        _SQE_HEAD.pack_into(sqes, at, opcode, 0, 0, fd, off, addr, length, 0, user_data)
        sqes[at + _CMD_AT:at + _CMD_AT + len(cmd)] = cmd
        _U32.pack_into(self._rings, self._sq_array_at + 4 * index, index)
        _U32.pack_into(self._rings, self._sq_tail_at, (tail + 1) & 0xFFFFFFFF)
        self.unsubmitted += 1

    def prepare_read(self, fd: int, user_data: int, addr: int, length: int) -> None:
        """Fill the next SQE with IORING_OP_READ of ``fd`` at its current position."""
        self._prepare(IORING_OP_READ, fd, 0xFFFFFFFFFFFFFFFF, user_data, addr, length, b"")

    def enter(self, wait: int) -> None:
        """Submit what was prepared and wait until ``wait`` completions are there."""
        submit, self.unsubmitted = self.unsubmitted, 0
        while True:
            n = _syscall(_SYS_IO_URING_ENTER, self.fd, submit, wait, IORING_ENTER_GETEVENTS if wait else 0, None,
                         ctypes.c_size_t(0))
            if n >= 0:
                submit -= n
                if not submit or not n:  # all submitted (or none could be: no spinning on it)
                    return
                continue
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def completions(self) -> list[tuple[int, int]]:
        """(user_data, res) of each completion there now, which are then consumed."""
        rings = self._rings
        head = _U32.unpack_from(rings, self._cq_head_at)[0]
        tail = _U32.unpack_from(rings, self._cq_tail_at)[0]
        done = []
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(rings, self._cqes_at + (head & self._cq_mask) * _CQE.size)
            done.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(rings, self._cq_head_at, head)
        return done

    def close(self) -> None:
        self._rings.close()
        self._sqes.close()
        os.close(self.fd)


class RingEntry:
    """One registered entry: its header buffer, payload buffer and the request it holds."""

    def __init__(self, payload: memoryview, qid: int = 0) -> None:
        self.qid = qid  # the queue (CPU) it belongs to; traced with its requests
        self.header = memoryview(bytearray(HEADER_SIZE))
        # The request's op header is copied just before the payload, so a request body is one view.
        self.buffer = payload
        self.payload = payload[OP_IN_SIZE:]
        self.payload_address = _address(self.payload)
        self.iovecs = bytearray(2 * _IOVEC.size)
        _IOVEC.pack_into(self.iovecs, 0, _address(self.header), HEADER_SIZE)
        _IOVEC.pack_into(self.iovecs, _IOVEC.size, _address(self.payload), len(self.payload))
        self.iovecs_address = _address(memoryview(self.iovecs))
        self.unique = 0  # the request being answered; 0 once its reply is in the buffers
        self.notices: list[tuple[int, bytes]] = []  # notifications to send once the reply is committed
        self.commit_id = 0

    def request(self) -> Request:
        """The request the kernel put in this entry, as /dev/fuse would have delivered it."""
        header = self.header
        length, opcode, unique, node, uid, gid, pid, extlen, pad = IN_HEADER.unpack_from(header)
        _, commit_id, payload_size, _ = _ENT_IN_OUT.unpack_from(header, _ENT_AT)
        op_size = length - IN_HEADER.size - payload_size
        if not 0 <= op_size <= OP_IN_SIZE or payload_size > len(self.payload):
            op_size, payload_size = 0, 0  # a body the opcode's size check then refuses
        start = OP_IN_SIZE - op_size
        self.buffer[start:OP_IN_SIZE] = header[IN_OUT_SIZE:IN_OUT_SIZE + op_size]
        self.unique, self.commit_id = unique, commit_id
        body = self.buffer[start:OP_IN_SIZE + payload_size]
        return Request(IN_HEADER.size + len(body), opcode, unique, node, uid, gid, pid, extlen, pad, body)

    def finish(self) -> None:
        """After the handler: a request it left unanswered gets EIO (the entry must be committed)."""
        if self.unique:
            log.error("FUSE request %d got no reply", self.unique)
            self.answer(-errno.EIO, ())

    def answer(self, error: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Put the reply (after its fuse_out_header) into the buffers."""
        at = 0
        payload = self.payload
        for part in parts:
            n = len(part)
            if at + n > len(payload):
                raise ValueError(f"a reply of more than {len(payload)} bytes")
            if n >= COPY_OUTSIDE_GIL and not (view := memoryview(part)).readonly:
                # ctypes calls run without the GIL: a large read's copy overlaps other requests.
                ctypes.memmove(self.payload_address + at, _address(view), n)
            else:
                payload[at:at + n] = part
            at += n
        OUT_HEADER.pack_into(self.header, 0, OUT_HEADER.size + at, error, self.unique)
        _ENT_IN_OUT.pack_into(self.header, _ENT_AT, 0, self.commit_id, at, 0)
        self.unique = 0


# What a queue does with each request: dispatch it (its handler replies through ``reply``).
Serve = Callable[[Request], object]
# Whether a request is worth answering in a worker thread (FuseServer.overlaps).
Overlaps = Callable[[Request], bool]
# Write a notification (code, payload) to /dev/fuse (FuseServer.send_notice).
SendNotice = Callable[[int, bytes], None]


def may_leave_idle_policy() -> bool:
    """Whether a thread of this process may go back from SCHED_IDLE to SCHED_OTHER
    (CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0): sched(7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_NICE & 1:
                    return True
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


class UringQueues:
    """The rings of one FUSE connection: set up before INIT (``prepare``), registered and served
    by one pinned thread per CPU after it (``start``)."""

    def __init__(self, dev_fd: int, cpus: list[int], payloads: Callable[[], memoryview],
                 overlaps: Overlaps, send_notice: SendNotice) -> None:
        self.dev_fd = dev_fd
        self._send_notice = send_notice
        self.cpus = cpus
        self._payloads = payloads
        self._overlaps = overlaps
        self._current = threading.local()  # the entry whose request this thread is handling
        self._setup = [threading.Event() for _ in cpus]
        self._start = threading.Event()
        self._failed: OSError | None = None
        self._serve: Serve | None = None
        self._yield_cpu = may_leave_idle_policy()
        self.threads: list[threading.Thread] = []

    @classmethod
    def prepare(cls, dev_fd: int, payloads: Callable[[], memoryview], overlaps: Overlaps,
                send_notice: SendNotice) -> UringQueues | None:
        """Set up one ring per possible CPU, each in its own (waiting) thread; None if io_uring
        is not supported here or a ring could not be set up (logged: the server keeps /dev/fuse)."""
        if not supported():
            return None
        try:
            queues = cls(dev_fd, possible_cpus(), payloads, overlaps, send_notice)
        except (OSError, ValueError) as e:
            log.warning("FUSE over io_uring not used: %s", e)
            return None
        for qid in range(len(queues.cpus)):
            t = threading.Thread(target=queues._run, args=(qid,), daemon=True, name=f"fuse-uring-{qid}")
            t.start()
            queues.threads.append(t)
        for ready in queues._setup:
            ready.wait()
        if queues._failed is not None:
            log.warning("FUSE over io_uring not used: %s", queues._failed)
            queues._start.set()  # the threads see no handler and end
            return None
        return queues

    def start(self, serve: Serve) -> None:
        """INIT agreed on FUSE_OVER_IO_URING: register every entry and serve."""
        self._serve = serve
        self._start.set()

    def abandon(self) -> None:
        """INIT did not agree: the threads end without registering."""
        self._start.set()

    def current(self) -> RingEntry | None:
        return getattr(self._current, "entry", None)

    def _run(self, qid: int) -> None:
        ring = None
        workers = None
        try:
            try:
                try:
                    os.sched_setaffinity(0, {self.cpus[qid]})
                except OSError:
                    pass  # a CPU outside this process's set: served unpinned
                ring = Ring(4 * (1 + WORKERS))
                entries = [RingEntry(self._payloads(), qid)]
                workers = _Workers(self, entries, WORKERS, qid)
            except OSError as e:
                self._failed = e
                return
            finally:
                self._setup[qid].set()
            self._start.wait()
            serve = self._serve
            if serve is None:
                return
            workers.start(serve)
            for i, entry in enumerate(entries):
                ring.prepare_cmd(self.dev_fd, FUSE_IO_URING_CMD_REGISTER, i, entry.iovecs_address, 2,
                                 _CMD_REQ.pack(0, 0, qid))
            self._loop(qid, ring, entries, serve, workers)
        finally:
            if workers is not None:
                workers.stop()
            if ring is not None:
                ring.close()

    def _loop(self, qid: int, ring: Ring, entries: list[RingEntry], serve: Serve, workers: _Workers) -> None:
        """Answer each request in this thread, or hand a large one to a worker; commit the answers.

        Before waiting, the thread takes the SCHED_IDLE policy when it may leave it again: a
        reply wakes its caller, and the scheduler puts a woken process on an idle CPU if there is
        one, which here is the other, halted vCPU. A CPU running only SCHED_IDLE threads counts
        as idle, so the caller stays on this one (docs/dev/fuse-python.md, "FUSE over io_uring")."""
        current = self._current
        wake_buf = memoryview(bytearray(8))
        wake_address = _address(wake_buf)
        ring.prepare_read(workers.wake_fd, _WAKE, wake_address, 8)
        yield_cpu = self._yield_cpu
        idle, other = os.sched_param(0), os.sched_param(0)
        lost = 0
        handed = 0  # entries with the workers, not yet committed
        while True:
            # Not while workers run: woken by one of them, this thread would wait behind the other.
            idling = yield_cpu and not handed
            if idling:
                os.sched_setscheduler(0, os.SCHED_IDLE, idle)
            ring.enter(1)
            if idling:
                os.sched_setscheduler(0, os.SCHED_OTHER, other)
            for user_data, res in ring.completions():
                if user_data == _WAKE:
                    answered = workers.answered
                    while answered:
                        i = answered.popleft()
                        handed -= 1
                        self._commit(ring, qid, i, entries[i])
                    ring.prepare_read(workers.wake_fd, _WAKE, wake_address, 8)
                    continue
                if res < 0:
                    if res in (-errno.ENOTCONN, -errno.ECANCELED, -errno.ENODEV):
                        return  # the connection is ending
                    # A refused registration (then /dev/fuse carries the requests) or commit: that
                    # entry is the kernel's no more.
                    log.error("FUSE over io_uring queue %d, entry %d: %s", qid, user_data, os.strerror(-res))
                    lost += 1
                    if lost == len(entries):
                        return
                    continue
                entry = entries[user_data]
                req = entry.request()
                if workers.count and self._overlaps(req):
                    workers.jobs.put((user_data, req))
                    handed += 1
                    continue
                current.entry = entry
                try:
                    serve(req)
                finally:
                    current.entry = None
                    entry.finish()
                self._commit(ring, qid, user_data, entry)

    def _commit(self, ring: Ring, qid: int, index: int, entry: RingEntry) -> None:
        """Commit the entry's reply (and fetch its next request) at the next enter; with
        notifications to send after it, submit now and send them."""
        ring.prepare_cmd(self.dev_fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, index, 0, 0,
                         _CMD_REQ.pack(0, entry.commit_id, qid))
        if entry.notices:
            ring.enter(0)
            notices, entry.notices = entry.notices, []
            for code, payload in notices:
                try:
                    self._send_notice(code, payload)
                except OSError as e:
                    log.warning("could not send a FUSE notification: %s", e.strerror)


class _Workers:
    """The threads that answer one queue's large reads and writes. Each brings an entry whose
    payload buffer it took in its own thread (the sealing worker's arena gives one per thread);
    an answered entry goes back to the queue's thread through ``answered`` and an eventfd,
    since only that thread may submit to the ring."""

    def __init__(self, queues: UringQueues, entries: list[RingEntry], count: int, qid: int) -> None:
        self.count = count
        self._qid = qid
        self.jobs: queue.SimpleQueue[tuple[int, Request] | None] = queue.SimpleQueue()
        self.answered: collections.deque[int] = collections.deque()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._queues = queues
        self._entries = entries
        self._serve: Serve | None = None
        self._started = threading.Event()
        for _ in range(count):
            ready = threading.Event()
            threading.Thread(target=self._work, args=(ready,), daemon=True, name="fuse-uring-worker").start()
            ready.wait()

    def start(self, serve: Serve) -> None:
        self._serve = serve
        self._started.set()

    def stop(self) -> None:
        for _ in range(self.count):
            self.jobs.put(None)
        self._started.set()
        os.close(self.wake_fd)

    def _work(self, ready: threading.Event) -> None:
        try:
            self._entries.append(RingEntry(self._queues._payloads(), self._qid))
        finally:
            ready.set()
        self._started.wait()
        serve = self._serve
        current = self._queues._current
        while serve is not None:
            job = self.jobs.get()
            if job is None:
                return
            i, req = job
            entry = self._entries[i]
            current.entry = entry
            try:
                serve(req)
            finally:
                current.entry = None
                entry.finish()
                self.answered.append(i)
                os.eventfd_write(self.wake_fd, 1)
