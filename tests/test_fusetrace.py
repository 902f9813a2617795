"""benchmarks/fusetrace.py: the join of the kernel's FUSE request events with the caller's
wake-ups (kernel-free, on a trace in tracefs's text format), and one real trace of a mount."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchscripts import load_script


def _tool() -> ModuleType:
    return load_script("fusetrace")


# Lines as tracefs prints them (kernel 6.18), connection 46 the mount's, 47 another one's.
TRACE = """\
# tracer: nop
         python3-100     [001] ...1.    10.000000: fuse_request_send: connection 46 req 2 opcode 1 (FUSE_LOOKUP) len 50 
          python-7       [000] .....    10.000040: fuse_request_end: connection 46 req 2 len 144 error 0
          <idle>-0       [001] dNh2.    10.000060: sched_wakeup: comm=python3 pid=100 prio=120 target_cpu=001
          <idle>-0       [001] d..2.    10.000062: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python3 next_pid=100 next_prio=120
         python3-100     [001] ...1.    10.000080: fuse_request_send: connection 46 req 4 opcode 10 (FUSE_UNLINK) len 47 
              cp-200     [000] ...1.    10.000090: fuse_request_send: connection 47 req 4 opcode 16 (FUSE_WRITE) len 4176 
          python-7       [000] .....    10.000200: fuse_request_end: connection 46 req 4 len 16 error 0
          <idle>-0       [000] dNh2.    10.000210: sched_wakeup: comm=python3 pid=100 prio=120 target_cpu=000
          <idle>-0       [000] d..2.    10.000212: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python3 next_pid=100 next_prio=120
         python3-100     [000] ...1.    10.000250: fuse_request_send: connection 46 req 6 opcode 4 (FUSE_SETATTR) len 128 
          python-7       [000] .....    10.000270: fuse_request_end: connection 46 req 6 len 16 error -2
"""


def test_parse_joins_each_request_with_its_end_and_its_callers_wakeup() -> None:
    tool = _tool()
    summary: dict[str, Any] = tool.summarise(tool.parse(TRACE.splitlines(), 46))
    ops = summary["opcodes"]
    assert list(ops) == ["LOOKUP", "UNLINK", "SETATTR"]  # connection 47's WRITE is not this mount's
    assert ops["LOOKUP"]["send_to_end_us"]["mean"] == pytest.approx(40)
    assert ops["UNLINK"]["send_to_end_us"]["mean"] == pytest.approx(120)
    assert (ops["SETATTR"]["count"], ops["SETATTR"]["errors"]) == (1, 1)
    caller = summary["caller"]
    assert (caller["pid"], caller["requests"]) == (100, 3)
    gaps = caller["end_to_next_send_us"]  # 40 us (LOOKUP's end -> UNLINK), 50 (UNLINK's -> SETATTR)
    assert (gaps["n"], gaps["mean"]) == (2, pytest.approx(45))
    assert caller["end_to_wakeup_us"]["mean"] == pytest.approx(15)  # 20 and 10
    assert caller["woken_on_daemon_cpu"] == pytest.approx(0.5)  # the second woke on CPU 0, as it ended


# A RELEASE the caller does not wait for: it sends its next request before the RELEASE ends; and
# the record-tgid column, "(  100)", which some tracefs settings add.
BACKGROUND = """\
         python3-100     (    100) [001] ...1.    20.000000: fuse_request_send: connection 46 req 8 opcode 18 (FUSE_RELEASE) len 64 \n\
         python3-100     (    100) [001] ...1.    20.000010: fuse_request_send: connection 46 req 10 opcode 3 (FUSE_GETATTR) len 56 \n\
          python-7       (      7) [000] .....    20.000030: fuse_request_end: connection 46 req 10 len 120 error 0\n\
          python-7       (      7) [000] .....    20.000040: fuse_request_end: connection 46 req 8 len 16 error 0\n\
          <idle>-0       (-------) [001] dNh2.    20.000050: sched_wakeup: comm=python3 pid=100 prio=120 target_cpu=001\n\
          <idle>-0       (-------) [001] d..2.    20.000052: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python3 next_pid=100 next_prio=120\n\
         python3-100     (    100) [001] ...1.    20.000060: fuse_request_send: connection 46 req 12 opcode 1 (FUSE_LOOKUP) len 50 \n\
"""


def test_a_request_the_caller_does_not_wait_for_is_not_its_wait() -> None:
    tool = _tool()
    trace = tool.parse(BACKGROUND.splitlines(), 46)
    release, getattr_, _lookup = trace.requests
    assert (release.opcode, release.end, release.woken) == ("RELEASE", pytest.approx(20_000_040), None)
    assert getattr_.woken == pytest.approx(20_000_050)  # the wake-up is GETATTR's
    gaps = tool.summarise(trace)["caller"]["end_to_next_send_us"]
    assert (gaps["n"], gaps["mean"]) == (1, pytest.approx(30))  # GETATTR's end -> LOOKUP, no negative gap


def test_an_unreadable_trace_is_an_error_not_an_empty_table() -> None:
    tool = _tool()
    with pytest.raises(tool.TraceError):
        tool.parse(["garbage line that is no tracefs event"], 46)
    assert tool.parse(["# tracer: nop", ""], 46).requests == []  # an empty trace is fine


def test_a_directory_that_is_not_a_fuse_mount_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = _tool()
    assert tool.main(["--mount", str(tmp_path), "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fusetrace: {tmp_path} is not a FUSE mount"


def _tracefs_state() -> dict[str, str]:
    tracefs = Path("/sys/kernel/tracing")
    state = {str(p): p.read_text() for p in sorted(tracefs.glob("per_cpu/cpu*/buffer_size_kb"))}
    for name in ("trace_clock", "tracing_on", "events/fuse/fuse_request_send/enable",
                 "events/fuse/fuse_request_end/enable", "events/sched/sched_wakeup/enable",
                 "events/sched/sched_switch/enable"):
        if (tracefs / name).exists():
            state[name] = (tracefs / name).read_text()
    return state


def test_traces_the_requests_of_a_real_mount(encfs_mount: Any, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("tracefs needs root")
    tool = _tool()
    directory = encfs_mount.mountpoint / "d"
    directory.mkdir()
    for i in range(50):
        (directory / f"f{i}").write_bytes(b"x" * 100)
    unlink_all = f"import os\nfor i in range(50): os.unlink('{directory}/f' + str(i))"
    before = _tracefs_state()
    rc = tool.main(["--mount", str(encfs_mount.mountpoint), "--sched", "--json", "--", sys.executable, "-c", unlink_all])
    out, err = capsys.readouterr()
    if rc == 2 and "no fuse/fuse_request_send event" in err:
        pytest.skip(err.strip())  # a kernel before 6.15
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["opcodes"]["UNLINK"]["count"] == 50
    assert summary["opcodes"]["UNLINK"]["send_to_end_us"]["n"] == 50
    assert summary["caller"]["requests"] >= 50
    assert list(directory.iterdir()) == []
    assert _tracefs_state() == before  # put back: events, tracing_on, clock, buffer sizes
