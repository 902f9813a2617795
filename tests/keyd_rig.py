"""A real `encfs keyd` in a subprocess, on a temporary socket and state directory (tests of #24).

The daemon is started as `python -m encfs keyd` with its own embedded token, waited for until its
socket answers, and ended by PID (SIGTERM, then SIGKILL) whatever the test did.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import init_home, run_encfs

from encfs.keyd.server import answers

START_SECONDS = 30.0


@contextmanager
def keyd(home: Path, sock: Path, *extra: str, env: dict[str, str] | None = None,
         log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run `encfs keyd --home HOME --socket SOCK EXTRA...` until the block ends."""
    full_env = dict(os.environ, ENCFS_HOME=str(home))
    full_env.pop("SOFTHSM2_CONF", None)
    full_env.update(env or {})
    log = log or sock.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "encfs", "keyd", "--home", str(home), "--socket", str(sock),
                                 *extra], stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        deadline = time.monotonic() + START_SECONDS
        # Ready once it says so (the socket is bound before the token worker has logged in).
        while not answers(sock) or not log.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"encfs keyd did not start (exit {proc.poll()}): {log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def home_with_key(home: Path, alias: str = "k") -> str:
    """A provisioned home holding one CMK (created locally, so root holds no policy on it)."""
    init_home(home)
    proc = run_encfs("key", "create", "--alias", alias, home=home)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().strip()


def client(sock: Path, *args: str, home: Path, input: bytes = b"",
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real CLI as a client of the daemon (--keyd SOCK)."""
    return run_encfs(*args, "--keyd", str(sock), home=home, input=input, env=env)


def frames(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(4, "big") + m for m in messages)


def read_frame(s: socket.socket) -> bytes | None:
    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            got = s.recv(n - len(data))
            if not got:
                return None
            data += got
        return data

    header = exactly(4)
    return None if header is None else exactly(int.from_bytes(header, "big"))


def send_all(sock_path: Path, payloads: Sequence[bytes]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(os.fspath(sock_path))
    s.sendall(frames(*payloads))
    return s


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A daemon on a fresh home, with a key ``alias/mine`` created through it (so the test's user,
    root, holds its default policy): (home, socket, process). Import it as
    ``from keyd_rig import daemon_fixture  # noqa: F401`` and ask for ``daemon``."""
    home = tmp_path / "home"
    home_with_key(home)
    sock = tmp_path / "keyd.sock"
    with keyd(home, sock) as proc:
        made = client(sock, "key", "create", "--alias", "mine", home=home)
        assert made.returncode == 0, made.stderr
        yield home, sock, proc
