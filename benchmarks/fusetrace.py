#!/usr/bin/env python3
"""Where a FUSE mount's requests spend their time, from the kernel's own tracepoints.

    fusetrace.py --mount MOUNTPOINT [--sched] [--json] -- COMMAND [ARG...]

Runs COMMAND with the kernel's ``fuse:fuse_request_send`` and ``fuse:fuse_request_end`` events on
(tracefs; kernels from 6.15 have them), and with ``--sched`` also ``sched:sched_wakeup`` and
``sched:sched_switch``. It then prints, per opcode of the mount's connection, how many requests
were sent and how long each took from send to end (the daemon's share plus the transport), and
for the process that sent most of them (the caller) the time from each request's end to its next
request (its wake-up and its own work). With ``--sched``: how long the caller took to be woken
after the end (on this VM a wake-up on the other vCPU is an interrupt between CPUs, tens of
microseconds), and on which CPU.

Root only (tracefs). The trace buffer is emptied first; the events' states, tracing_on, the trace
clock and the buffer sizes are put back whatever COMMAND does. Exits with COMMAND's status, or 2
with a one-line error if the mount or its tracepoints cannot be traced. Requests the caller does
not wait for (RELEASE, read-ahead) count in the per-opcode rows but not in its gaps. perf and
trace-cmd record the same events; what this script adds is the join of each request's send and end
with its caller's wake-up, which neither summarises (docs/dev/fuse-python.md, "Measuring a request
in the kernel").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACEFS = Path("/sys/kernel/tracing")
FUSE_EVENTS = ("fuse/fuse_request_send", "fuse/fuse_request_end")
SCHED_EVENTS = ("sched/sched_wakeup", "sched/sched_switch")
BUFFER_KIB = 65536  # per CPU: a few hundred thousand events

# comm-pid [(tgid)] [cpu] [flags] timestamp: event: fields (tgid with record-tgid; no flags with irq-info off)
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
                   r"(?P<ts>\d+\.\d+): (?P<event>\w+): (?P<rest>.*)$")
_SEND = re.compile(r"connection (\d+) req (\d+) opcode \d+ \((\w+)\)")
_END = re.compile(r"connection (\d+) req (\d+) len \d+ error (-?\d+)")
_WAKEUP = re.compile(r"pid=(\d+) prio=\d+ target_cpu=(\d+)")
_SWITCH_IN = re.compile(r"==> next_comm=.* next_pid=(\d+)")


class TraceError(Exception):
    """tracefs or the FUSE events are not there."""


@dataclass
class Request:
    opcode: str
    caller: int
    send: float  # microseconds, CLOCK_MONOTONIC
    end: float | None = None
    end_cpu: int | None = None
    error: int = 0
    woken: float | None = None  # the caller's wake-up after the end (--sched)
    woken_cpu: int | None = None
    running: float | None = None  # the caller back on a CPU


@dataclass
class Trace:
    requests: list[Request] = field(default_factory=list)


def connection_of(mountpoint: Path) -> int:
    """The FUSE connection number of a mount, as the tracepoints print it (the kernel's dev_t of
    the connection: the device's minor for a plain FUSE mount, major and minor for fuseblk).
    Read from the mount table, as encfs does, without a stat of the mountpoint."""
    from encfs.fuseproto.mounting import topmost_mount

    mount = topmost_mount(mountpoint)
    if mount is None or not mount.fstype.startswith("fuse"):
        raise TraceError(f"{mountpoint} is not a FUSE mount")
    major, minor = (int(n) for n in mount.device.split(":"))
    return major << 20 | minor


def parse(lines: list[str], connection: int) -> Trace:
    """The requests of ``connection`` in a tracefs text trace, with their callers' wake-ups."""
    trace = Trace()
    req: Request | None
    pending: dict[int, Request] = {}
    waiting: dict[int, Request] = {}  # caller pid -> its request that ended, before it ran again
    last_send: dict[int, float] = {}  # caller pid -> when it sent its latest request
    events = 0
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        events += 1
        event, rest, ts, cpu = m["event"], m["rest"], float(m["ts"]) * 1e6, int(m["cpu"])
        if event == "fuse_request_send":
            s = _SEND.match(rest)
            if s and int(s[1]) == connection:
                new = Request(s[3].removeprefix("FUSE_"), int(m["pid"]), ts)
                pending[int(s[2])] = new
                trace.requests.append(new)
                last_send[new.caller] = ts
        elif event == "fuse_request_end":
            e = _END.match(rest)
            if e and int(e[1]) == connection and (req := pending.pop(int(e[2]), None)) is not None:
                req.end, req.end_cpu, req.error = ts, cpu, int(e[3])
                if last_send[req.caller] == req.send:  # else a background request (RELEASE, read-ahead)
                    waiting[req.caller] = req
        elif event == "sched_wakeup":
            w = _WAKEUP.search(rest)
            if w and (req := waiting.get(int(w[1]))) is not None and req.woken is None:
                req.woken, req.woken_cpu = ts, int(w[2])
        elif event == "sched_switch":
            s2 = _SWITCH_IN.search(rest)
            if s2 and (req := waiting.get(int(s2[1]))) is not None and req.woken is not None:
                req.running = ts
                del waiting[req.caller]
    if events == 0 and any(line.strip() and not line.startswith("#") for line in lines):
        raise TraceError("no line of the trace could be read (a tracefs option changed their format?)")
    return trace


def _stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    n = len(values)
    return {"n": n, "p50": values[n // 2], "p90": values[min(n - 1, int(n * 0.9))], "mean": statistics.fmean(values)}


def summarise(trace: Trace) -> dict[str, Any]:
    """Per opcode: count, errors and send-to-end times; for the main caller: its gaps."""
    by_op: dict[str, list[Request]] = collections.defaultdict(list)
    for req in trace.requests:
        by_op[req.opcode].append(req)
    ops = {}
    for op, reqs in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
        ended = [r.end - r.send for r in reqs if r.end is not None]
        ops[op] = {"count": len(reqs), "errors": sum(1 for r in reqs if r.error),
                   "send_to_end_us": _stats(ended) if ended else None}
    out: dict[str, Any] = {"requests": len(trace.requests), "opcodes": ops}
    if not trace.requests:
        return out
    caller = collections.Counter(r.caller for r in trace.requests).most_common(1)[0][0]
    mine = [r for r in trace.requests if r.caller == caller]
    gaps = [b.send - a.end for a, b in itertools.pairwise(mine) if a.end is not None and b.send >= a.end]
    woken = [r for r in mine if r.woken is not None and r.end is not None]
    summary: dict[str, Any] = {"pid": caller, "requests": len(mine)}
    if gaps:
        summary["end_to_next_send_us"] = _stats(gaps)
    if woken:
        summary["end_to_wakeup_us"] = _stats([r.woken - r.end for r in woken if r.woken is not None and r.end is not None])
        summary["woken_on_daemon_cpu"] = sum(1 for r in woken if r.woken_cpu == r.end_cpu) / len(woken)
    out["caller"] = summary
    return out


def _kib(text: str) -> str:
    """A buffer_size_kb value to write back: "7 (expanded: 1408)" before first use is 1408."""
    expanded = re.search(r"expanded: (\d+)", text)
    return expanded[1] if expanded else text.split()[0]


@contextlib.contextmanager
def tracing(sched: bool) -> Iterator[Callable[[], list[str]]]:
    """The FUSE (and sched) events on, the trace emptied; yields ``collect``, which turns them
    off and returns the trace's lines. The events' and tracing_on's states, the trace clock and
    the per-CPU buffer sizes are put back afterwards, each on its own (changing the clock
    empties the trace, so it is read first); a tracefs mounted here is unmounted."""
    mounted_here = False
    if not (TRACEFS / "events").is_dir():
        mounted_here = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False,
                                      capture_output=True).returncode == 0
    events = FUSE_EVENTS + (SCHED_EVENTS if sched else ())
    missing = [e for e in events if not (TRACEFS / "events" / e).is_dir()]
    if missing:
        if mounted_here:
            subprocess.run(["umount", str(TRACEFS)], check=False, capture_output=True)
        raise TraceError(f"no {missing[0]} event in {TRACEFS} (FUSE's need kernel 6.15 or later; tracefs; root)")
    enables = {e: TRACEFS / "events" / e / "enable" for e in events}
    was_enabled = {e: path.read_text().strip() for e, path in enables.items()}
    tracing_on = (TRACEFS / "tracing_on").read_text().strip()
    clock = re.search(r"\[(\w+)\]", (TRACEFS / "trace_clock").read_text())
    sizes = [(path, _kib(path.read_text())) for path in sorted(TRACEFS.glob("per_cpu/cpu*/buffer_size_kb"))]

    def put(path: Path, value: str) -> None:
        with contextlib.suppress(OSError):
            path.write_text(value)

    def collect() -> list[str]:
        for path in enables.values():
            put(path, "0")
        lost = sum(int(m[1]) for stats in TRACEFS.glob("per_cpu/cpu*/stats")
                   for m in [re.search(r"^overrun: (\d+)", stats.read_text(), re.MULTILINE)] if m)
        if lost:
            print(f"fusetrace: {lost} events were lost (the trace buffer overflowed): the counts are low",
                  file=sys.stderr)
        return (TRACEFS / "trace").read_text().splitlines()

    try:
        (TRACEFS / "trace_clock").write_text("mono")
        (TRACEFS / "buffer_size_kb").write_text(str(BUFFER_KIB))
        (TRACEFS / "trace").write_text("")
        for path in enables.values():
            path.write_text("1")
        (TRACEFS / "tracing_on").write_text("1")
        yield collect
    finally:
        for e, path in enables.items():
            put(path, was_enabled[e])
        put(TRACEFS / "tracing_on", tracing_on)
        if clock:
            put(TRACEFS / "trace_clock", clock[1])
        for path, kib in sizes:
            put(path, kib)
        if mounted_here:
            subprocess.run(["umount", str(TRACEFS)], check=False, capture_output=True)


def _print(summary: dict[str, Any]) -> None:
    def fmt(s: object) -> str:
        if not isinstance(s, dict):
            return "-"
        return f"p50 {s['p50']:.0f}  p90 {s['p90']:.0f}  mean {s['mean']:.0f}"
    print(f"{'opcode':<14} {'count':>7} {'errors':>6}  send->end (us)")
    for op, o in summary["opcodes"].items():
        print(f"{op:<14} {o['count']:>7} {o['errors']:>6}  {fmt(o['send_to_end_us'])}")
    caller = summary.get("caller")
    if isinstance(caller, dict):
        print(f"caller pid {caller['pid']} ({caller['requests']} requests):")
        print(f"  end -> its next send (us): {fmt(caller.get('end_to_next_send_us'))}")
        if "end_to_wakeup_us" in caller:
            print(f"  end -> wake-up (us):       {fmt(caller['end_to_wakeup_us'])}; "
                  f"woken on the CPU that ended the request: {caller['woken_on_daemon_cpu']:.0%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mount", type=Path, required=True, help="the FUSE mountpoint whose requests to trace")
    p.add_argument("--sched", action="store_true", help="also trace wake-ups and context switches")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command to run (after --)")
    try:
        connection = connection_of(args.mount)
        with tracing(args.sched) as collect:
            rc = subprocess.run(command, check=False).returncode
            trace = parse(collect(), connection)
    except (TraceError, OSError) as e:
        print(f"fusetrace: {e}", file=sys.stderr)
        return 2
    summary = summarise(trace)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print(summary)
    return rc


if __name__ == "__main__":
    sys.exit(main())
