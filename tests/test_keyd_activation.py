"""Socket activation (encfs/keyd/activation.py): a child started the way systemd starts a socket-
activated service (listening sockets from descriptor 3, LISTEN_PID set to the child's own pid by
the process that then execs it) takes its sockets and serves on them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# What systemd does between fork and exec: move the sockets to 3, 4, ... and set LISTEN_PID to the
# pid the service will have (exec keeps it). argv: SOURCE_FDS LISTEN_PID|self ENV_JSON -- CHILD...
LAUNCHER = """
import fcntl, json, os, sys
sources = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]  # out of the way of 3.. first
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
os.environ.update(json.loads(sys.argv[3]))
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
os.execv(sys.executable, [sys.executable, *sys.argv[5:]])
"""

# The service: report the sockets and the environment, then answer one client on each socket.
CHILD = """
import json, os, socket, sys
from encfs.errors import ConfigError
from encfs.keyd.activation import named_inherited_sockets
try:
    named = named_inherited_sockets()
except ConfigError as e:
    print(json.dumps({"error": e.message}), flush=True)
    sys.exit(78)
print(json.dumps({
    "sockets": [[name, int(s.family), int(s.type), s.fileno(), s.get_inheritable()] for name, s in named],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
for _, s in named:
    conn, _ = s.accept()
    conn.sendall(b"served by " + str(os.getpid()).encode())
    conn.close()
"""


def activate(sockets: list[socket.socket], env: dict[str, str], listen_pid: str = "self") -> subprocess.Popen[str]:
    fds = [s.fileno() for s in sockets]
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), listen_pid, json.dumps(env), "--", "-c", CHILD],
        pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))


def report(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, child.stderr.read() if child.stderr else ""
    out: dict[str, Any] = json.loads(line)
    return out


def test_child_serves_on_the_inherited_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "keyd.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    child = activate([unix, tcp], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "keyd-unix:keyd-tls"})
    try:
        got = report(child)
        assert got["sockets"] == [["keyd-unix", socket.AF_UNIX, socket.SOCK_STREAM, 3, False],
                                  ["keyd-tls", socket.AF_INET, socket.SOCK_STREAM, 4, False]]
        assert got["env"] == []  # unset once read: the daemon's own children never see them
        port = tcp.getsockname()[1]
        unix.close()
        tcp.close()  # the child holds its own copies: it, not this process, answers
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            assert c.recv(100) == f"served by {child.pid}".encode()
        with socket.create_connection(("127.0.0.1", port)) as c:
            assert c.recv(100) == f"served by {child.pid}".encode()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()


def test_names_unknown_without_fdnames(tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    child = activate([tcp], {"LISTEN_FDS": "1"})
    try:
        assert report(child)["sockets"] == [["unknown", socket.AF_INET, socket.SOCK_STREAM, 3, False]]
        socket.create_connection(tcp.getsockname()).close()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
        tcp.close()


@pytest.mark.parametrize("env, listen_pid", [
    ({"LISTEN_FDS": "1"}, "1"),  # meant for another process (an activated parent's leftovers)
    ({}, "self"),  # LISTEN_FDS missing
])
def test_variables_for_someone_else_are_dropped(env: dict[str, str], listen_pid: str) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    child = activate([tcp], {**env, "LISTEN_FDNAMES": "x"}, listen_pid=listen_pid)
    try:
        assert report(child) == {"sockets": [], "env": []}
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
        tcp.close()


def test_connected_socket_refused() -> None:
    """Accept=yes hands the service one connection; the daemon must say so, not serve one client."""
    a, b = socket.socketpair()
    child = activate([a], {"LISTEN_FDS": "1"})
    try:
        assert report(child) == {"error": "socket activation: descriptor 3 is a connected socket, not a listening "
                                          "one (the socket unit must not set Accept=yes)"}
        assert child.wait(timeout=30) == 78
    finally:
        child.kill()
        child.wait()
        a.close()
        b.close()


@pytest.mark.parametrize("count, message", [
    ("two", "socket activation: malformed LISTEN_PID="),
    ("2", "socket activation: LISTEN_FDS=2 but descriptor 4 is not open"),
])
def test_malformed_activation_is_a_config_error(count: str, message: str) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    child = activate([tcp], {"LISTEN_FDS": count})
    try:
        assert report(child)["error"].startswith(message)
        assert child.wait(timeout=30) == 78
    finally:
        child.kill()
        child.wait()
        tcp.close()
