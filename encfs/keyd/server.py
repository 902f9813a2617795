"""`encfs keyd`'s server: trio, a Unix socket (and TCP with mutual TLS), one token thread.

Invariants:
- A client's principal comes from the transport (SO_PEERCRED, or the verified certificate's
  subject), read once per connection, before any request is read.
- Every request goes through one queue to the token worker process (TokenLink, worker.py), which
  alone holds the token session, one batch at a time. Requests that arrive while it is busy form
  the next batch, so concurrent calls share token passes, lock rounds and audit writes.
- A malformed or oversized frame gets one error reply where it can, then closes that connection
  only; a client that disconnects mid-request loses only its own replies. Nothing a client sends
  can stop the loop, and no reply or log line carries key material beyond the requester's own reply.
- At most MAX_IN_FLIGHT frames of one connection are in flight (requests not yet answered, and
  replies or error frames not yet sent), a request counting until its reply is sent: a client
  cannot grow the daemon's memory without bound by sending faster than the token answers, by
  reading its replies slowly, or by sending malformed requests whose errors it never reads; one
  that half-closes gets every reply.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import socket
import ssl
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from encfs.errors import AccessDenied, StateError, TokenError, UsageError
from encfs.keyd.dispatch import Request
from encfs.keyd.policy import principal_name_error
from encfs.keyd.principal import Principal
from encfs.keyd.protocol import (
    HEADER,
    MAX_FRAME,
    ProtocolError,
    decode_payload,
    encode_frame,
    error_body,
    frame_length,
)

log = logging.getLogger("encfs.keyd")

MAX_IN_FLIGHT = 32
STALL_SECONDS = 30.0  # the rest of a begun frame, or a send of replies, may take this long
BATCHES_IN_FLIGHT = 2
HANDSHAKE_SECONDS = 10.0


class _Connection:
    """One client connection: its principal, its frames waiting to be sent (one writer task sends
    them, several per send when they come together), and how many of its frames are in flight.

    A request stays in flight until its reply is *sent*, not merely answered, and so does the error
    frame about a malformed request: a client that reads nothing stops being read after
    MAX_IN_FLIGHT (its replies do not pile up in the daemon), and a client that half-closes gets
    every reply before its connection is closed."""

    def __init__(self, stream: trio.abc.Stream, principal: Principal, stall_seconds: float = STALL_SECONDS) -> None:
        self.stream = stream
        self.principal = principal
        self.stall_seconds = stall_seconds
        self.outbox: list[bytes] = []
        self.mail = trio.Event()
        self.room = trio.Event()
        self.pending = 0  # requests submitted to the token and not yet answered
        self.unsent = 0  # frames posted and not yet sent: replies, errors about requests or the connection

    @property
    def in_flight(self) -> int:
        return self.pending + self.unsent

    def post(self, message: dict[str, Any]) -> None:
        try:
            frame = encode_frame(message)
        except UsageError as e:  # a reply over the frame limit
            frame = encode_frame({"Id": message.get("Id"), "Error": error_body(e)})
        self.outbox.append(frame)
        self.unsent += 1
        self.mail.set()

    def answer(self, rid: Any, reply: dict[str, Any]) -> None:
        self.pending -= 1  # and unsent += 1: in flight until it is sent
        self.post({"Id": rid, **reply})

    async def writer(self) -> None:
        while True:
            await self.mail.wait()
            self.mail = trio.Event()
            frames, self.outbox = self.outbox, []
            if frames:
                with trio.move_on_after(self.stall_seconds) as sending:
                    await self.stream.send_all(b"".join(frames))
                if sending.cancelled_caught:  # a client that stopped reading: it holds nothing longer
                    raise ProtocolError(f"a client read none of its replies for {self.stall_seconds:g} s")
            self.unsent -= len(frames)
            self.room.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait for ``done()``, checked each time the writer has sent (the reading task's only)."""
        while not done():
            self.room = trio.Event()
            await self.room.wait()

    async def settled(self) -> None:
        """Until every request of this connection is answered and sent."""
        await self.until(lambda: not self.in_flight)


