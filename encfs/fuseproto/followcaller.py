"""Answering a waiting caller on the CPU it sleeps on (the filesystem's /dev/fuse server).

A process that waits on each reply (stat, open, create, one file after another) sleeps on one CPU
while the server answers on another, and the reply then wakes it with an interrupt between CPUs:
on a virtual machine whose idle vCPUs halt, 15-25 us per request, more than the daemon's own work
on a cached LOOKUP (docs/dev/fuse-python.md, "Which CPU the waiting process wakes on"). The
scheduler wakes a task on an idle CPU when there is one (select_idle_sibling), and a CPU that runs
only SCHED_IDLE tasks counts as idle. So a serving thread that reads a request its caller waits
on keeps to the CPU that caller last ran on, and waits for the next request, and writes its
reply, as SCHED_IDLE: the reply then wakes the caller on this CPU, which preempts the thread at
once, sends its next request and sleeps, and the thread goes on and finds it without sleeping.
That is the pattern gocryptfs's Go runtime falls into, without a CPU kept busy
(``--keep-cpu-awake``, keepawake.py) and without io_uring's queue per CPU (uring.py, which does
the same per queue).

Invariants:
- Used only where a thread may take SCHED_OTHER back from SCHED_IDLE (threadpolicy.py), and
  never with io_uring or the keep-awake helper; only by the filesystem's server (a volume's
  requests come from the loop device's kernel workers).
- A thread is SCHED_IDLE only while pinned to a caller's CPU, and then only to wait for the
  device (``wait``), to write the reply to an awaited request (``before_reply``) and to handle a
  request nobody waits on (a file's RELEASE, FORGET); it takes SCHED_OTHER again as soon as
  read(2) returns anything else (``woke``), and whenever it is unpinned. The switches are
  threadpolicy.py's (the one to SCHED_IDLE lets go of the GIL).
- A thread is pinned only by requests its caller waits on (the server's ``_waits_on_reply``): to
  the CPU that caller (the request's pid, a thread id) last ran on, read from /proc/PID/stat at
  its first such request and every CHECK_EVERY after. Another thread id takes over after
  SWITCH_AFTER of its own; pid 0 (the kernel's own requests) changes nothing. UNPIN_AFTER
  requests in a row with others queued behind them unpin the thread, and an unpinned thread does
  nothing here for READ and WRITE; while no thread is pinned (``pinned``) the server reads no
  thread-local state at all: at a queue depth (fio) both CPUs have work, and every microsecond
  per request there costs more than its share (docs/dev/fuse-python.md).
- Following stops in every thread for a pause (``_pause``): when a thread waited for another
  task of its CPU beyond what the caller ran, LATE_BEFORE_PAUSE samples in a row (one every
  SAMPLE_EVERY awaited requests: /proc/thread-self/schedstat against the caller's
  /proc/PID/schedstat; about 2 ms per request behind a busy loop here, against 0.06), for
  STARVED_PAUSE; and when two CPU checks in a row
  find that the caller left the thread's CPU (the backing disk's kernel workers run there as the
  reply wakes it, on cold reads), for MOVED_PAUSE. A starved pause doubles while pauses follow
  each other; a moved one does not (50 ms each).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from encfs.fuseproto.threadpolicy import take_idle_policy, take_normal_policy
from encfs.fuseproto.wire import BATCH_FORGET, FORGET, INTERRUPT, RELEASE

log = logging.getLogger("encfs.fuse")

CHECK_EVERY = 8
UNPIN_AFTER = 8
SWITCH_AFTER = 4
MOVES_BEFORE_PAUSE = 2
NOBODY_WAITS = frozenset({RELEASE, FORGET, BATCH_FORGET, INTERRUPT})
STARVED_NS = 1_000_000  # per awaited request, on average over a sample
LATE_BEFORE_PAUSE = 3  # a busy loop makes every sample late; the disk's kernel workers some
# The run delays are sampled every SAMPLE_EVERY awaited requests: their two schedstat reads take
# 2 us, and a create has four awaited requests; behind a busy loop a sample spans about 8 ms.
SAMPLE_EVERY = 4
# Pauses (first, longest) in seconds. Another task of the caller's CPU kept a thread waiting: it
# may stay there long (a build). The caller kept leaving the CPU: the backing disk's kernel workers
# ran there as the reply woke it (cold reads); following is tried again soon, and never later than
# 50 ms: a phase without disk reads (the deletes after a cold read) is followed almost at once.
STARVED_PAUSE = (1.0, 64.0)
MOVED_PAUSE = (0.05, 0.05)


class _Backoff:
    """A pause that doubles from ``first`` to ``cap`` seconds while pauses follow each other
    closely (the next within ``cap`` of the last one's end), and starts over otherwise."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self._next = first
        self._ends = 0.0

    def pause(self, now: float) -> float:
        """The monotonic time the pause starting ``now`` ends."""
        if now - self._ends > self.cap:
            self._next = self.first
        self._ends = now + self._next
        self._next = min(self._next * 2, self.cap)
        return self._ends


class _Thread(threading.local):
    """One serving thread's state."""

    def __init__(self) -> None:
        self.idle = False  # SCHED_IDLE now
        self.reply_idle = False  # the request being answered was awaited: reply as SCHED_IDLE
        self.cpu: int | None = None  # pinned to it
        self.caller = 0  # the thread id it follows
        self.since_check = 0  # awaited requests since its CPU was read
        self.busy = 0  # requests in a row that found another queued behind them
        self.moved = 0  # CPU checks in a row that found the caller elsewhere
        self.late = 0  # samples in a row that waited for another task
        self.unsampled = 0  # awaited requests since the run delays were read
        self.other = 0  # a thread id other than the caller's, seen last
        self.others = 0  # its awaited requests since it was seen first
        self.stat_fd: int | None = None  # /proc/CALLER/stat
        self.sched_fd: int | None = None  # /proc/CALLER/schedstat
        self.own_fd: int | None = None  # /proc/thread-self/schedstat
        self.waited = 0  # this thread's run delay at the last awaited request (ns)
        self.ran = 0  # the caller's run time then (ns)


def _schedstat(fd: int) -> tuple[int, int]:
    """(time run, time waited to run) in ns, from a schedstat file."""
    fields = os.pread(fd, 128, 0).split()
    return int(fields[0]), int(fields[1])


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class CallerFollower:
    """What the server's threads do around reading a request and writing its reply."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus  # serve()'s CPUs: an unpinned thread's
        self.local = _Thread()  # each serving thread's state (the server reads its flags inline)
        # How many threads are pinned: while none is, the server reads nothing per request here
        # (a thread-local attribute costs fio at a queue depth more than its share).
        self.pinned = 0
        self._lock = threading.Lock()
        self._paused_until = 0.0  # monotonic: no thread follows before then
        self._starved_pauses = _Backoff(*STARVED_PAUSE)
        self._moved_pauses = _Backoff(*MOVED_PAUSE)

    @property
    def following(self) -> bool:
        """False during a back-off: the server waits as it does without a follower."""
        return time.monotonic() >= self._paused_until

    def wait(self) -> None:
        """Before reading the device, pinned to a caller's CPU: wait as SCHED_IDLE."""
        t = self.local
        if not t.idle:
            self._idle(t)

    def woke(self, opcode: int) -> None:
        """Right after read(2) returned a request: SCHED_OTHER again, but for one nobody waits on
        (RELEASE of a file is sent in the background; FORGET has no reply): that one is handled
        while its caller goes on, and as SCHED_IDLE the caller goes first instead of sharing its
        CPU with it."""
        t = self.local
        if t.idle and opcode not in NOBODY_WAITS:
            self._normal(t)

    def got_request(self, pid: int, awaited: bool | None) -> None:
        """The request read is ``pid``'s: follow its caller if it was ``awaited`` (and gets a
        reply), unpin if not; None (a request without a reply: FORGET) changes neither."""
        t = self.local
        t.reply_idle = bool(awaited)
        if awaited is None or not pid:  # pid 0: sent by the kernel itself (a RELEASE in the background)
            return
        if not self.following:
            t.reply_idle = False
            return
        if not awaited:
            t.busy += 1
            if t.busy >= UNPIN_AFTER:
                self._unpin(t)
            return
        t.busy = 0
        if pid != t.caller:
            # Another process's request between two of the caller's (a kernel worker's, say) does
            # not make the thread follow it.
            t.others = t.others + 1 if pid == t.other else 1
            t.other = pid
            if t.others < SWITCH_AFTER and t.caller:
                return
            self._follow(t, pid)
        else:
            t.unsampled += 1
            if t.unsampled >= SAMPLE_EVERY:
                t.unsampled = 0
                if self._starved(t):
                    return
        t.since_check += 1
        if t.since_check >= CHECK_EVERY or t.cpu is None:
            self._pin(t)

    def before_reply(self) -> None:
        """Just before the reply's writev: SCHED_IDLE if the request was awaited."""
        t = self.local
        if t.reply_idle:
            t.reply_idle = False
            if not t.idle and t.cpu is not None:
                self._idle(t)

    def stop_following(self) -> None:
        """This thread serves as without a follower (a back-off): SCHED_OTHER, unpinned."""
        t = self.local
        t.reply_idle = False
        self._unpin(t)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _idle(t: _Thread) -> None:
        t.idle = take_idle_policy()

    @staticmethod
    def _normal(t: _Thread) -> None:
        take_normal_policy()
        t.idle = False

    def _follow(self, t: _Thread, pid: int) -> None:
        """Start following ``pid``: its CPU is read at once."""
        _close(t.stat_fd)
        _close(t.sched_fd)
        t.stat_fd = t.sched_fd = None
        t.caller, t.since_check, t.others, t.unsampled, t.late = pid, CHECK_EVERY, 0, 0, 0
        try:
            t.stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            t.sched_fd = os.open(f"/proc/{pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            if t.own_fd is None:
                t.own_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            t.ran = _schedstat(t.sched_fd)[0]
            t.waited = _schedstat(t.own_fd)[1]
        except (OSError, ValueError, IndexError):  # gone already, or another pid namespace's
            t.caller = 0
            self._unpin(t)

    def _starved(self, t: _Thread) -> bool:
        """Whether another task held this thread off its CPU since the caller's last request (then
        every thread stops following for a while)."""
        if t.sched_fd is None or t.own_fd is None:
            return False
        try:
            ran = _schedstat(t.sched_fd)[0]
            waited = _schedstat(t.own_fd)[1]
        except (OSError, ValueError, IndexError):  # the caller is gone
            t.caller = 0
            return False
        late = (waited - t.waited) - (ran - t.ran) > STARVED_NS * SAMPLE_EVERY
        t.ran, t.waited = ran, waited
        t.late = t.late + 1 if late else 0
        starved = t.late >= LATE_BEFORE_PAUSE
        if starved:
            t.late = 0
            self._pause(self._starved_pauses, "another task shares the caller's CPU")
        return starved

    def _pause(self, backoff: _Backoff, why: str) -> None:
        """Stop following callers, in every thread, for ``backoff``'s next pause."""
        with self._lock:
            now = time.monotonic()
            if now >= self._paused_until:
                self._paused_until = backoff.pause(now)
                log.debug("FUSE server: %s: not following callers for %.2f s", why, self._paused_until - now)
        self.stop_following()

    def _pin(self, t: _Thread) -> None:
        t.since_check = 0
        if t.stat_fd is None:
            return
        try:
            data = os.pread(t.stat_fd, 1024, 0)
            cpu = int(data[data.rindex(b")") + 2:].split()[36])  # field 39, after "pid (comm) "
        except (OSError, ValueError, IndexError):
            t.caller = 0
            self._unpin(t)
            return
        if cpu != t.cpu and t.cpu is not None:
            # The caller left the CPU this thread keeps to (a kernel worker of the backing store's
            # I/O ran there as the reply woke it, say): twice in a row, and following does not hold.
            t.moved += 1
            if t.moved >= MOVES_BEFORE_PAUSE:
                t.moved = 0
                self._pause(self._moved_pauses, "the caller does not stay on the answering CPU")
                return
        else:
            t.moved = 0
        if cpu != t.cpu and cpu in self.cpus:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError:
                self._unpin(t)
                return
            if t.cpu is None:
                with self._lock:
                    self.pinned += 1
            t.cpu = cpu

    def _unpin(self, t: _Thread) -> None:
        """Off the caller's CPU, and so SCHED_OTHER: an unpinned thread never waits as SCHED_IDLE."""
        if t.idle:
            self._normal(t)
        if t.cpu is not None:
            t.cpu = None
            with self._lock:
                self.pinned -= 1
            try:
                os.sched_setaffinity(0, self.cpus)
            except OSError:
                pass
