"""The audit trail across log rotation and key deletion (issue #23), through the real CLI.

A long-lived key service in a subprocess (the way a mount or volume daemon holds one) keeps
writing while the real ``logrotate`` rotates ``audit.log`` with contrib/logrotate/encfs: every
record after a rotation lands in the new ``audit.log``, and ``encfs key audit`` reads the rotated
files (``audit.log.1``, ``audit.log.2.gz``) and the current one in order. ``encfs key audit --key``
still shows the history of a key after it was deleted, by its id or its former alias.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import init_home, run_encfs

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "logrotate" / "encfs"

# Holds one key service open for its whole life; for each number N read on stdin it asks for a
# data key with context n=N (one GenerateDataKey record) and answers N once the call returned.
WRITER = """
import sys
from pathlib import Path
from encfs.keys.service import KeyService
with KeyService.open(Path(sys.argv[1])) as ks:
    for line in sys.stdin:
        ks.generate_data_key("alias/rot", {"n": line.strip()})
        print(line.strip(), flush=True)
"""

# Opens the key service eight days from now: a deletion scheduled for seven days is due and done.
LATER = """
import sys, time
from pathlib import Path
from encfs.keys.service import KeyService
with KeyService.open(Path(sys.argv[1]), clock=lambda: time.time() + 8 * 86400) as ks:
    ks.list_keys()
"""


def ok(*args: str, home: Path, input: bytes = b"") -> bytes:
    proc = run_encfs(*args, home=home, input=input)
    assert proc.returncode == 0, (args, proc.stderr.decode(errors="replace"))
    return proc.stdout


def python_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    return env


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    home = init_home(tmp_path / "home")
    ok("key", "create", "--alias", "rot", home=home)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env(home))
    try:
        yield home, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def write(proc: subprocess.Popen[str], *numbers: int) -> None:
    """One record per number, each written before this returns (the writer answers after it)."""
    assert proc.stdin is not None and proc.stdout is not None
    for n in numbers:
        proc.stdin.write(f"{n}\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == f"{n}\n", proc.poll()


def numbers(lines: list[str]) -> list[int]:
    """The n of each GenerateDataKey record in ``lines`` (JSON lines of an audit log)."""
    return [int(r["encryption_context"]["n"]) for r in map(json.loads, lines)
            if r["operation"] == "GenerateDataKey"]


def logrotate(home: Path, tmp_path: Path) -> None:
    """The shipped rules, on this home's audit.log, forced (-f) as a weekly run would, own state file."""
    conf = tmp_path / "logrotate.conf"
    text = CONTRIB.read_text()
    assert "/root/.local/share/encfs/audit.log {" in text
    conf.write_text(text.replace("/root/.local/share/encfs/audit.log", str(home / "audit.log")))
    proc = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed (quickstart.sh installs it)")
