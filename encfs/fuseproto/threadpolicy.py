"""How the FUSE server's threads are scheduled and which of them take signals.

Invariants:
- Only the main thread takes SIGTERM, SIGINT and SIGHUP: every other server thread blocks them
  (``leave_signals_to_the_main_thread``), since Python runs handlers in the main thread only.
  Only threads the server starts call it, first thing (a caller's mask is not the server's to
  change), and they start no processes: a child would inherit the blocked signals.
- A thread takes SCHED_IDLE only where it may take SCHED_OTHER back (``may_leave_idle_policy``
  and ``idle_policy_works``, sched(7)); FUSE over io_uring (uring.py) and the filesystem server's
  caller follower (followcaller.py) use it, through ``take_idle_policy`` and
  ``take_normal_policy``. The switch to SCHED_IDLE lets go of the GIL (ctypes): a thread
  preempted in it by a normal task of its CPU holds up no other thread of the daemon.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading

_CAP_SYS_NICE = 23
_PRIORITY = os.sched_param(0)  # the only one SCHED_IDLE and SCHED_OTHER take
_ZERO = ctypes.c_int(0)  # the same, as sched_setscheduler(2) takes it
_setscheduler = ctypes.CDLL(None, use_errno=True).sched_setscheduler
_setscheduler.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_setscheduler.restype = ctypes.c_int


def leave_signals_to_the_main_thread() -> None:
    """Block the stop signals in this thread: the kernel may hand a process-directed signal to
    any thread that does not block it, and Python runs its handler only in the main thread,
    which would then stay asleep in read(2) on /dev/fuse instead of being interrupted."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def may_leave_idle_policy() -> bool:
    """Whether a thread of this process may go back from SCHED_IDLE to SCHED_OTHER
    (CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0): sched(7). In a user namespace the
    capability may not count; the queue's thread tries the switch once before serving."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_NICE & 1:
                    return True
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def take_idle_policy() -> bool:
    """SCHED_IDLE for the calling thread, the GIL let go during the call; False if refused."""
    return bool(_setscheduler(0, os.SCHED_IDLE, ctypes.byref(_ZERO)) == 0)


def take_normal_policy() -> None:
    """SCHED_OTHER again for the calling thread (OSError where it may not: may_leave_idle_policy)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, _PRIORITY)


def idle_policy_works() -> bool:
    """Whether a thread can switch to SCHED_IDLE and back, tried in a thread of its own (one that
    could not leave SCHED_IDLE just ends)."""
    works: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            works.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, name="fuse-uring-probe")
    t.start()
    t.join()
    return bool(works)