class TokenLink:
    """The trio side of the token worker (worker.py): requests queue here and go to the worker in
    batches, BATCHES_IN_FLIGHT at a time; the requests that arrive meanwhile form the next. Replies
    are posted to their connections (no task or event per request)."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._queue: list[tuple[_Connection, Any, Request]] = []
        self._wake = trio.Event()

    def submit(self, conn: _Connection, rid: Any, request: Request) -> None:
        conn.pending += 1
        self._queue.append((conn, rid, request))
        self._wake.set()

    async def run(self) -> None:
        """Send batches (at most BATCHES_IN_FLIGHT unanswered: the worker finds the next one waiting
        when it finishes one) and post the replies, which come back in order."""
        in_flight: collections.deque[list[tuple[_Connection, Any, Request]]] = collections.deque()
        room = trio.Semaphore(BATCHES_IN_FLIGHT)

        async def receive() -> None:
            frames = _FrameStream(self.stream)
            while True:
                raw = await frames.read_raw(limit=None)
                if raw is None:
                    raise TokenError("the key daemon's token worker exited")
                batch = in_flight.popleft()
                room.release()
                for (conn, rid, _), reply in zip(batch, pickle.loads(raw)):  # our own child's, never a client's
                    conn.answer(rid, reply)

        try:
            await self._pump(in_flight, room, receive)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TokenError("the key daemon's token worker exited") from None

    async def _pump(self, in_flight: collections.deque[list[tuple[_Connection, Any, Request]]],
                    room: trio.Semaphore, receive: Callable[[], Any]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            while True:
                await room.acquire()
                while not self._queue:
                    await self._wake.wait()
                    self._wake = trio.Event()
                batch, self._queue = self._queue, []
                in_flight.append(batch)
                data = pickle.dumps([r for _, _, r in batch], protocol=pickle.HIGHEST_PROTOCOL)
                await self.stream.send_all(HEADER.pack(len(data)) + data)


class _FrameStream:
    """Reads whole frames from a trio stream (bytes buffered between receives)."""

    def __init__(self, stream: trio.abc.Stream, stall_seconds: float | None = None) -> None:
        """``stall_seconds``: how long the rest of a begun frame may take (None: no limit). A client
        may be silent between frames for as long as it likes (a mount's idle connection)."""
        self.stream = stream
        self.buffer = bytearray()
        self.stall_seconds = stall_seconds

    async def _exactly(self, n: int, begun: bool = False) -> bytes | None:
        while len(self.buffer) < n:
            seconds = self.stall_seconds if (begun or self.buffer) and self.stall_seconds is not None else math.inf
            with trio.move_on_after(seconds) as waiting:  # only a begun frame is timed, not idling
                data = await self.stream.receive_some(max(65536, n - len(self.buffer)))
            if waiting.cancelled_caught:
                raise ProtocolError(f"a frame was begun and not finished within {self.stall_seconds:g} s")
            if not data:
                if self.buffer:
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def read_raw(self, limit: int | None = MAX_FRAME) -> bytes | None:
        header = await self._exactly(HEADER.size)
        if header is None:
            return None
        payload = await self._exactly(frame_length(header) if limit is not None else HEADER.unpack(header)[0],
                                      begun=True)
        if payload is None:
            raise ProtocolError("connection closed in the middle of a frame")
        return payload

    async def read(self) -> dict[str, Any] | None:
        payload = await self.read_raw()
        return None if payload is None else decode_payload(payload)


class KeyDaemon:
    def __init__(self, worker: socket.socket, stall_seconds: float = STALL_SECONDS) -> None:
        self.tokens = TokenLink(worker)
        self.connections = 0
        self.stall_seconds = stall_seconds

    async def serve(self, listeners: list[tuple[trio.abc.Listener[Any], Callable[[Any], Any]]],
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every listener until cancelled; each comes with the coroutine function that reads
        a new connection's principal (unix_principal or tls_principal)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.tokens.run)
            for listener, identify in listeners:
                nursery.start_soon(self._accept, listener, identify)
            task_status.started()

    async def _accept(self, listener: trio.abc.Listener[Any], identify: Callable[[Any], Any]) -> None:
        async with listener, trio.open_nursery() as nursery:
            refusing = False  # logged once per episode, not 20 times a second
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE and the like: refuse this one, keep serving
                    if not refusing:
                        log.warning("cannot accept connections (%s, %d open): waiting for some to close",
                                    e.strerror, self.connections)
                    refusing = True
                    await trio.sleep(0.05)
                    continue
                if refusing:
                    log.warning("accepting connections again (%d open)", self.connections)
                    refusing = False
                nursery.start_soon(self._connection, stream, identify)

    async def _connection(self, stream: trio.abc.Stream, identify: Callable[[Any], Any]) -> None:
        self.connections += 1
        principal: Principal | None = None
        try:
            async with stream:
                try:
                    principal = await identify(stream)
                except AccessDenied as e:  # a peer the transport verified but no policy can name
                    await stream.send_all(encode_frame({"Id": None, "Error": error_body(e)}))
                    with trio.move_on_after(1):  # read what it sent: a close with unread bytes is a reset,
                        await stream.receive_some(65536)  # which could lose the reply above
                    return
                if principal is not None:
                    await self._requests(stream, principal)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError, ProtocolError):
            pass  # the client went away (or failed its handshake): its requests die with it
        except* Exception:
            log.exception("a connection of %s failed", getattr(principal, "describe", lambda: "?")())
        finally:
            self.connections -= 1

    async def _requests(self, stream: trio.abc.Stream, principal: Principal) -> None:
        frames = _FrameStream(stream, self.stall_seconds)
        conn = _Connection(stream, principal, self.stall_seconds)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.writer)
            try:
                while True:
                    await conn.until(lambda: conn.in_flight < MAX_IN_FLIGHT)
                    message = await frames.read()
                    if message is None:
                        break
                    rid, op, args = message.get("Id"), message.get("Op"), message.get("Args", {})
                    if not isinstance(op, str) or not isinstance(args, dict):
                        conn.post({"Id": rid, "Error": error_body(UsageError("a request needs Op and Args"))})
                        continue
                    self.tokens.submit(conn, rid, Request(principal, op, args))
                await conn.settled()  # the client stopped sending: its answers still go out
            except ProtocolError as e:
                conn.post({"Id": None, "Error": error_body(UsageError(str(e)))})
                await conn.until(lambda: not conn.unsent)  # the error goes out before the close
            nursery.cancel_scope.cancel()


