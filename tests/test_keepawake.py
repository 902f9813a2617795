"""The keep-awake helper (encfs/fuseproto/keepawake.py): its process, its two states and its
end, without a mount; then a real mount with `encfs mount --keep-cpu-awake`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fuse_helpers import Mount
from procs import children, proc_state, running, voluntary_switches

from encfs.fuseproto.keepawake import KeepAwake


def _until(condition: Callable[[], object], timeout: float = 30, step: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        if step is not None:
            step()
        time.sleep(0.0002 if step is not None else 0.01)


@pytest.fixture
def helper() -> Iterator[KeepAwake]:
    h = KeepAwake.start()
    try:
        yield h
    finally:
        h.close()


def _blocked(pid: int) -> bool:
    """Asleep in poll(2), its voluntary switch counted: the same count over 50 ms."""
    before = voluntary_switches(pid)
    time.sleep(0.05)
    return proc_state(pid) == "S" and voluntary_switches(pid) == before


def test_the_helper_runs_isolated_at_the_lowest_priority(helper: KeepAwake) -> None:
    pid = helper.pid
    _until(lambda: os.getpriority(os.PRIO_PROCESS, pid) == 19)
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert os.getsid(pid) == pid  # a terminal's ^C goes to the daemon, not to it
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"-I"
    # stdin, stdout, stderr (/dev/null), the eventfd, the pipe and the page's memfd (mmap's own dup),
    # once it closed the pipe it said it was ready on

    def fds() -> list[str]:
        # while it starts it opens and closes files (its modules): one listed may be gone by readlink
        names = []
        for n in os.listdir(f"/proc/{pid}/fd"):
            try:
                names.append(os.readlink(f"/proc/{pid}/fd/{n}"))
            except FileNotFoundError:
                names.append("closed meanwhile")
        return sorted(names)

    _until(lambda: sum(f.startswith("pipe:") for f in fds()) == 1 and "closed meanwhile" not in fds())
    pipes = [f for f in fds() if f.startswith("pipe:")]
    assert fds() == sorted(["/dev/null"] * 3 + ["anon_inode:[eventfd]", "/memfd:encfs-keep-awake (deleted)", *pipes])


def test_it_sleeps_without_requests_and_wakes_for_them(helper: KeepAwake) -> None:
    pid = helper.pid
    _until(lambda: helper.asleep and _blocked(pid))
    switches = voluntary_switches(pid)
    time.sleep(1.0)
    assert helper.asleep and voluntary_switches(pid) == switches, "woken with no request"
    _until(lambda: not helper.asleep, step=helper.note_request)
    # the requests stopped: asleep again after SPIN_WINDOW_SECONDS, having slept once more
    _until(lambda: helper.asleep and _blocked(pid))
    assert voluntary_switches(pid) > switches


def test_a_helper_that_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(OSError, match="ended, or was not ready"):
        KeepAwake.start()


def test_stop_ends_it(helper: KeepAwake) -> None:
    helper.stop()
    assert helper.process.returncode == 0


def test_it_ends_when_the_daemon_is_killed() -> None:
    script = ("import time\nfrom encfs.fuseproto.keepawake import KeepAwake\n"
              "print(KeepAwake.start().pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert running(pid)
        parent.kill()
        parent.wait(timeout=30)
        _until(lambda: not running(pid))  # ended (a zombie, where nothing reaps orphans)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        if pid is not None and running(pid):
            os.kill(pid, signal.SIGKILL)


# -- a real mount ------------------------------------------------------------------------------

def _helpers_of(pid: int) -> list[int]:
    found = []
    for c in children(pid):
        try:
            if b"keepawake.py" in Path(f"/proc/{c}/cmdline").read_bytes():
                found.append(c)
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.parametrize("spelling", [["--keep-cpu-awake"], ["-o", "keep_cpu_awake"]])
def test_a_mount_runs_the_helper_while_it_serves(fs: tuple[Path, Path], fs_home: Path, spelling: list[str]) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home, *spelling) as m:
        helpers = _helpers_of(m.pid)  # started before the mount
        assert len(helpers) == 1, helpers
        helper = helpers[0]
        _until(lambda: _blocked(helper))  # asleep: the mount's own requests are over
        before = voluntary_switches(helper)
        data = os.urandom(100_000)
        for i in range(50):
            (plain / f"f{i}").write_bytes(data)
        assert all((plain / f"f{i}").read_bytes() == data for i in range(50))
        _until(lambda: voluntary_switches(helper) > before)  # woken by the requests, then asleep again
        subprocess.run(["fusermount3", "-u", str(plain)], check=True)
        assert m.proc.wait(timeout=30) == 0
        assert not running(helper)


def test_keep_cpu_awake_with_the_pyfuse3_server_is_refused(fs: tuple[Path, Path], fs_home: Path) -> None:
    """In one line, whether asked by the flag or as fstab spells it (-o keep_cpu_awake)."""
    from conftest import run_encfs

    cipher, plain = fs
    for args in (["--keep-cpu-awake", "--server", "pyfuse3"], ["-o", "keep_cpu_awake,server=pyfuse3"]):
        proc = run_encfs("mount", str(cipher), str(plain), *args, "--fake", home=fs_home)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and err.strip().count("\n") == 0, err
        assert "--keep-cpu-awake needs the encfs server" in err, err
    accepted = run_encfs("mount", str(cipher), str(plain), "-o", "keep_cpu_awake", "--fake", home=fs_home)
    assert accepted.returncode == 0, accepted.stderr
    # --sloppy (mount -s) drops what neither encfs nor FUSE knows: encfs's own flags are kept
    sloppy = run_encfs("mount", str(cipher), str(plain), "--sloppy", "-o", "keep_cpu_awake,server=pyfuse3", "--fake",
                       home=fs_home)
    assert sloppy.returncode != 0 and b"--keep-cpu-awake needs the encfs server" in sloppy.stderr, sloppy.stderr
