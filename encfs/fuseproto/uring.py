"""FUSE over io_uring: one queue per CPU carrying the requests /dev/fuse would.

The kernel (6.14 and later, with the fuse module's ``enable_uring`` on) sends a request
from a process running on CPU n to queue n, whose thread here is pinned to that CPU and
waits as SCHED_IDLE: the reply then wakes the caller on the CPU it already runs on,
instead of waking a halted second vCPU (docs/dev/fuse-python.md, "FUSE over io_uring").
The answer and the wait for the next request are one system call
(FUSE_IO_URING_CMD_COMMIT_AND_FETCH). The rings themselves: ioring.py.

Invariants:
- A queue's ring is created, filled and entered only by its own thread (ioring.py); its
  workers hand answered entries back through ``answered`` and an eventfd whose read the
  ring keeps pending.
- Each entry is a header buffer (fuse_uring_req_header) and a payload buffer of at least
  the negotiated max_write. A request taken from an entry is answered into that entry
  (the server's reply/reply_error while ``current()`` is it) and committed before the
  entry is used again; one its handler left unanswered gets EIO through reply_error.
- Only requests go over the rings: FORGET, INTERRUPT and notifications keep /dev/fuse
  (the kernel's fuse_io_uring_ops). A notification made while answering a ring's
  request goes to the notifier thread once that reply's commit is submitted: the kernel
  may hold a lock it needs until the reply, and the queue's thread must stay free to
  take the requests that would release it.
- Once INIT agreed on FUSE_OVER_IO_URING the kernel holds every new request until all
  queues registered or one registration failed; ``prepare`` sets up every ring and
  thread before INIT is answered (any failure: io_uring is not offered). A refused
  registration makes the kernel use /dev/fuse: the server is told (``fall_back``).
- ``stop`` ends the queues: no request is taken in after it, and it returns once the
  threads ended or STOP_SECONDS passed (then False: serve()'s caller must not call the
  shutdown clean); requests left in the kernel end with the connection.
- A queue whose thread fails ends the mount (SIGTERM to this process): its CPU's requests,
  or before it registered every request, would otherwise wait forever.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import queue
import signal
import struct
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from encfs.fuseproto.ioring import Ring, address, supported_machine
from encfs.fuseproto.threadpolicy import (
    idle_policy_works,
    leave_signals_to_the_main_thread,
    may_leave_idle_policy,
    take_idle_policy,
    take_normal_policy,
)
from encfs.fuseproto.wire import IN_HEADER, OUT_HEADER, Request

log = logging.getLogger("encfs.fuse")

FUSE_OVER_IO_URING = 1 << 41  # INIT flag (flags2 bit 9)
ENABLE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
_CMD_REQ = struct.Struct("<QQH6x")  # fuse_uring_cmd_req: flags, commit_id, qid
_IOVEC = struct.Struct("<QQ")

# fuse_uring_req_header: in_out (fuse_in_header, then fuse_out_header), op_in, fuse_uring_ent_in_out
IN_OUT_SIZE = OP_IN_SIZE = 128
_ENT_IN_OUT = struct.Struct("<QQII8x")  # flags, commit_id, payload_sz, padding, reserved
HEADER_SIZE = IN_OUT_SIZE + OP_IN_SIZE + _ENT_IN_OUT.size
_ENT_AT = IN_OUT_SIZE + OP_IN_SIZE
# Per queue: threads that answer large reads and writes while the queue's thread takes the next.
# On two CPUs the queues then take six of the sealing worker's eight arena slots (serve()'s own
# thread a seventh).
WORKERS = 2
COPY_OUTSIDE_GIL = 64 << 10  # reply parts from this size are copied with ctypes.memmove
STOP_SECONDS = 30  # how long stop() waits for each thread
_WAKE = 1 << 32  # user_data of the eventfd read that wakes a queue's thread
_CONNECTION_ENDED = (-errno.ENOTCONN, -errno.ECANCELED, -errno.ENODEV, -errno.ECONNABORTED)


def supported() -> bool:
    """Whether this machine could serve FUSE over io_uring: x86-64 with the fuse module's
    ``enable_uring`` on (root decides that; the daemon never turns it on)."""
    if not supported_machine():
        return False
    try:
        with open(ENABLE_PARAMETER) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def queue_count() -> int:
    """How many queues the kernel makes: one per possible CPU. It takes a request's queue to be
    its caller's CPU number (task_cpu), so queue n is pinned to CPU n."""
    with open(POSSIBLE_CPUS) as f:
        return len(parse_cpu_list(f.read()))


