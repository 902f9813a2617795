"""The server thread that keeps to its waiting caller's CPU (encfs.fuseproto.followcaller's
invariants), on the real scheduler: threads and processes pinned with sched_setaffinity, policies
read back with sched_getscheduler, a real mount for the wiring. No timings are asserted beyond a
busy loop holding an idle-priority thread off its CPU."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuse_helpers import Mount

from encfs.fuseproto import followcaller
from encfs.fuseproto.followcaller import (
    CHECK_EVERY,
    LATE_BEFORE_PAUSE,
    SAMPLE_EVERY,
    UNPIN_AFTER,
    CallerFollower,
    _Backoff,
)
from encfs.fuseproto.server import FuseServer
from encfs.fuseproto.threadpolicy import idle_policy_works, may_leave_idle_policy
from encfs.fuseproto.wire import FORGET, LOOKUP, READ, READ_IN, RELEASE, Request

CPUS = sorted(os.sched_getaffinity(0))

pytestmark = [
    pytest.mark.skipif(len(CPUS) < 2, reason="following a caller to its CPU needs two CPUs"),
    pytest.mark.skipif(not (may_leave_idle_policy() and idle_policy_works()),
                       reason="a thread here may not take SCHED_OTHER back from SCHED_IDLE"),
]


def in_thread(work: Callable[[], Any]) -> Any:
    """``work()`` in a thread of its own (pinning and policies stay there); its result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if errors:
        raise errors[0]
    return result[0]


class Caller:
    """A thread that last ran on ``cpu`` and then sleeps: what a process waiting on a reply is."""

    def __init__(self, cpu: int) -> None:
        self._moved = threading.Event()
        self._stop = threading.Event()
        self._cpu = cpu
        self._ready = threading.Event()
        self.tid = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        while not self._stop.is_set():
            os.sched_setaffinity(0, {self._cpu})
            time.sleep(0.001)  # runs there once, then sleeps
            self._ready.set()
            self._moved.wait()
            self._moved.clear()

    def move(self, cpu: int) -> None:
        self._ready.clear()
        self._cpu = cpu
        self._moved.set()
        assert self._ready.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self._moved.set()
        self._thread.join(10)


@pytest.fixture
def caller() -> Iterator[Caller]:
    c = Caller(CPUS[-1])
    yield c
    c.stop()


def policy() -> int:
    return os.sched_getscheduler(0)


def test_a_thread_keeps_to_its_callers_cpu_and_waits_idle_only_there(caller: Caller) -> None:
    follower = CallerFollower(set(CPUS))

    def serve() -> list[object]:
        seen: list[object] = []
        follower.got_request(caller.tid, True)
        seen.append(os.sched_getaffinity(0))
        follower.wait()
        seen.append(policy())
        follower.woke(LOOKUP)
        seen.append(policy())
        follower.before_reply()  # the request was awaited: its reply goes out as SCHED_IDLE
        seen.append(policy())
        follower.woke(RELEASE)  # nobody waits on it: handled after the caller's own work
        seen.append(policy())
        follower.woke(LOOKUP)
        for _ in range(UNPIN_AFTER):
            follower.got_request(caller.tid, False)  # requests queued behind each other
        seen.append(os.sched_getaffinity(0))
        follower.before_reply()
        seen.append(policy())
        return seen

    pinned, waiting, handling, replying, releasing, unpinned, after = in_thread(serve)
    assert pinned == {CPUS[-1]}
    assert (waiting, handling, replying, releasing) == (os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_IDLE, os.SCHED_IDLE)
    assert unpinned == set(CPUS)
    assert after == os.SCHED_OTHER


def test_the_kernels_own_requests_and_other_callers_do_not_move_it(caller: Caller) -> None:
    other = Caller(CPUS[0])
    try:
        follower = CallerFollower(set(CPUS))

        def serve() -> tuple[set[int], set[int]]:
            follower.got_request(caller.tid, True)
            for _ in range(3):  # a kernel worker's SETATTR, a background RELEASE (pid 0), a FORGET
                follower.got_request(other.tid, True)
                follower.got_request(0, True)
                follower.got_request(0, None)
                follower.got_request(caller.tid, True)
            before = os.sched_getaffinity(0)
            for _ in range(CHECK_EVERY * 2):  # the other process takes over once it is the caller
                follower.got_request(other.tid, True)
            return before, os.sched_getaffinity(0)

        assert in_thread(serve) == ({CPUS[-1]}, {CPUS[0]})
    finally:
        other.stop()


def test_a_caller_that_keeps_leaving_the_cpu_pauses_following(caller: Caller) -> None:
    follower = CallerFollower(set(CPUS))

    def serve() -> tuple[bool, set[int], int]:
        follower.got_request(caller.tid, True)
        for cpu in (CPUS[0], CPUS[-1]):  # found elsewhere at two checks in a row
            caller.move(cpu)
            for _ in range(CHECK_EVERY):
                follower.got_request(caller.tid, True)
        return follower.following, os.sched_getaffinity(0), policy()

    assert in_thread(serve) == (False, set(CPUS), os.SCHED_OTHER)


def test_moved_pauses_stay_short_while_they_repeat(caller: Caller) -> None:
    """A cold read keeps moving the caller, and the deletes that follow it move it no more: each
    moved pause lasts 50 ms however many came before, so the deletes are followed at once."""
    follower = CallerFollower(set(CPUS))

    def serve() -> list[float]:
        lengths = []
        for _ in range(5):
            follower.got_request(caller.tid, True)
            for cpu in (CPUS[0], CPUS[-1]):
                caller.move(cpu)
                for _ in range(CHECK_EVERY):
                    follower.got_request(caller.tid, True)
            lengths.append(follower._paused_until - time.monotonic())
            while not follower.following:
                time.sleep(0.005)
        follower.stop_following()
        return lengths

    lengths = in_thread(serve)
    assert all(0 < length <= 0.05 for length in lengths), lengths


