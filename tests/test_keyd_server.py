"""`encfs keyd` as a process: framing, bad clients, load, and the same errors as a local token (#24)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
from pathlib import Path

from conftest import run_encfs
from keyd_rig import client, daemon_fixture, home_with_key, keyd, read_frame, send_all  # noqa: F401


def request(rid: int, op: str, **args: object) -> bytes:
    return json.dumps({"Id": rid, "Op": op, "Args": args}).encode()


def test_a_key_created_through_the_daemon_serves_data_keys(daemon) -> None:  # type: ignore[no-untyped-def]
    home, sock, _ = daemon
    s = send_all(sock, [request(1, "GenerateDataKey", KeyId="alias/mine", EncryptionContext={"a": "b"})])
    reply = json.loads(read_frame(s) or b"")
    s.close()
    assert reply["Id"] == 1 and len(base64.b64decode(reply["Result"]["Plaintext"])) == 32
    blob = base64.b64decode(reply["Result"]["CiphertextBlob"])
    opened = client(sock, "key", "decrypt", "--encryption-context", "a=b", home=home, input=blob)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == base64.b64decode(reply["Result"]["Plaintext"])


def test_errors_are_the_same_lines_and_codes_as_with_a_local_token(daemon) -> None:  # type: ignore[no-untyped-def]
    home, sock, proc = daemon
    blob = client(sock, "key", "encrypt", "mine", "--encryption-context", "a=b", home=home, input=b"hello")
    assert blob.returncode == 0, blob.stderr
    remote = client(sock, "key", "decrypt", "--encryption-context", "a=c", home=home, input=blob.stdout)
    missing = client(sock, "key", "describe", "nosuchkey", home=home)
    proc.terminate()
    proc.wait(10)
    local = run_encfs("key", "decrypt", "--encryption-context", "a=c", home=home, input=blob.stdout)
    local_missing = run_encfs("key", "describe", "nosuchkey", home=home)
    assert (remote.returncode, remote.stderr) == (local.returncode, local.stderr) == (
        65, b"encfs: encryption context does not match the one the blob was encrypted with\n")
    assert (missing.returncode, missing.stderr) == (local_missing.returncode, local_missing.stderr)
    assert missing.returncode == 66


def test_a_daemon_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = client(tmp_path / "nothing.sock", "key", "list", home=home)
    assert proc.returncode == 69
    assert proc.stderr.decode().startswith("encfs: cannot reach the key daemon at ") and proc.stderr.count(b"\n") == 1


def _alive(sock: Path) -> bool:
    s = send_all(sock, [request(9, "ListKeys")])
    reply = json.loads(read_frame(s) or b"{}")
    s.close()
    return "Result" in reply


def test_garbage_closes_that_connection_only(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    s = send_all(sock, [b"{not json"])
    reply = json.loads(read_frame(s) or b"{}")
    assert reply["Error"]["Type"] == "UsageError" and "not JSON" in reply["Error"]["Message"]
    assert read_frame(s) is None  # closed
    s.close()
    s = send_all(sock, [request(1, "NoSuchOp"), request(2, "ListKeys")])  # a well-formed unknown op: an error
    replies = {r["Id"]: r for r in (json.loads(read_frame(s) or b"{}") for _ in range(2))}
    s.close()
    assert "no operation 'NoSuchOp'" in replies[1]["Error"]["Message"] and "Result" in replies[2]
    assert proc.poll() is None and _alive(sock)


def test_an_oversized_frame_is_refused_before_it_is_read(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(os.fspath(sock))
    s.sendall((2 << 20).to_bytes(4, "big") + b"x" * 1000)  # announces 2 MiB; sends a little
    reply = json.loads(read_frame(s) or b"{}")
    assert "over the limit" in reply["Error"]["Message"]
    assert read_frame(s) is None
    s.close()
    assert proc.poll() is None and _alive(sock)


def test_clients_that_vanish_mid_frame_or_mid_request_harm_nobody(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    for _ in range(20):
        s = send_all(sock, [])
        s.sendall((100).to_bytes(4, "big") + b'{"Id": 1')  # half a frame, then gone
        s.close()
        s = send_all(sock, [request(i, "GenerateDataKey", KeyId="alias/mine") for i in range(8)])
        s.close()  # before any reply
    assert proc.poll() is None and _alive(sock)


def test_five_hundred_concurrent_clients_are_all_answered(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    conns = [send_all(sock, [request(i, "GenerateDataKey", KeyId="alias/mine", EncryptionContext={"n": str(i)})])
             for i in range(500)]
    try:
        replies = [json.loads(read_frame(s) or b"{}") for s in conns]
    finally:
        for s in conns:
            s.close()
    assert [r.get("Id") for r in replies] == list(range(500))
    assert all("Result" in r for r in replies), [r for r in replies if "Result" not in r][:1]
    assert len({r["Result"]["CiphertextBlob"] for r in replies}) == 500
    assert proc.poll() is None


def _worker_of(proc) -> int:  # type: ignore[no-untyped-def]
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_a_killed_token_worker_ends_the_daemon_in_one_line(daemon) -> None:  # type: ignore[no-untyped-def]
    _, sock, proc = daemon
    os.kill(_worker_of(proc), signal.SIGKILL)
    try:  # a request gets no answer: EOF, a reset as the daemon exits, or no socket left at all
        answered = read_frame(send_all(sock, [request(1, "ListKeys")]))
    except OSError:  # ConnectionError, or FileNotFoundError once the daemon removed its socket
        answered = None
    assert proc.wait(20) == 69
    log = sock.with_suffix(".log").read_text().strip().splitlines()
    assert log[-1] == "encfs: the key daemon's token worker exited", log
    assert not sock.exists()
    assert answered is None  # the daemon ended instead of answering


def test_a_killed_daemon_leaves_no_token_worker(daemon) -> None:  # type: ignore[no-untyped-def]
    _, _, proc = daemon
    worker = _worker_of(proc)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{worker}").exists() and "Z" not in Path(f"/proc/{worker}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the token worker outlived its daemon"
        time.sleep(0.05)


def test_the_audit_text_names_a_tls_client_by_its_subject(tmp_path: Path) -> None:
    from encfs.keys.audit import AuditLog

    home = tmp_path / "home"
    home_with_key(home)
    log = AuditLog(home / "audit.log")
    log.record("Decrypt", outcome="denied", error="CN=host9,O=x may not kms:Decrypt key k: no policy statement "
               "or grant allows it", principal={"kind": "tls", "subject": "CN=host9,O=x"})
    log.close()
    proc = run_encfs("key", "audit", "--tail", "1", home=home)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.decode()
    assert line.split()[1] == "CN=host9,O=x" and line.rstrip().endswith("no policy statement or grant allows it")


def test_commands_on_the_local_token_refuse_a_daemon(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for argv in (["hsm", "init"], ["hsm", "protect-pin"], ["hsm", "unprotect-pin"]):
        proc = client(tmp_path / "nothing.sock", *argv, home=home)
        assert proc.returncode == 2 and b"without --keyd" in proc.stderr and proc.stderr.count(b"\n") == 1, (
            argv, proc.stderr)
    assert not home.exists()  # nothing was provisioned or sealed locally