def parse_cpu_list(text: str) -> list[int]:
    """A kernel CPU list ("0-3,8") as numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


class RingEntry:
    """One registered entry: its header buffer, payload buffer and the request it holds."""

    def __init__(self, payload: memoryview, qid: int = 0) -> None:
        self.qid = qid  # the queue (CPU) it belongs to; traced with its requests
        self.header = memoryview(bytearray(HEADER_SIZE))
        # The request's op header is copied just before the payload, so a request body is one view.
        self.buffer = payload
        self.payload = payload[OP_IN_SIZE:]
        self.payload_address = address(self.payload)
        self.iovecs = bytearray(2 * _IOVEC.size)
        _IOVEC.pack_into(self.iovecs, 0, address(self.header), HEADER_SIZE)
        _IOVEC.pack_into(self.iovecs, _IOVEC.size, address(self.payload), len(self.payload))
        self.iovecs_address = address(memoryview(self.iovecs))
        self.unique = 0  # the request being answered; 0 once its reply is in the buffers
        self.notices: list[tuple[int, bytes]] = []  # notifications to send once the reply is committed
        self.commit_id = 0
        self.fetched = False  # a request came: its registration was taken

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
        self.unique, self.commit_id, self.fetched = unique, commit_id, True
        body = self.buffer[start:OP_IN_SIZE + payload_size]
        return Request(IN_HEADER.size + len(body), opcode, unique, node, uid, gid, pid, extlen, pad, body)

    def finish(self) -> None:
        """After the handler, as the last resort: a request still unanswered gets EIO (the
        entry must be committed; UringQueues answers through the server's reply_error first)."""
        if self.unique:
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
                ctypes.memmove(self.payload_address + at, address(view), n)
            else:
                payload[at:at + n] = part
            at += n
        OUT_HEADER.pack_into(self.header, 0, OUT_HEADER.size + at, error, self.unique)
        _ENT_IN_OUT.pack_into(self.header, _ENT_AT, 0, self.commit_id, at, 0)
        self.unique = 0


class UringServer(Protocol):
    """What the queues need of the FUSE server (encfs.fuseproto.server.FuseServer)."""

    fd: int  # the /dev/fuse descriptor

    def request_buffer(self) -> memoryview: ...

    def overlaps(self, req: Request) -> bool: ...

    def handle(self, req: Request) -> object: ...

    def reply_error(self, unique: int, error: int) -> None: ...

    def send_notice(self, code: int, payload: bytes) -> None: ...

    def fall_back(self) -> None: ...


class UringQueues:
    """The rings of one FUSE connection: set up before INIT (``prepare``), registered and served
    by one pinned thread per CPU after it (``start``), ended by ``stop``."""

    def __init__(self, server: UringServer, count: int) -> None:
        self.count = count
        self._server = server
        self._current = threading.local()  # the entry whose request this thread is answering
        self._setup = [threading.Event() for _ in range(count)]
        self._start = threading.Event()
        self._failed: BaseException | None = None
        self._serving = False
        self._stopping = False
        self._fell_back = False
        self._lock = threading.Lock()
        self._workers: dict[int, _Workers] = {}
        self._notices: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._notifier: threading.Thread | None = None
        self._deadline = 0.0  # when stop() stops waiting (monotonic)
        self.threads: list[threading.Thread] = []

    @classmethod
    def prepare(cls, server: UringServer) -> UringQueues | None:
        """Set up one ring per queue, each in its own (waiting) thread; None if io_uring is not
        supported here or anything of it could not be set up (logged: /dev/fuse serves)."""
        if not supported():
            return None
        try:
            queues = cls(server, queue_count())
        except (OSError, ValueError) as e:
            log.warning("FUSE over io_uring not used: %s", e)
            return None
        try:
            for qid in range(queues.count):
                t = threading.Thread(target=queues._run, args=(qid,), daemon=True, name=f"fuse-uring-{qid}")
                t.start()
                queues.threads.append(t)
            notifier = threading.Thread(target=queues._notify_loop, daemon=True, name="fuse-uring-notify")
            notifier.start()
            queues._notifier = notifier
        except RuntimeError as e:  # no more threads (a pids limit)
            queues._failed = e
            for ready in queues._setup[len(queues.threads):]:
                ready.set()
        for ready in queues._setup:
            ready.wait()
        if queues._failed is not None:
            log.warning("FUSE over io_uring not used: %s", queues._failed)
            queues.abandon()
            return None
        return queues

    def start(self) -> None:
        """INIT agreed on FUSE_OVER_IO_URING: register every entry and serve. Starts nothing
        (a thread that cannot start here would leave the kernel waiting for the queues)."""
        self._serving = True
        self._start.set()

    @property
    def carry_requests(self) -> bool:
        """The rings carry the requests: started, and no registration was refused (fall_back)."""
        return self._serving and not self._fell_back

    def abandon(self) -> None:
        """INIT did not agree (or a setup failed): the threads end without registering."""
        self._start.set()
        self.stop()

    def stop(self) -> bool:
        """Take no more requests in; wait, STOP_SECONDS in all at most, for the requests being
        answered and the threads. False if a thread had not ended by then."""
        self._stopping = True
        self._start.set()
        deadline = time.monotonic() + STOP_SECONDS
        self._deadline = deadline
        for workers in list(self._workers.values()):
            workers.wake()
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._notifier is not None:
            self._notices.put(None)
            self._notifier.join(max(0.0, deadline - time.monotonic()))
            if not self._notifier.is_alive():
                self._notifier = None
        return not any(t.is_alive() for t in self.threads) and self._notifier is None

    def current(self) -> RingEntry | None:
        return getattr(self._current, "entry", None)

    def _run(self, qid: int) -> None:
        leave_signals_to_the_main_thread()  # before it starts workers: they inherit the mask
        ring = workers = None
        try:
            try:
                yield_cpu = may_leave_idle_policy() and idle_policy_works()
                ring = Ring(4 * (1 + WORKERS))
                entries = [RingEntry(self._server.request_buffer(), qid)]
                # Made before this thread is pinned: they inherit its CPUs, and large reads and
                # writes go faster spread over all of them.
                workers = self._workers[qid] = _Workers(self, entries, WORKERS, qid)
                try:
                    os.sched_setaffinity(0, {qid})
                except OSError:
                    pass  # a CPU outside this process's set: served unpinned
            except BaseException as e:  # noqa: BLE001 - prepare() reports it; io_uring is then not offered
                self._failed = e
                return
            finally:
                self._setup[qid].set()
            self._start.wait()
            if not self._serving:
                return
            for i, entry in enumerate(entries):
                ring.prepare_cmd(self._server.fd, FUSE_IO_URING_CMD_REGISTER, i, entry.iovecs_address, 2,
                                 _CMD_REQ.pack(0, 0, qid))
            try:
                self._loop(qid, ring, entries, workers, yield_cpu)
            except Exception:
                # Requests from this CPU (or, before it registered, every request) would wait
                # forever: end the mount as SIGTERM does (mount.py), rather than hang it.
                log.exception("FUSE over io_uring queue %d failed: unmounting", qid)
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            if workers is not None:
                workers.stop(self._deadline or time.monotonic() + STOP_SECONDS)
            if ring is not None:
                ring.close()

    def _loop(self, qid: int, ring: Ring, entries: list[RingEntry], workers: _Workers, yield_cpu: bool) -> None:
        """Answer each request in this thread, or hand a large one to a worker; commit the answers.

        Before waiting, the thread takes the SCHED_IDLE policy (``yield_cpu``): a reply wakes its
        caller, and the scheduler puts a woken process on an idle CPU if there is one, here the
        other vCPU, a wake-up that costs an interrupt between CPUs. A CPU running only SCHED_IDLE
        threads counts as idle, so the caller stays on this one. Not while workers hold entries: woken by one of them, an idle thread
        would wait behind the others."""
        current = self._current
        wake_buf = memoryview(bytearray(8))
        wake_address = address(wake_buf)
        ring.prepare_read(workers.wake_fd, _WAKE, wake_address, 8)
        handed = lost = 0  # entries with the workers; entries the kernel gave up
        while True:
            idling = yield_cpu and not handed and take_idle_policy()
            try:
                ring.enter(1)
            finally:
                if idling:
                    take_normal_policy()
            for user_data, res in ring.completions():
                if user_data == _WAKE:
                    answered = workers.answered
                    while answered:
                        i = answered.popleft()
                        handed -= 1
                        self._commit(ring, qid, i, entries[i])
                    if self._stopping and not handed:
                        return
                    ring.prepare_read(workers.wake_fd, _WAKE, wake_address, 8)
                    continue
                entry = entries[user_data]
                if res < 0:
                    if res in _CONNECTION_ENDED:
                        return
                    if not entry.fetched:  # the kernel refused the registration
                        log.error("FUSE over io_uring queue %d: registration refused: %s", qid, os.strerror(-res))
                        self._fall_back()
                    else:
                        log.error("FUSE over io_uring queue %d, entry %d: %s", qid, user_data, os.strerror(-res))
                    lost += 1
                    if lost == len(entries):
                        return
                    continue
                if self._stopping:
                    continue  # taken in after stop(): it ends with the connection
                req = entry.request()
                if workers.count and self._server.overlaps(req):
                    workers.jobs.put((user_data, req))
                    handed += 1
                    continue
                current.entry = entry
                try:
                    self._server.handle(req)
                finally:
                    self._answer_unanswered(entry)
                    current.entry = None
                self._commit(ring, qid, user_data, entry)

    def _commit(self, ring: Ring, qid: int, index: int, entry: RingEntry) -> None:
        """Commit the entry's answer (and fetch its next request) at the next enter; with
        notifications to follow it, submit now and hand them to the notifier thread."""
        ring.prepare_cmd(self._server.fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, index, 0, 0,
                         _CMD_REQ.pack(0, entry.commit_id, qid))
        if entry.notices:
            ring.enter(0)  # the kernel ends the request within the submission
            for notice in entry.notices:
                self._notices.put(notice)
            entry.notices = []

    def _answer_unanswered(self, entry: RingEntry) -> None:
        """A request its handler left unanswered gets EIO, as the server answers errors."""
        if entry.unique:
            log.error("FUSE request %d got no reply: answering EIO", entry.unique)
            try:
                self._server.reply_error(entry.unique, errno.EIO)
            finally:
                entry.finish()

    def _fall_back(self) -> None:
        with self._lock:
            if self._fell_back:
                return
            self._fell_back = True
        self._server.fall_back()

    def _notify_loop(self) -> None:
        leave_signals_to_the_main_thread()
        while (notice := self._notices.get()) is not None:
            try:
                self._server.send_notice(*notice)
            except OSError as e:
                log.warning("could not send a FUSE notification: %s", e.strerror)


class _Workers:
    """The threads that answer one queue's large reads and writes. Each brings an entry whose
    payload buffer it took in its own thread (the sealing worker's arena gives one slot per
    thread while it has slots); an answered entry goes back to the queue's thread through
    ``answered`` and the eventfd, since only that thread may submit to the ring."""

    def __init__(self, queues: UringQueues, entries: list[RingEntry], count: int, qid: int) -> None:
        self.count = count
        self.jobs: queue.SimpleQueue[tuple[int, Request] | None] = queue.SimpleQueue()
        self.answered: collections.deque[int] = collections.deque()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._closed = False
        self._lock = threading.Lock()
        self._queues = queues
        self._entries = entries
        self._qid = qid
        self._threads: list[threading.Thread] = []
        try:
            for _ in range(count):
                ready = threading.Event()
                t = threading.Thread(target=self._work, args=(ready,), daemon=True, name=f"fuse-uring-{qid}-worker")
                t.start()
                self._threads.append(t)
                ready.wait()
            if len(entries) != 1 + count:
                raise OSError(errno.ENOMEM, "a worker thread could not set up its ring entry")
        except BaseException:
            self.stop(time.monotonic() + STOP_SECONDS)
            raise

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.wake_fd, 1)

    def stop(self, deadline: float) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if not any(t.is_alive() for t in self._threads):  # else one may yet wake the queue
                self._closed = True
                os.close(self.wake_fd)

    def _work(self, ready: threading.Event) -> None:
        try:
            self._entries.append(RingEntry(self._queues._server.request_buffer(), self._qid))
        except Exception:  # __init__ sees the entry missing
            log.exception("FUSE over io_uring: a worker's ring entry")
            return
        finally:
            ready.set()
        queues, current = self._queues, self._queues._current
        while (job := self.jobs.get()) is not None:
            i, req = job
            entry = self._entries[i]
            current.entry = entry
            try:
                queues._server.handle(req)
            finally:
                try:
                    queues._answer_unanswered(entry)
                finally:
                    current.entry = None
                    self.answered.append(i)  # the queue's thread commits it, whatever happened
                    self.wake()
