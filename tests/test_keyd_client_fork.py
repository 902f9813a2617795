"""RemoteKeyService's connection in a forked child while a parent's thread is mid-request (#24): the
child closes its copy of the parent's socket and connects anew."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

from keyd_rig import read_frame

from encfs.errors import KeydUnavailable
from encfs.keyd.client import KeydAddress, KeydConnection


def _fake_daemon(listener: socket.socket, stalled: threading.Event) -> None:
    """Answers every request with an empty Result, except the first connection's: never answered."""
    first = True
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if first:
            first = False
            stalled.set()
            threading.Thread(target=lambda c=conn: (read_frame(c), time.sleep(30), c.close()), daemon=True).start()
            continue
        request = json.loads(read_frame(conn) or b"{}")
        body = json.dumps({"Id": request.get("Id"), "Result": {"Child": True}}).encode()
        conn.sendall(len(body).to_bytes(4, "big") + body)
        conn.close()


def test_a_forked_child_gets_its_own_connection_while_a_parent_thread_holds_one(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(8)
    stalled = threading.Event()
    threading.Thread(target=_fake_daemon, args=(listener, stalled), daemon=True).start()
    conn = KeydConnection(KeydAddress(os.fspath(path)))

    def stuck_call() -> None:
        try:
            conn.call("Stalled", {})
        except KeydUnavailable:
            pass

    threading.Thread(target=stuck_call, daemon=True).start()
    assert stalled.wait(10)
    time.sleep(0.2)  # the parent's thread now waits for its reply, holding the connection's lock
    parents_fd = conn._sock.fileno() if conn._sock is not None else -1
    assert parents_fd >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what a mount's child does
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(10)
        try:
            try:
                os.fstat(parents_fd)  # the child's copy of its parent's socket: closed at the fork
                os._exit(3)
            except OSError:
                pass
            os._exit(0 if conn.call("FromChild", {}) == {"Child": True} else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung on its parent's connection lock")
    listener.close()
    code = os.waitstatus_to_exitcode(status)
    assert code != 3, "the child kept its own descriptor of the parent's connection open"
    assert code == 0