async def unix_principal(stream: trio.SocketStream) -> Principal:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return await trio.to_thread.run_sync(Principal.from_peer, uid, gid, pid)  # NSS may be slow


async def tls_principal(stream: trio.SSLStream[Any]) -> Principal | None:
    """The verified client certificate's subject; None (the connection is closed) for a client
    that fails the handshake, which is logged with the reason and told by TLS's own alert."""
    from encfs.keyd.tls import subject_of

    with trio.move_on_after(HANDSHAKE_SECONDS):
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            await _send_alert(stream)
            cause = e.__cause__
            why = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause or e
            log.warning("refused a TLS client from %s: %s", _peer(stream), why)
            return None
        der = stream.getpeercert(binary_form=True)
        if der:
            subject = subject_of(der)
            why = principal_name_error(subject)
            if why is None:
                return Principal.from_certificate(subject)
            # A subject no policy can name (empty, unprintable) would also make the default policy
            # of a key it created unparseable: refused here, before any request.
            log.warning("refused a TLS client from %s: its certificate's subject: %s", _peer(stream), why)
            raise AccessDenied(f"the key daemon refuses this client certificate: its subject is no principal name "
                               f"({why})")
    return None


async def _send_alert(stream: trio.SSLStream[Any]) -> None:
    """Send what OpenSSL wrote when the handshake failed: its alert (unknown CA, expired, no
    certificate). trio drops it (the SSLStream is broken before it flushes), which would leave the
    client with a bare EOF; with it, the client can say its certificate was refused. Best effort:
    the outgoing buffer is trio's private attribute."""
    outgoing = getattr(stream, "_outgoing", None)
    pending = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    if pending:
        with trio.move_on_after(1.0):
            try:
                await stream.transport_stream.send_all(pending)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def _peer(stream: trio.SSLStream[Any]) -> str:
    try:
        host, port = stream.transport_stream.socket.getpeername()[:2]
    except (AttributeError, OSError):
        return "?"
    return f"{host}:{port}"


def unix_listener(path: Path, sock: socket.socket | None = None) -> trio.SocketListener:
    """Listen on ``path`` (mode 0666: access is decided by policy, not by the file's mode), or on
    an inherited socket (systemd's socket activation). A stale socket file is replaced; a live one
    (another daemon answering there) is refused."""
    if sock is None:
        _refuse_live_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
        except OSError as e:
            sock.close()
            raise StateError(f"cannot listen on {path}: {e.strerror}") from None
        os.chmod(path, 0o666)
        sock.listen(512)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` (a daemon, or its
    listening socket before the daemon is ready)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _refuse_live_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StateError(f"{path} exists and is not a socket: remove it or choose another --socket")
    if not answers(path):
        os.unlink(path)  # nobody answers: a daemon that died without removing it
        return
    from encfs.errors import Busy

    raise Busy(f"a key daemon already answers on {path}")


async def tcp_listeners(host: str, port: int, context: ssl.SSLContext) -> list[trio.SSLListener[Any]]:
    plain = await trio.open_tcp_listeners(port, host=host)
    return [trio.SSLListener(listener, context, https_compatible=False) for listener in plain]
