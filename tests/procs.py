"""Processes seen through /proc: what tests check about daemons and their helpers; and a
command run on a terminal (pty), answering its prompts."""

from __future__ import annotations

import os
import pty
import select
import time
from pathlib import Path


def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def voluntary_switches(pid: int) -> int:
    """How often ``pid`` has gone to sleep: a helper that waits for work wakes once per job."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


def run_on_terminal(cmd: list[str], env: dict[str, str], answers: dict[bytes, str],
                    timeout: float = 90) -> tuple[int, bytes, int]:
    """Run ``cmd`` on a pty, answering each prompt; return (exit code, output, prompts seen)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(cmd[0], cmd, env)
    out, prompts = b"", 0
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1000)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            for prompt, answer in answers.items():
                while sum(out.count(p) for p in answers) > prompts and out.count(prompt) > 0:
                    prompts += 1
                    os.write(fd, answer.encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out, prompts
    finally:
        os.close(fd)
