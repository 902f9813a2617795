"""The key daemon's token worker: a child process that alone opens the token and runs requests.

The trio process (server.py) frames, identifies and queues; this process decides and runs each
batch (Dispatcher) on its own token session. Two processes use the machine's two cores: on one,
the daemon topped out at 5.7k Decrypt/s, framing and token sharing one interpreter
(docs/dev/keyd.md, "Two processes").

Invariants:
- Only this process loads the PKCS#11 module and logs in; the network-facing process never holds
  a token session (it may hold a PIN it read to hand over, as any daemon's parent does).
- Batches come and go over a socketpair as u32-length-prefixed pickles, in order; both ends are
  this program (the parent forks the child before any client connects), so nothing a client sends
  is unpickled here: a client's frame is JSON, parsed by the parent.
- Errors cross as protocol error bodies, never as pickled exceptions; the client raises the same
  class from the body.
- The worker ends when the parent's end closes (EOF): a killed daemon leaves no token holder behind.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encfs.errors import EncfsError, StateError, TokenError
from encfs.keyd.protocol import error_body, raise_error

log = logging.getLogger("encfs.keyd")
_LEN = struct.Struct(">I")


def send_message(sock: socket.socket, message: Any) -> None:
    _send_data(sock, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _send_data(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _pickled_replies(replies: list[dict[str, Any]]) -> bytes:
    """A batch's replies as one pickle; a reply pickle refuses (a bug's value) becomes an error for
    its request alone, so that one bad reply neither kills the worker nor fails its batch. Logged
    without the value or pickle's message: either may hold key material."""
    try:
        return pickle.dumps(replies, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - PicklingError, TypeError, AttributeError, RecursionError...
        out = []
    for reply in replies:
        try:
            pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            out.append(reply)
        except Exception:  # noqa: BLE001 - as above
            log.error("a reply of the key daemon's token worker could not be sent (a bug): its request fails")
            out.append({"Error": error_body(StateError("the key daemon failed on this request (see its log)"))})
    return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)


def recv_message(sock: socket.socket) -> Any:
    """The next message, or None at EOF."""
    header = _recv_exactly(sock, _LEN.size)
    if header is None:
        return None
    data = _recv_exactly(sock, _LEN.unpack(header)[0])
    if data is None:
        return None
    return pickle.loads(data)  # our own parent/child, never a client's bytes


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(n - got, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def start(home: Path, hsm: Any, roles: Any, close_in_child: Sequence[Any] = ()) -> tuple[socket.socket, int]:
    """Fork the worker; return the parent's end and its pid once it has opened the token, or raise
    the one-line error that kept it from doing so (wrong PIN, no key store, ...). The child closes
    ``close_in_child`` (the listening sockets: only the parent accepts)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its work is seen through the parent
        code = 0
        try:
            parent.close()
            for listener in close_in_child:  # only the fd: closing a trio socket needs its loop
                try:
                    os.close(listener.socket.fileno())
                except OSError:
                    pass
            _serve(child, home, hsm, roles)
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
            log.error("the key daemon's token worker failed: %s", traceback.format_exc().splitlines()[-1])
            code = 1
        finally:
            os._exit(code)
    child.close()
    ready = recv_message(parent)
    if not isinstance(ready, dict) or "Error" in ready:
        parent.close()
        os.waitpid(pid, 0)
        if isinstance(ready, dict):
            raise_error(ready["Error"])
        raise TokenError("the key daemon's token worker exited before it opened the token")
    return parent, pid


def stop(sock: socket.socket, pid: int, timeout: float = 30.0) -> None:
    """Close the worker's socketpair (it ends after its batch) and reap it; SIGKILL after ``timeout``."""
    sock.close()
    deadline = time.monotonic() + timeout
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _serve(sock: socket.socket, home: Path, hsm: Any, roles: Any) -> None:
    from encfs.keyd.acl import AccessControl
    from encfs.keyd.dispatch import Dispatcher
    from encfs.keyd.secretstore import SecretStore
    from encfs.keys.service import KeyService

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the parent stops it by closing the socketpair
    try:
        ks = KeyService.open(home, hsm)
    except EncfsError as e:
        send_message(sock, {"Error": error_body(e)})
        return
    try:
        try:
            ks.token.login()  # a wrong PIN ends the daemon here, before it serves
        except EncfsError as e:
            send_message(sock, {"Error": error_body(e)})
            return
        dispatcher = Dispatcher(ks, AccessControl(home / "keyd", roles), SecretStore(home, ks))
        send_message(sock, {"Ready": True})
        while (batch := recv_message(sock)) is not None:
            try:
                replies = dispatcher.run_batch(batch)
            except Exception:  # a bug fails this batch, not the daemon
                log.exception("a batch of %d requests failed", len(batch))
                replies = [StateError("the key daemon failed on this request (see its log)")] * len(batch)
            _send_data(sock, _pickled_replies([{"Error": error_body(r)} if isinstance(r, EncfsError) else {"Result": r}
                                               for r in replies]))
    finally:
        ks.close()