def test_a_busy_task_on_the_callers_cpu_pauses_following(caller: Caller) -> None:
    """At idle priority behind a busy loop a request waits about 2 ms here: after
    LATE_BEFORE_PAUSE late samples in a row (one every SAMPLE_EVERY requests) the threads stop
    following (unpinned, SCHED_OTHER)."""
    follower = CallerFollower(set(CPUS))
    r, w = os.pipe()
    hog = subprocess.Popen(["taskset", "-c", str(CPUS[-1]), sys.executable, "-c", "while True: pass"])
    try:
        def serve() -> tuple[int, bool, set[int], int]:
            follower.got_request(caller.tid, True)
            rounds = 0
            while follower.following and rounds < 30 * SAMPLE_EVERY:
                rounds += 1
                follower.wait()
                os.read(r, 1)  # woken by the test's thread: as SCHED_IDLE, behind the busy loop
                follower.woke(LOOKUP)
                follower.got_request(caller.tid, True)
            return rounds, follower.following, os.sched_getaffinity(0), policy()

        done = threading.Event()

        def requests() -> None:
            while not done.wait(0.01):
                os.write(w, b"x")

        sender = threading.Thread(target=requests, daemon=True)
        sender.start()
        try:
            rounds, following, cpus, pol = in_thread(serve)
        finally:
            done.set()
            sender.join(10)
    finally:
        hog.kill()
        hog.wait()
        os.close(r)
        os.close(w)
    assert not following, f"still following after {rounds} requests behind a busy loop"
    assert rounds >= LATE_BEFORE_PAUSE * SAMPLE_EVERY
    assert (cpus, pol) == (set(CPUS), os.SCHED_OTHER)


def test_run_delays_are_read_once_every_few_awaited_requests(caller: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two schedstat reads take 2 us, and a create has four awaited requests: they are sampled."""
    reads: list[int] = []
    real = followcaller._schedstat

    def counted(fd: int) -> tuple[int, int]:
        reads.append(fd)
        return real(fd)

    monkeypatch.setattr(followcaller, "_schedstat", counted)
    follower = CallerFollower(set(CPUS))

    def serve() -> int:
        follower.got_request(caller.tid, True)  # starts following: reads both once
        reads.clear()
        for _ in range(SAMPLE_EVERY * 5):
            follower.got_request(caller.tid, True)
        follower.stop_following()
        return len(reads)

    assert in_thread(serve) == 2 * 5


def test_pauses_double_while_they_follow_each_other() -> None:
    b = _Backoff(0.05, 0.2)
    assert b.pause(10.0) == pytest.approx(10.05)
    assert b.pause(10.06) == pytest.approx(10.16)
    assert b.pause(10.17) == pytest.approx(10.37)
    assert b.pause(10.38) == pytest.approx(10.58)  # at the cap
    assert b.pause(20.0) == pytest.approx(20.05)  # long after the last: from the start again


def test_only_a_lone_request_counts_as_waited_on() -> None:
    """A small READ or WRITE with another request queued behind it is not (fio at a queue depth);
    other requests are, whatever is queued (FORGETs and background RELEASEs often are)."""
    r, w = os.pipe()
    try:
        server = FuseServer(w)
        poller = select.poll()
        poller.register(r, select.POLLIN)

        def request(opcode: int, body: bytes = b"") -> Request:
            return Request(40 + len(body), opcode, 2, 1, 0, 0, os.getpid(), 0, 0, memoryview(body))

        read = request(READ, READ_IN.pack(1, 0, 4096, 0) + bytes(16))
        from encfs.fuseproto.wire import OPS
        assert server._waits_on_reply(read, OPS[READ], False, poller) is True
        assert server._waits_on_reply(read, OPS[READ], True, poller) is False  # handed to another thread
        os.write(w, b"queued")
        assert server._waits_on_reply(read, OPS[READ], False, poller) is False
        assert server._waits_on_reply(request(LOOKUP, b"a\0"), OPS[LOOKUP], False, poller) is True
        assert server._waits_on_reply(request(FORGET, bytes(8)), OPS[FORGET], False, poller) is None
    finally:
        os.close(r)
        os.close(w)


def _threads_cpus(pid: int) -> list[set[int]]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.append(os.sched_getaffinity(int(task.name)))
        except OSError:  # ended meanwhile
            pass
    return found


def test_a_mount_answers_a_waiting_caller_on_its_cpu(fs: tuple[Path, Path], fs_home: Path) -> None:
    """The wiring: a process pinned to one CPU looking up names one after another has a daemon
    thread kept to that CPU while it runs, and none once the mount is used by nobody waiting."""
    cipher, plain = fs
    cpu = CPUS[-1]
    script = ("import os, sys\n"
              f"os.sched_setaffinity(0, {{{cpu}}})\n"
              "for i in range(300):\n"
              f"    os.path.exists({str(plain)!r} + '/absent%d' % i)\n"
              "print('done', flush=True)\n"
              "sys.stdin.read()\n")
    with Mount(cipher, plain, fs_home) as m:
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "done\n"
            assert {cpu} in _threads_cpus(m.pid), _threads_cpus(m.pid)
        finally:
            child.communicate("", timeout=30)
