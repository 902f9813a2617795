"""`encfs keyd`'s server: trio, a Unix socket (and TCP with mutual TLS), one token thread.

Invariants:
- A client's principal comes from the transport (SO_PEERCRED, or the verified certificate's
  subject), read once per connection, before any request is read.
- Every request goes through one queue to one thread (TokenThread): SoftHSM2 under python-pkcs11
  must never see two threads (docs/dev/pkcs11.md). Requests that arrive while the thread is busy
  form the next batch, so concurrent GenerateDataKey calls share token passes.
- A malformed or oversized frame gets one error reply where it can, then closes that connection
  only; a client that disconnects mid-request loses only its own replies. Nothing a client sends
  can stop the loop, and no reply or log line carries key material beyond the requester's own reply.
- At most MAX_IN_FLIGHT requests of one connection are queued at a time: a client cannot grow the
  daemon's memory without bound by sending faster than the token answers.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from encfs.errors import EncfsError, StateError, UsageError
from encfs.keyd.dispatch import Dispatcher, Request
from encfs.keyd.principal import Principal
from encfs.keyd.protocol import HEADER, ProtocolError, decode_payload, encode_frame, error_body, frame_length

log = logging.getLogger("encfs.keyd")

MAX_IN_FLIGHT = 32
HANDSHAKE_SECONDS = 10.0


@dataclass
class _Pending:
    request: Request
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | EncfsError | None = None


class TokenThread:
    """The one thread that runs requests (Dispatcher), fed in batches from the trio loop."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self.batches = 0

    async def call(self, request: Request) -> dict[str, Any] | EncfsError:
        pending = _Pending(request)
        self._queue.append(pending)
        self._wake.set()
        await pending.done.wait()
        assert pending.reply is not None
        return pending.reply

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(1)
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self.batches += 1
            try:
                replies = await trio.to_thread.run_sync(
                    self.dispatcher.run_batch, [p.request for p in batch], limiter=limiter, abandon_on_cancel=False)
            except Exception:
                log.exception("a batch of %d requests failed", len(batch))
                replies = [StateError("the key daemon failed on this request (see its log)")] * len(batch)
            for p, reply in zip(batch, replies):
                p.reply = reply
                p.done.set()


class _FrameStream:
    """Reads whole frames from a trio stream (bytes buffered between receives)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            data = await self.stream.receive_some(max(65536, n - len(self.buffer)))
            if not data:
                if self.buffer:
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def read(self) -> dict[str, Any] | None:
        header = await self._exactly(HEADER.size)
        if header is None:
            return None
        payload = await self._exactly(frame_length(header))
        if payload is None:
            raise ProtocolError("connection closed in the middle of a frame")
        return decode_payload(payload)


class KeyDaemon:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.tokens = TokenThread(dispatcher)
        self.connections = 0

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
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE and the like: refuse this one, keep serving
                    log.warning("cannot accept a connection: %s", e.strerror)
                    await trio.sleep(0.05)
                    continue
                nursery.start_soon(self._connection, stream, identify)

    async def _connection(self, stream: trio.abc.Stream, identify: Callable[[Any], Any]) -> None:
        self.connections += 1
        principal: Principal | None = None
        try:
            async with stream:
                principal = await identify(stream)
                if principal is not None:
                    await self._requests(stream, principal)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError, ProtocolError):
            pass  # the client went away (or failed its handshake): its requests die with it
        except* Exception:
            log.exception("a connection of %s failed", getattr(principal, "describe", lambda: "?")())
        finally:
            self.connections -= 1

    async def _requests(self, stream: trio.abc.Stream, principal: Principal) -> None:
        frames = _FrameStream(stream)
        send_lock = trio.Lock()
        slots = trio.Semaphore(MAX_IN_FLIGHT)

        async def send(message: dict[str, Any]) -> None:
            async with send_lock:
                await stream.send_all(encode_frame(message))

        async def answer(rid: Any, op: str, args: dict[str, Any]) -> None:
            try:
                reply = await self.tokens.call(Request(principal, op, args))
                message = ({"Id": rid, "Error": error_body(reply)} if isinstance(reply, EncfsError)
                           else {"Id": rid, "Result": reply})
                try:
                    await send(message)
                except UsageError as e:  # a reply over the frame limit
                    await send({"Id": rid, "Error": error_body(e)})
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            try:
                while True:
                    await slots.acquire()
                    message = await frames.read()
                    if message is None:
                        break
                    rid, op, args = message.get("Id"), message.get("Op"), message.get("Args", {})
                    if not isinstance(op, str) or not isinstance(args, dict):
                        slots.release()
                        await send({"Id": rid, "Error": error_body(UsageError("a request needs Op and Args"))})
                        continue
                    nursery.start_soon(answer, rid, op, args)
            except ProtocolError as e:
                await send({"Id": None, "Error": error_body(UsageError(str(e)))})
                await stream.aclose()  # also ends the answers in flight: their client sent garbage


async def unix_principal(stream: trio.SocketStream) -> Principal:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return await trio.to_thread.run_sync(Principal.from_peer, uid, gid, pid)  # NSS may be slow


async def tls_principal(stream: trio.SSLStream[Any]) -> Principal | None:
    from encfs.keyd.tls import subject_of

    with trio.move_on_after(HANDSHAKE_SECONDS):
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        if der:
            return Principal.from_certificate(subject_of(der))
    return None


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


def _refuse_live_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StateError(f"{path} exists and is not a socket: remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        os.unlink(path)  # nobody answers: a daemon that died without removing it
        return
    finally:
        probe.close()
    from encfs.errors import Busy

    raise Busy(f"a key daemon already answers on {path}")


async def tcp_listeners(host: str, port: int, context: ssl.SSLContext) -> list[trio.SSLListener[Any]]:
    plain = await trio.open_tcp_listeners(port, host=host)
    return [trio.SSLListener(listener, context, https_compatible=False) for listener in plain]
