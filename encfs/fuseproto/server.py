"""The FUSE server loop over /dev/fuse, shared by the filesystem (encfs.fuse.server) and the
volume server (encfs.block.fuseserver).

Speaking the protocol ourselves, rather than through libfuse bindings, gives FALLOCATE
(discard) to volumes and removes a per-request event-loop round trip from the filesystem.

Invariants:
- One request is read whole per read(2) on the device; the reply (or an error)
  is written with one writev(2), so threads may share the descriptor.
- One thread at a time (the leader) reads the device. It handles what it read
  itself, and hands the reading over to an idle thread first only for large
  reads and writes (``overlaps``), which then run alongside the next request.
  Before sleeping in read(2) the leader polls the device for SPIN_SECONDS,
  unless such handed-over requests are still running (polling would take the
  GIL from them; more requests of theirs are soon to come anyway), or it keeps
  to a waiting caller's CPU (``follow_caller``, followcaller.py: that caller's
  next request wakes it there).
- Every request is checked against wire.OPS before its handler runs: a body too short
  for its opcode is answered EINVAL and never unpacked.
- A reply that the kernel rejects with ENOENT belongs to a request that was
  interrupted meanwhile; that is not an error.
- Opcodes whose OPS entry says no reply (FORGET, BATCH_FORGET, INTERRUPT) get none,
  even when they fail.
- ``FuseServer.serve`` returns on DESTROY, on ENODEV (the mount is gone) or
  after ``stop()``; worker threads are daemon threads that end with the
  connection.
- With ``io_uring`` and the kernel agreeing at INIT (FUSE_OVER_IO_URING), requests
  come over one ring per CPU (uring.py) and ``reply``/``reply_error`` put the answer
  into the request's ring entry; only serve()'s own thread reads /dev/fuse then
  (FORGET, BATCH_FORGET, INTERRUPT), at most once per FORGET_BATCH_SECONDS, unless the
  kernel refused a ring (``fall_back``). A notification made while answering a ring's
  request is sent once that reply is committed, as it would follow a reply written
  to /dev/fuse.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable

from encfs.fuseproto.followcaller import CallerFollower
from encfs.fuseproto.keepawake import KeepAwake
from encfs.fuseproto.memory import keep_freed_memory
from encfs.fuseproto.threadpolicy import idle_policy_works, leave_signals_to_the_main_thread, may_leave_idle_policy
from encfs.fuseproto.uring import FUSE_OVER_IO_URING, STOP_SECONDS, RingEntry, UringQueues
from encfs.fuseproto.wire import (
    BUFFER_SIZE,
    FUSE_INIT_EXT,
    IN_HEADER,
    INIT_IN,
    INIT_IN_FLAGS2,
    INIT_OUT,
    MAX_WRITE,
    OPS,
    OUT_HEADER,
    PROTOCOL_MINOR,
    READ,
    READ_IN,
    UNKNOWN_OP,
    WRITE,
    FuseError,
    Op,
    Request,
    malformed,
)

log = logging.getLogger("encfs.fuse")
trace = logging.getLogger("encfs.fuse.trace")

GIL_SWITCH_INTERVAL = 0.0002  # seconds; see FuseServer.serve
# How long the reading thread polls for the next request before it sleeps in read(2), and
# the request size from which a read or write is handed to its own thread; see FuseServer._loop.
SPIN_SECONDS = 100e-6
OVERLAP_BYTES = 64 << 10
# Over io_uring, how long serve()'s thread waits before each read of /dev/fuse, which then brings
# only FORGETs and INTERRUPTs: the kernel sends the forgets queued meanwhile as one BATCH_FORGET.
# Read one at a time, each unlink's forget woke the thread, whose GIL then held up the queue
# thread's next request (benchmarks/HISTORY.md, ninth round of #25: deletes over io_uring 1.09x
# in the harness, 1.4x in a loop of 3,000 unlinks).
FORGET_BATCH_SECONDS = 2e-3


class StopServing(Exception):
    """Raised by stop() (from a signal handler) to end a wait for the next request."""


Handler = Callable[[Request], "bool | None"]


class FuseServer:
    """Reads requests from a /dev/fuse descriptor and hands each to its handler.

    Subclasses fill ``handlers`` (opcode -> handler); a handler answers with ``reply`` or
    ``reply_error`` (or not at all, for opcodes without a reply) and returns False to end
    serving. A FuseError it raises is answered with its errno; an opcode with no handler
    gets ENOSYS, and a body too short for its opcode (wire.OPS) EINVAL, before any handler.
    With ``trace`` (``encfs mount --debug``), every request and error reply is logged by
    opcode name to the logger ``encfs.fuse.trace``.
    """

    def __init__(self, fd: int, trace: bool = False, io_uring: bool = False, awake: KeepAwake | None = None,
                 follow_caller: bool = False) -> None:
        self.fd = fd
        self.follow_caller = follow_caller  # answer awaited requests on their caller's CPU (followcaller.py)
        self.follower: CallerFollower | None = None  # serve() makes it where the policies allow
        self.io_uring = io_uring  # offer FUSE over io_uring when the kernel has it on (uring.py)
        self.awake = awake  # told of each request the leader waited for (keepawake.py)
        self.uring: UringQueues | None = None  # the rings, once set up (before INIT)
        self._threads = 1
        self._affinity: set[int] | None = None  # serve()'s CPUs, for threads a pinned one starts
        self.stopped_cleanly = True  # False: serve() returned with requests perhaps still answered
        self.handlers: dict[int, Handler] = {}
        self.trace = trace
        self.uid, self.gid = os.getuid(), os.getgid()
        self._running = True
        self.agreed_flags = 0  # the INIT flags both sides set (init_reply), 64 bits
        self._idle = False
        self._awaited = False  # set by _next_request for the leader's latest request
        self._leader = threading.Lock()  # held by the one thread that reads the device
        self._overlapping = 0  # handed-over requests still running
        self._overlapping_lock = threading.Lock()
        self.unmounted = False  # the kernel ended the connection (ENODEV)
        self.io_errors = 0  # requests answered EIO since start (`encfs status`: "errors since start")
        self._io_errors_lock = threading.Lock()

    def _ring_entry(self) -> RingEntry | None:
        """The ring entry whose request this thread is answering (None: not over io_uring)."""
        uring = self.uring
        return uring.current() if uring is not None else None

    def reply(self, unique: int, *payload: bytes | bytearray | memoryview) -> None:
        uring = self.uring  # read once: _abandon_uring() may clear it from another thread
        if uring is not None:
            entry = uring.current()
            if entry is not None and entry.unique == unique:
                entry.answer(0, payload)
                return
        # Most replies have one part: no generator for them (a 4 KiB READ's reply, every entry).
        length = OUT_HEADER.size + (len(payload[0]) if len(payload) == 1 else sum(map(len, payload)))
        follower = self.follower
        if follower is not None and follower.pinned and follower.local.reply_idle:
            follower.before_reply()
        self._send([OUT_HEADER.pack(length, 0, unique), *payload])

    def reply_error(self, unique: int, error: int) -> None:
        if error == errno.EIO:  # damaged or unauthenticated data, failing storage, a bug
            with self._io_errors_lock:
                self.io_errors += 1
        if self.trace:
            trace.debug("  unique=%d -> %s", unique, errno.errorcode.get(error, error))
        entry = self._ring_entry()
        if entry is not None and entry.unique == unique:
            entry.answer(-error, ())
            return
        if self.follower is not None and self.follower.pinned and self.follower.local.reply_idle:
            self.follower.before_reply()
        self._send([OUT_HEADER.pack(OUT_HEADER.size, -error, unique)])

    def notify(self, code: int, payload: bytes) -> None:
        """Send a notification through /dev/fuse. Handling a request that came over a ring, it
        goes once that request's reply is committed, as a reply written to /dev/fuse is before
        the handler's notifications (the kernel may hold a lock the notification needs until
        the reply: stalenames.py)."""
        entry = self._ring_entry()
        if entry is not None:
            entry.notices.append((code, payload))
            return
        self.send_notice(code, payload)

    def send_notice(self, code: int, payload: bytes) -> None:
        self._send([OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0), payload])

    def _send(self, parts: list[bytes | bytearray | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                raise

    def init_reply(self, req: Request, wanted_flags: int) -> bool:
        """Answer INIT: protocol 7.PROTOCOL_MINOR, the wanted flags the kernel offers (64 bits:
        the upper half travels in flags2 when both sides set FUSE_INIT_EXT), 1 MiB writes."""
        major, minor, max_readahead, flags = INIT_IN.unpack_from(req.body)
        if major != 7:
            self.reply_error(req.unique, errno.EPROTO)
            self._abandon_uring()
            return False
        if flags & FUSE_INIT_EXT and len(req.body) >= INIT_IN.size + INIT_IN_FLAGS2.size:
            flags |= INIT_IN_FLAGS2.unpack_from(req.body, INIT_IN.size)[0] << 32
        if self.uring is not None:
            wanted_flags |= FUSE_OVER_IO_URING
        agreed = flags & wanted_flags
        if agreed >> 32:
            agreed |= FUSE_INIT_EXT
        self.agreed_flags = agreed
        self.reply(req.unique, INIT_OUT.pack(7, min(minor, PROTOCOL_MINOR), max_readahead, agreed & 0xFFFFFFFF,
                                             16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0, agreed >> 32))
        if self.uring is not None:
            if agreed & FUSE_OVER_IO_URING:
                self.uring.start()  # the kernel holds new requests until every queue registered
                log.info("serving FUSE over io_uring, %d queues", self.uring.count)
            else:
                self._abandon_uring()
                self._start_threads()
        return True

    def _abandon_uring(self) -> None:
        """INIT did not agree on FUSE over io_uring: the rings' threads end unregistered."""
        if self.uring is not None:
            self.uring.abandon()
            self.uring = None

    def stop(self) -> None:
        """Make serve() return after the current request. Meant for a signal handler:
        if serve() is waiting for a request, it is interrupted at once."""
        self._running = False
        if self._idle:
            raise StopServing

    def dispatch(self, req: Request, op: Op) -> bool:
        """Check the request against its opcode and run its handler; False ends serving."""
        if self.trace:
            entry = self._ring_entry()
            trace.debug("%s unique=%d node=%d uid=%d pid=%d len=%d%s", op.name, req.unique, req.node, req.uid,
                        req.pid, req.length, "" if entry is None else f" queue={entry.qid}")
        bad = malformed(op, req.body)
        if bad is not None:
            log.error("malformed FUSE request %d: %s", req.unique, bad)
            raise FuseError(errno.EINVAL)
        handler = self.handlers.get(req.opcode)
        if handler is None:
            raise FuseError(errno.ENOSYS)
        return handler(req) is not False

    def on_failure(self, req: Request, exc: Exception) -> None:
        """An exception other than FuseError escaped a handler: answer EIO."""
        log.exception("FUSE request %s failed", OPS.get(req.opcode, UNKNOWN_OP).name, exc_info=exc)
        self.reply_error(req.unique, errno.EIO)

    def overlaps(self, req: Request) -> bool:
        """Whether a request is worth running alongside the next one: reads and writes of at least
        OVERLAP_BYTES (handing the device to another thread costs a thread wake-up)."""
        if req.opcode == READ:
            size: int = READ_IN.unpack_from(req.body)[2] if len(req.body) >= READ_IN.size else 0
            return size >= OVERLAP_BYTES
        return req.opcode == WRITE and req.length >= OVERLAP_BYTES

    def serve(self, threads: int = 1) -> None:
        """Handle requests until unmounted, DESTROY or stop(), with ``threads`` threads.

        With more than one thread, the process's GIL switch interval drops to
        GIL_SWITCH_INTERVAL: a thread woken for the next request otherwise waits
        out the default 5 ms for the GIL while another decrypts (the daemon
        process runs nothing else). Freed memory is kept for reuse (keep_freed_memory)."""
        keep_freed_memory()
        if threads > 1:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self._affinity = os.sched_getaffinity(0)
        if self.io_uring:
            self.uring = UringQueues.prepare(self)
        if (self.follow_caller and self.uring is None and self.awake is None and may_leave_idle_policy()
                and idle_policy_works()):
            self.follower = CallerFollower(self._affinity)
        self._threads = threads
        if self.uring is None:
            self._start_threads()
        try:
            self._loop(True)
        finally:
            if self.follower is not None:  # what the caller does next (unmount's work) is not pinned
                self.follower.stop_following()
            if self.uring is not None and not self.uring.stop():  # no request is answered after
                log.error("FUSE over io_uring: requests still being answered after %d s", STOP_SECONDS)
                self.stopped_cleanly = False

    def _start_threads(self) -> None:
        """The threads beside serve()'s own that read /dev/fuse (only that one, FORGETs and
        INTERRUPTs, once FUSE over io_uring carries the requests)."""
        for _ in range(self._threads - 1):
            threading.Thread(target=self._worker, daemon=True, name="fuse-worker").start()

    def _worker(self) -> None:
        """A thread beside serve()'s own: it leaves the stop signals to the main thread and, if a
        queue's pinned thread started it (fall_back), takes serve()'s CPUs back."""
        leave_signals_to_the_main_thread()
        if self._affinity is not None:
            try:
                os.sched_setaffinity(0, self._affinity)
            except OSError:
                pass
        self._loop(False)

    def fall_back(self) -> None:
        """The kernel refused a ring's registration (uring.py): it sends requests through
        /dev/fuse again unless the rings were ready already, so /dev/fuse gets its threads (and
        serve()'s thread reads without waiting: whether the kernel went back cannot be told)."""
        self._start_threads()

    def _next_request(self, buf: memoryview, poller: select.poll) -> int:
        """Read one request into ``buf`` (the caller leads). Polls for SPIN_SECONDS first: a thread
        asleep in read(2) takes long to wake on a virtual machine, and the next request of a
        process working through many small operations usually comes within that time
        (benchmarks/HISTORY.md, 481d43a). While the rings carry the requests it waits
        FORGET_BATCH_SECONDS first instead. Sets ``_awaited``: whether no request was queued when
        this one was asked for (its caller waits on each reply: the keep-awake helper's case)."""
        self._awaited = False
        follower = self.follower
        if follower is not None and follower.pinned and follower.local.cpu is not None:  # kept to a caller's CPU
            if follower.following:  # no spin: the caller's next request wakes this thread on its CPU
                follower.wait()
                try:
                    n = os.readv(self.fd, [buf])
                except BaseException:  # EINTR, or the end (StopServing, ENODEV): serve on as SCHED_OTHER
                    follower.woke(0)
                    raise
                follower.woke(buf[4] if n >= IN_HEADER.size else 0)  # the opcode's low byte: all are < 256
                return n
            follower.stop_following()
        if self.uring is not None and self.uring.carry_requests:
            time.sleep(FORGET_BATCH_SECONDS)
        elif self.uring is None and (self.awake is not None or not self._overlapping):
            self._awaited = awaited = not poller.poll(0)
            if awaited and not self._overlapping:
                deadline = time.perf_counter() + SPIN_SECONDS
                while not poller.poll(0) and time.perf_counter() < deadline:
                    pass
        return os.readv(self.fd, [buf])

    def _waits_on_reply(self, req: Request, op: Op, overlapping: bool, poller: select.poll) -> bool | None:
        """For the follower: whether the caller of a request just read waits on its reply (None:
        it has none). Not if it is handed to another thread, nor a small READ or WRITE with
        another request queued behind it: the caller keeps several in flight (fio at a queue
        depth), and both CPUs have work. Other requests are taken as waited on: a FORGET or a
        file's RELEASE (sent in the background) may be queued behind them."""
        if not op.reply:
            return None
        if overlapping:
            return False
        return req.opcode not in (READ, WRITE) or not poller.poll(0)

    def request_buffer(self) -> memoryview:
        """Where one serving thread reads its requests: BUFFER_SIZE writable bytes, reused for
        each request once the previous one is answered. A subclass may place it in memory it
        shares with a helper process, so that request bodies reach the helper uncopied."""
        return memoryview(bytearray(BUFFER_SIZE))

    def handle(self, req: Request, op: Op | None = None) -> bool:
        """Dispatch one request and answer what its handler raised; False ends serving."""
        if op is None:
            op = OPS.get(req.opcode, UNKNOWN_OP)
        try:
            if not self.dispatch(req, op):
                self._running = False
                return False
        except FuseError as e:
            if op.reply:
                self.reply_error(req.unique, e.errno)
        except Exception as e:  # noqa: BLE001 - one bad request must not end the mount
            if op.reply:
                self.on_failure(req, e)
        return True

    def _loop(self, main: bool) -> None:
        buf = self.request_buffer()
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        leading = False
        try:
            while self._running:
                try:
                    if main:
                        self._idle = True
                    try:
                        if not leading:
                            self._leader.acquire()
                            leading = True
                        n = self._next_request(buf, poller)
                    finally:
                        if main:
                            self._idle = False
                except StopServing:
                    break
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if e.errno == errno.ENODEV:  # unmounted
                        self.unmounted = True
                        self._running = False
                        break
                    if e.errno == errno.EBADF and not self._running:  # serve() ended and closed the device
                        break
                    raise
                if n < IN_HEADER.size:  # never from a live /dev/fuse: the other end is gone
                    self._running = False
                    break
                length, opcode, unique, node, uid, gid, pid, extlen, pad = IN_HEADER.unpack_from(buf)
                req = Request(length, opcode, unique, node, uid, gid, pid, extlen, pad, buf[IN_HEADER.size:n])
                op = OPS.get(req.opcode, UNKNOWN_OP)
                overlapping = self.overlaps(req)
                # Not for queued requests, nor large reads and writes: both CPUs have work then;
                # nor for FORGETs and INTERRUPTs: nobody waits on them.
                if self.awake is not None and self._awaited and op.reply and not overlapping:
                    self.awake.note_request()
                follower = self.follower
                if follower is not None and (req.opcode not in (READ, WRITE)
                                             or follower.pinned and follower.local.cpu is not None):
                    follower.got_request(pid, self._waits_on_reply(req, op, overlapping, poller))
                if overlapping:
                    with self._overlapping_lock:
                        self._overlapping += 1
                    self._leader.release()  # an idle thread reads the next request meanwhile
                    leading = False
                try:
                    if not self.handle(req, op):
                        break
                finally:
                    if overlapping:
                        with self._overlapping_lock:
                            self._overlapping -= 1
        finally:
            if leading:
                self._leader.release()  # the next thread finds the device gone (ENODEV) and ends too