def test_logrotate_while_a_key_service_writes(writer: tuple[Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    home, proc = writer
    log = home / "audit.log"
    write(proc, 1, 2, 3)
    logrotate(home, tmp_path)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.stat().st_size == 0  # `create 0600 root root`
    write(proc, 4, 5, 6)
    # Nothing after the rename went to the rotated file: the writer reopened audit.log.
    assert numbers((home / "audit.log.1").read_text().splitlines()) == [1, 2, 3]
    assert numbers(log.read_text().splitlines()) == [4, 5, 6]
    logrotate(home, tmp_path)  # delaycompress: audit.log.1 becomes audit.log.2.gz only now
    write(proc, 7, 8)
    with gzip.open(home / "audit.log.2.gz", "rt") as f:
        assert numbers(f.read().splitlines()) == [1, 2, 3]
    assert numbers((home / "audit.log.1").read_text().splitlines()) == [4, 5, 6]
    assert numbers(log.read_text().splitlines()) == [7, 8]

    records = json.loads(ok("key", "audit", "--json", "--key", "rot", home=home))["Records"]
    assert records[0]["Operation"] == "CreateKey"  # from audit.log.2.gz
    assert [int(r["EncryptionContext"]["n"]) for r in records if r["Operation"] == "GenerateDataKey"] == \
        [1, 2, 3, 4, 5, 6, 7, 8]
    assert len(json.loads(ok("key", "audit", "--json", "--tail", "3", home=home))["Records"]) == 3
    assert json.loads(ok("key", "audit", "--json", "--tail", "0", home=home))["Records"] == []  # as tail -n 0
    text = ok("key", "audit", home=home).decode()
    assert "n=1" in text and "n=8" in text


def test_audit_of_a_deleted_key(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    key = json.loads(ok("key", "create", "--alias", "gone", "--json", home=home))["KeyId"]
    ok("key", "create", "--alias", "stays", home=home)
    ok("key", "encrypt", "gone", "--context", "app=x", home=home, input=b"secret")
    ok("key", "encrypt", "stays", home=home, input=b"other")
    ok("key", "schedule-deletion", "gone", "--days", "7", home=home)
    later = subprocess.run([sys.executable, "-c", LATER, str(home)], check=False, capture_output=True,
                           text=True, env=python_env(home), timeout=120)
    assert later.returncode == 0, later.stderr
    proc = run_encfs("key", "describe", key, home=home)
    assert proc.returncode == 66 and b"was deleted" in proc.stderr

    for ref in (key, "gone", "alias/gone"):
        records: list[dict[str, Any]] = json.loads(ok("key", "audit", "--json", "--key", ref, home=home))["Records"]
        assert [(r["Operation"], r["KeyId"]) for r in records] == [
            ("CreateKey", key), ("Encrypt", key), ("ScheduleKeyDeletion", key), ("DeleteKey", key)], ref
        assert records[0]["Alias"] == "alias/gone" and records[-1]["Trigger"] == "deletion window ended"
    text = ok("key", "audit", "--key", "gone", home=home).decode()
    assert "Encrypt" in text and "app=x" in text and "DeleteKey" in text

    for ref in ("never-was", str(uuid.uuid4())):  # what the trail never named is still not found
        proc = run_encfs("key", "audit", "--key", ref, home=home)
        err = proc.stderr.decode()
        assert proc.returncode == 66 and err.count("\n") == 1 and err.startswith("encfs: ") and ref in err, err


def test_damaged_rotated_logs_are_one_warning_each_never_a_crash(tmp_path: Path) -> None:
    """A rotated file whose compressed data is damaged, and a line that is an object without a
    record's fields, are warned about or shown with "?": `key audit` still lists the rest."""
    home = init_home(tmp_path / "home")
    ok("key", "create", "--alias", "k", home=home)
    good = gzip.compress(b'{"time": "2026-01-01T00:00:00Z", "operation": "Old", "outcome": "ok"}\n' * 50)
    (home / "audit.log.2.gz").write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:])
    (home / "audit.log.1").write_text('{"time": "x"}\n')
    proc = run_encfs("key", "audit", home=home)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "audit.log.2.gz cannot be read to its end" in err and "Traceback" not in err, err
    assert "CreateKey" in out and any(line.startswith("x ") for line in out.splitlines()), out


def test_a_short_write_on_a_full_disk_leaves_no_torn_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC first shows as a short write: the part written must go, else the next record (its
    request answered, plaintext given out) is appended to that torn line and cannot be read."""
    from encfs.errors import StateError
    from encfs.keys import audit

    log = audit.AuditLog(tmp_path / "audit.log")
    log.record("Encrypt", outcome="success", key_id="k1")
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:40])  # the page left, then the disk is full

    monkeypatch.setattr(audit.os, "write", full)
    with pytest.raises(StateError, match="short write"):
        log.record("Decrypt", outcome="success", key_id="k1")
    monkeypatch.setattr(audit.os, "write", real_write)  # space freed
    log.record("Decrypt", outcome="success", key_id="k2")
    log.close()
    records = list(log.read())
    assert [(r["operation"], r["key_id"]) for r in records] == [("Encrypt", "k1"), ("Decrypt", "k2")]
