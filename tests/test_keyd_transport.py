"""`encfs keyd`'s transport under clients that misbehave slowly: replies that wait to be sent (#24)."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

from keyd_rig import client, daemon_fixture, frames, home_with_key, keyd, read_frame, send_all  # noqa: F401

PLAINTEXT = base64.b64encode(os.urandom(4096)).decode()  # KMS's largest: a reply of ~6 KiB


def encrypt(rid: int) -> bytes:
    return json.dumps({"Id": rid, "Op": "Encrypt", "Args": {"KeyId": "alias/mine", "Plaintext": PLAINTEXT}}).encode()


def generate(rid: int) -> bytes:
    return json.dumps({"Id": rid, "Op": "GenerateDataKey", "Args": {"KeyId": "alias/mine", "NumberOfBytes": 1024}}).encode()


def test_a_client_that_half_closes_gets_every_reply_even_when_it_reads_late(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    s = send_all(sock, [generate(i) for i in range(500)])  # 40 kB of requests, 1.5 MB of replies
    s.shutdown(socket.SHUT_WR)
    time.sleep(1.5)  # every request is answered meanwhile; the replies wait for this client to read
    replies = []
    while (frame := read_frame(s)) is not None:
        replies.append(json.loads(frame))
    s.close()
    assert [r.get("Id") for r in replies] == list(range(500))
    assert all("Result" in r for r in replies)
    assert proc.poll() is None


def malformed(rid: int) -> bytes:
    """A frame of JSON that is no request (no Op): an error reply as long as the request (its Id)."""
    return json.dumps({"Id": f"{rid}:{PLAINTEXT}"}).encode()


def _read_from_a_deaf_client(sock: Path, data: bytes) -> int:
    """How much of ``data`` the daemon reads from a client that reads nothing back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.fspath(sock))
    s.setblocking(False)
    sent = 0
    while sent < len(data):
        try:
            sent += s.send(data[sent:sent + 65536])
        except BlockingIOError:
            if not select.select([], [s], [], 2.0)[1]:
                break  # the daemon stopped reading this client
    s.close()
    return sent


def _deaf_client_is_not_read_further(sock: Path, proc: subprocess.Popen[bytes], requests: list[bytes]) -> None:
    """A client sending ``requests`` and reading nothing is read no further than about 4 MB, and
    the daemon goes on serving others."""
    sent = _read_from_a_deaf_client(sock, frames(*requests))
    assert sent < 4 << 20, f"the daemon read {sent} bytes from a client that reads no reply"
    assert proc.poll() is None
    other = send_all(sock, [encrypt(1)])
    assert "Result" in json.loads(read_frame(other) or b"{}")
    other.close()


def test_a_client_that_never_reads_is_not_read_further(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    _deaf_client_is_not_read_further(sock, proc, [encrypt(i) for i in range(2000)])  # 12 MB, as many of replies


def test_a_client_that_sends_only_malformed_requests_and_never_reads_is_not_read_further(daemon) -> None:  # type: ignore[no-untyped-def]
    """Their error replies are in flight like answers: they do not pile up in the daemon either."""
    _, sock, proc = daemon
    check = send_all(sock, [malformed(0)])
    assert "needs Op and Args" in json.loads(read_frame(check) or b"{}")["Error"]["Message"]
    check.close()
    _deaf_client_is_not_read_further(sock, proc, [malformed(i) for i in range(2000)])  # 11 MB, as many of errors


def test_stalled_clients_are_closed_and_idle_ones_kept(tmp_path: Path) -> None:
    """A frame begun and not finished, or replies never read, hold a connection --stall-timeout
    seconds at most; a client silent between requests (a mount's idle connection) stays."""
    home = tmp_path / "home"
    home_with_key(home)
    sock = tmp_path / "keyd.sock"
    with keyd(home, sock, "--stall-timeout", "1") as proc:
        made = client(sock, "key", "create", "--alias", "mine", home=home)
        assert made.returncode == 0, made.stderr
        idle = send_all(sock, [])
        half = send_all(sock, [])
        half.sendall((100).to_bytes(4, "big") + b'{"Id": 1')  # and then nothing
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(os.fspath(sock))
        deaf.setblocking(False)
        data, sent = frames(*[encrypt(i) for i in range(2000)]), 0
        deadline = time.monotonic() + 10
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += deaf.send(data[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed by the daemon: what this test waits for
        else:
            raise AssertionError("the daemon kept a client that read none of its replies")
        half.settimeout(10)
        reply = json.loads(read_frame(half) or b"{}")  # told why, then closed
        assert "not finished within 1 s" in reply["Error"]["Message"] and read_frame(half) is None
        time.sleep(1.5)
        idle.sendall(frames(encrypt(7)))  # silent for longer than the timeout: still served
        assert json.loads(read_frame(idle) or b"{}").get("Id") == 7
        for s in (idle, half, deaf):
            s.close()
        assert proc.poll() is None
