"""A helper process that keeps another CPU busy, at the lowest priority, while FUSE requests
flow, so that the kernel wakes each caller on the CPU that answered it
(``encfs mount --keep-cpu-awake``).

Why: the scheduler wakes a task on an idle CPU when there is one (select_idle_sibling). On a
virtual machine without guest halt polling, waking an idle vCPU takes an IPI and a VM exit,
about 20 us here, and a small request pays it twice: the caller sleeps on one CPU while the
daemon answers on the other. A CPU running a nice-19 task is not idle, so the caller is queued
on the answering CPU instead and runs as soon as the daemon waits for the next request
(docs/dev/fuse-python.md, "Keeping a CPU awake"). Go's runtime gets the same from its spinning
threads, which is where gocryptfs's local wake-ups come from. It helps on two CPUs; with more,
the other idle CPUs still draw the wake-ups.

Invariants:
- The helper is this file run as a script by ``python -I``: no environment, no user site, no
  encfs import; it holds no key material and is given none, only a shared page (a memfd: one
  request counter and an asleep flag), an eventfd, the read end of a pipe and a pipe to say it
  is ready.
- It runs in a session of its own (a terminal's ^C is for the daemon), with its output to
  /dev/null, and sets nice 19 before it says it is ready; ``start`` returns only then.
- It spins only while the counter moved within SPIN_WINDOW_SECONDS, calling sched_yield(2) at
  every turn (a woken task on its CPU runs at once); then it sets the asleep flag, looks at the
  counter once more, and blocks on the eventfd, which ``note_request`` writes when it finds the
  flag set. The two may miss each other once (neither store is ordered before the other's load):
  the helper then sleeps through one request until the next finds the flag. No timer wakes it.
- It ends, at once, when the pipe's write end closes: ``stop()``, or the daemon's death by any
  signal. A fork of the daemon that does not exec would hold the write end too (O_CLOEXEC covers
  exec only): the daemon makes none.
- ``stop()`` leaves the page and the eventfd open, so that a server thread still noting a request
  meanwhile touches nothing freed; ``close()`` releases them where no thread can (tests), else
  the process's exit does.
- ``note_request`` costs one store to the page while the helper is awake, and one write(2)
  after it fell asleep.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time

log = logging.getLogger("encfs.fuse")

SPIN_WINDOW_SECONDS = 1e-3  # how long the helper spins after the last request it saw
PAGE_SIZE = 4096
COUNTER = struct.Struct("<Q")  # at offset 0, written by the daemon
ASLEEP = 8  # one byte, written by the helper: 1 while it waits on the eventfd
_COUNTER_MASK = (1 << 64) - 1
START_SECONDS = 30.0  # how long start() waits for the helper to say it is ready (a loaded machine)
STOP_SECONDS = 2.0  # how long stop() waits for the helper before SIGKILL


class KeepAwake:
    """The daemon's side: starts the helper and tells it of each request."""

    def __init__(self, page: mmap.mmap, wake_fd: int, pipe_fd: int, process: subprocess.Popen[bytes]) -> None:
        self._page = page
        self._wake_fd = wake_fd
        self._pipe_fd = pipe_fd  # closing it ends the helper
        self._count = 0
        self.process = process

    @classmethod
    def start(cls, window: float = SPIN_WINDOW_SECONDS) -> KeepAwake:
        """Start the helper and wait until it is ready; OSError if it cannot be started."""
        with contextlib.ExitStack() as undo:
            memfd = os.memfd_create("encfs-keep-awake", os.MFD_CLOEXEC)
            undo.callback(os.close, memfd)
            wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
            undo.callback(os.close, wake_fd)
            pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
            undo.callback(os.close, pipe_r)
            undo.callback(os.close, pipe_w)
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            undo.callback(os.close, ready_r)
            undo.callback(os.close, ready_w)
            os.ftruncate(memfd, PAGE_SIZE)
            page = mmap.mmap(memfd, PAGE_SIZE)
            undo.callback(page.close)
            process = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(memfd), str(wake_fd), str(pipe_r),
                 str(ready_w), repr(window)],
                pass_fds=(memfd, wake_fd, pipe_r, ready_w), env={}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            undo.callback(_end, process)
            os.close(ready_w)
            undo.pop_all()  # from here on only what is not kept is closed
        os.close(memfd)
        os.close(pipe_r)
        try:
            poller = select.poll()
            poller.register(ready_r, select.POLLIN)
            said = os.read(ready_r, 1) if poller.poll(START_SECONDS * 1000) else b""
        finally:
            os.close(ready_r)
        helper = cls(page, wake_fd, pipe_w, process)
        if said != b"1":
            helper.stop()
            helper.close()
            raise OSError(errno.ECHILD, "the helper process ended, or was not ready in time")
        return helper

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def asleep(self) -> bool:
        """Whether the helper waits on its eventfd (False: it spins, or is about to)."""
        return bool(self._page[ASLEEP])

    def note_request(self) -> None:
        """A request came: the helper spins, or is woken to."""
        self._count = (self._count + 1) & _COUNTER_MASK
        COUNTER.pack_into(self._page, 0, self._count)
        if self._page[ASLEEP]:
            os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        """End the helper and wait for it (SIGKILL after STOP_SECONDS); a helper that had ended
        on its own with an error is logged."""
        if self._pipe_fd < 0:
            return
        early = self.process.poll()
        os.close(self._pipe_fd)
        self._pipe_fd = -1
        _end(self.process)
        if early:
            log.warning("--keep-cpu-awake: its helper process had ended (exit status %d)", early)

    def close(self) -> None:
        """Release the page and the eventfd, once nothing can call note_request any more."""
        self.stop()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
            self._page.close()


def _end(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _spin(page: mmap.mmap, wake_fd: int, pipe_fd: int, window_ns: int) -> None:
    """The helper's loop (see the invariants); returns when the pipe closes."""
    unpack, now, yield_cpu = COUNTER.unpack_from, time.monotonic_ns, os.sched_yield
    waiter = select.poll()
    waiter.register(wake_fd, select.POLLIN)
    waiter.register(pipe_fd, select.POLLIN)
    last = unpack(page)[0]
    deadline = now() + window_ns
    while True:
        yield_cpu()
        count = unpack(page)[0]
        if count != last:
            last, deadline = count, now() + window_ns
            continue
        if now() < deadline:
            continue
        page[ASLEEP] = 1
        if unpack(page)[0] != last:
            page[ASLEEP] = 0
            continue
        ready = waiter.poll()
        if any(fd == pipe_fd for fd, _ in ready):
            return
        os.eventfd_read(wake_fd)
        page[ASLEEP] = 0
        last, deadline = unpack(page)[0], now() + window_ns


def _main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memfd, wake_fd, pipe_fd, ready_fd = (int(a) for a in argv[:4])
    window_ns = int(float(argv[4]) * 1e9)
    page = mmap.mmap(memfd, PAGE_SIZE)
    os.close(memfd)
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    _spin(page, wake_fd, pipe_fd, window_ns)


if __name__ == "__main__":
    _main(sys.argv[1:])
    os._exit(0)  # at once: an interpreter's shutdown at nice 19 on a busy machine can take seconds
