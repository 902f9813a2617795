"""RemoteKeyService: the KeyService API, answered by `encfs keyd` (the same methods, the same errors).

Invariants:
- A method is one request; the daemon's error reply is raised as the same ``encfs.errors`` class
  with the same message and exit code (protocol.raise_error), so a command behaves alike with a
  daemon and with a local token.
- The client holds no PIN and opens no token. A data-key cache stays here (a mount's cache), but a
  hit is still asked of the daemon (CachedKeyUsable: the key Enabled, the caller's kms:Decrypt
  allowed) so that a disabled key, a revoked grant or a narrowed policy stops the next use.
- One connection, one request at a time (a lock): a mount's threads share it. A connection the
  daemon closed while it was idle (a restart) is reopened before the next request; a request cut
  off in flight is KeydUnavailable, never retried (it may have acted). A forked child drops its copy
  of the parent's connection and opens its own, with a fresh lock (a parent's thread may have held
  it at the fork).
- A daemon that goes away or refuses the TLS client is an error (KeydUnavailable, one line), never
  SIGPIPE: OpenSSL writes with write(2), so SIGPIPE is blocked in the writing thread around it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from encfs.errors import KeydUnavailable, UsageError
from encfs.keyd.protocol import (
    HEADER,
    ProtocolError,
    b64,
    decode_payload,
    encode_frame,
    frame_length,
    raise_error,
    unb64,
)
from encfs.keys.cache import DataKeyCache
from encfs.keys.config import KeydOptions
from encfs.keys.context import EncryptionContext, encode_context
from encfs.keys.metadata import ORIGIN_TOKEN
from encfs.keys.service import DataKey, Decrypted, ImportParameters

TIMEOUT_SECONDS = 60.0


@contextmanager
def _no_sigpipe() -> Iterator[None]:
    """Writes in the block fail with EPIPE rather than raise SIGPIPE (which kills the CLI: its
    SIGPIPE is SIG_DFL, for `encfs ... | head`). SSLSocket.sendall takes no MSG_NOSIGNAL, and a
    TLS 1.3 daemon that refused our certificate has closed the connection by our first write.
    SIGPIPE from a write is sent to the writing thread: blocked there, it stays pending, and is
    taken off before the mask is restored. Where SIGPIPE is ignored already (the daemons), there
    is nothing to do: an ignored signal is discarded, never pending."""
    if signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN:
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        yield
    finally:
        if signal.SIGPIPE not in blocked:
            if signal.SIGPIPE in signal.sigpending():
                signal.sigtimedwait({signal.SIGPIPE}, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def tls_failure(spec: str, e: ssl.SSLError) -> KeydUnavailable:
    """One line for a failed TLS exchange; an alert from the daemon is its refusal of this client
    (another CA, expired, no certificate), named as OpenSSL names the alert."""
    reason = e.reason or str(e)
    if "ALERT" in reason:
        alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
        return KeydUnavailable(f"TLS with the key daemon at {spec} failed: it refused this client ({alert})")
    return KeydUnavailable(f"TLS with the key daemon at {spec} failed: {reason}")


class KeydAddress:
    """Where a daemon answers: a Unix socket path, or HOST:PORT with TLS."""

    def __init__(self, spec: str, tls: ssl.SSLContext | None = None) -> None:
        self.spec = spec
        self.tls = tls
        host, sep, port = spec.rpartition(":")
        self.tcp = bool(sep) and port.isdigit() and "/" not in spec
        self.host, self.port = (host.strip("[]"), int(port)) if self.tcp else ("", 0)

    def connect(self) -> socket.socket:
        try:
            if not self.tcp:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(TIMEOUT_SECONDS)
                sock.connect(self.spec)
                return sock
            if self.tls is None:
                raise UsageError(f"--keyd {self.spec} is TCP: it needs --keyd-ca, --keyd-cert and --keyd-key (mutual TLS)")
            raw = socket.create_connection((self.host, self.port), timeout=TIMEOUT_SECONDS)
            try:
                with _no_sigpipe():
                    return self.tls.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        except ssl.SSLError as e:
            raise tls_failure(self.spec, e) from None
        except OSError as e:
            raise KeydUnavailable(f"cannot reach the key daemon at {self.spec}: {e.strerror or e}") from None


class KeydConnection:
    """Framed requests over one socket, one at a time."""

    def __init__(self, address: KeydAddress) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._readable: select.poll | None = None  # polls self._sock for input (_closed_by_daemon)
        self._lock = threading.Lock()
        self._next_id = 0
        _CONNECTIONS.add(self)

    def _after_fork_in_child(self) -> None:
        """A parent's thread may have held the lock at the fork (mid-request): the child has no
        such thread, so it would wait forever. Its connection is the parent's: the child closes its
        own descriptor of it (the parent's stays open) and connects anew at its first request."""
        self._lock = threading.Lock()
        self.close_locked()

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._sock is not None and self._closed_by_daemon():
                self.close_locked()  # it was restarted while this connection was idle: nothing was sent
            if self._sock is None:
                self._connect_locked()
            assert self._sock is not None
            self._next_id += 1
            rid = self._next_id
            try:
                frame = encode_frame({"Id": rid, "Op": op, "Args": args})
                if isinstance(self._sock, ssl.SSLSocket):
                    with _no_sigpipe():  # OpenSSL may write while reading too (an alert, a key update)
                        self._sock.sendall(frame)
                        reply = self._read()
                else:
                    self._sock.sendall(frame, socket.MSG_NOSIGNAL)  # EPIPE, never SIGPIPE, if the daemon went away
                    reply = self._read()
            except ssl.SSLError as e:
                self.close_locked()
                raise tls_failure(self.address.spec, e) from None
            except (OSError, ProtocolError) as e:
                self.close_locked()
                why = "it closed the connection" if isinstance(e, ProtocolError) else (e.strerror or str(e))
                raise KeydUnavailable(f"the key daemon at {self.address.spec} did not answer {op}: {why}") from None
        if reply.get("Id") is None and "Error" in reply:  # about the connection, not a request: it is closed
            self.close()
            raise_error(reply["Error"])
        if reply.get("Id") != rid:
            self.close()
            raise KeydUnavailable(f"the key daemon at {self.address.spec} answered another request")
        if "Error" in reply:
            raise_error(reply["Error"])
        result = reply.get("Result")
        if not isinstance(result, dict):
            raise KeydUnavailable(f"the key daemon at {self.address.spec} sent a malformed reply to {op}")
        return result

    def _connect_locked(self) -> None:
        sock = self.address.connect()
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        self._sock, self._readable = sock, readable

    def _closed_by_daemon(self) -> bool:
        """Whether the daemon ended this idle connection (a restart, a stop): its EOF is waiting.
        Asked before each request, so that a mount's first request after a daemon restart goes to
        the new daemon instead of failing; a request already sent is never retried. One
        non-blocking peek at the socket itself (below TLS): nothing waiting is the usual case."""
        sock = self._sock
        assert sock is not None and self._readable is not None
        if not self._readable.poll(0):
            return False
        sock.settimeout(0)  # with a timeout, Python would wait for data before each recv below
        try:
            if not socket.socket.recv(sock, 1, socket.MSG_PEEK):
                return True  # EOF
            if not isinstance(sock, ssl.SSLSocket):
                return True  # bytes no request asked for
            sock.recv(1)  # TLS: a session ticket is harmless, a close_notify or an alert is not
            return True
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True  # ECONNRESET and the like
        finally:
            sock.settimeout(TIMEOUT_SECONDS)

    def _exactly(self, n: int) -> bytes:
        assert self._sock is not None
        chunks, got = [], 0
        while got < n:
            data = self._sock.recv(n - got)
            if not data:
                raise ProtocolError("closed")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def _read(self) -> dict[str, Any]:
        """One reply: usually one recv (a reply is small), more only for a long one."""
        assert self._sock is not None
        first = self._sock.recv(65536)
        while len(first) < HEADER.size:
            more = self._sock.recv(65536)
            if not more:
                raise ProtocolError("closed")
            first += more
        n = frame_length(first[:HEADER.size])
        body = first[HEADER.size:]
        if len(body) > n:  # one request in flight per connection: nothing may follow its reply
            raise ProtocolError("the key daemon sent more than one reply")
        return decode_payload(body + self._exactly(n - len(body)) if len(body) < n else body)

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._readable = None, None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


_CONNECTIONS: weakref.WeakSet[KeydConnection] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for conn in list(_CONNECTIONS):
        conn._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_after_fork)


def connect(options: KeydOptions, home: Path | None = None) -> RemoteKeyService:
    """A client of the daemon ``options`` names (nothing is sent until the first call)."""
    tls = None
    if options.ca or options.cert or options.key:
        from encfs.keyd.tls import client_context

        if not (options.ca and options.cert and options.key):
            raise UsageError("a TLS key daemon needs all of --keyd-ca, --keyd-cert and --keyd-key")
        tls = client_context(Path(options.ca), Path(options.cert), Path(options.key))
    return RemoteKeyService(KeydAddress(options.address, tls), home)


def _data_key(r: dict[str, Any]) -> DataKey:
    plaintext = r.get("Plaintext")
    return DataKey(r["KeyId"], r["KeyVersion"], None if plaintext is None else unb64(plaintext, "Plaintext"),
                   unb64(r["CiphertextBlob"], "CiphertextBlob"))


class RemoteUsage:
    def __init__(self, service: RemoteKeyService) -> None:
        self.service = service

    def forget(self, target: str, keep: tuple[str, int] | None) -> list[tuple[str, int]]:
        r = self.service.call("ForgetUsage", Target=target, KeepKeyId=keep[0] if keep else None,
                              KeepKeyVersion=keep[1] if keep else None)
        return [(str(k), int(v)) for k, v in r["Left"]]


class RemoteKeyService:
    """The KeyService methods the CLI, mounts and volumes call, answered by a key daemon."""

    embedded = False  # the token is the daemon's, never this process's
    remote = True

    def __init__(self, address: KeydAddress, home: Path | None = None) -> None:
        self.conn = KeydConnection(address)
        self.home = home
        self.address = address

    @property
    def usage(self) -> RemoteUsage:
        """KeyService.usage's ``forget``, asked of the daemon (a re-key's last step)."""
        return RemoteUsage(self)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        return self.conn.call(op, args)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- key management --------------------------------------------------------------------

    def create_key(self, description: str = "", alias: str | None = None, origin: str = ORIGIN_TOKEN) -> dict[str, Any]:
        return self.call("CreateKey", Description=description, Alias=alias, Origin=origin)

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self.call("ListKeys")["Keys"])

    def list_aliases(self) -> dict[str, str]:
        return dict(self.call("ListAliases")["Aliases"])

    def describe_key(self, key: str) -> dict[str, Any]:
        return self.call("DescribeKey", KeyId=key)

    def token_status(self) -> dict[str, Any]:
        return self.call("DescribeToken")

    def update_alias(self, alias: str, key: str) -> str:
        return str(self.call("UpdateAlias", AliasName=alias, TargetKeyId=key)["AliasName"])

    def delete_alias(self, alias: str) -> None:
        self.call("DeleteAlias", AliasName=alias)

    def enable_key(self, key: str) -> dict[str, Any]:
        return self.call("EnableKey", KeyId=key)

    def disable_key(self, key: str) -> dict[str, Any]:
        return self.call("DisableKey", KeyId=key)

    def schedule_key_deletion(self, key: str, days: int = 30) -> dict[str, Any]:
        return self.call("ScheduleKeyDeletion", KeyId=key, PendingWindowInDays=days)

    def cancel_key_deletion(self, key: str) -> dict[str, Any]:
        return self.call("CancelKeyDeletion", KeyId=key)

    def rotate_key(self, key: str) -> dict[str, Any]:
        return self.call("RotateKeyOnDemand", KeyId=key)

    def retire_key_version(self, key: str, number: int) -> dict[str, Any]:
        return self.call("RetireKeyVersion", KeyId=key, KeyVersion=number)

    def enable_key_rotation(self, key: str, period_days: int = 365) -> dict[str, Any]:
        return self.call("EnableKeyRotation", KeyId=key, RotationPeriodInDays=period_days)

    def disable_key_rotation(self, key: str) -> dict[str, Any]:
        return self.call("DisableKeyRotation", KeyId=key)

    def get_parameters_for_import(self, key: str, wrapping_algorithm: str = "RSAES_OAEP_SHA_1") -> ImportParameters:
        r = self.call("GetParametersForImport", KeyId=key, WrappingAlgorithm=wrapping_algorithm)
        return ImportParameters(r["KeyId"], r["WrappingAlgorithm"], unb64(r["PublicKey"], "PublicKey"), r["ImportToken"],
                                float(r["ParametersValidTo"]))

    def import_key_material(self, key: str, wrapped: bytes, import_token: str,
                            valid_to: float | None = None) -> dict[str, Any]:
        return self.call("ImportKeyMaterial", KeyId=key, EncryptedKeyMaterial=b64(wrapped), ImportToken=import_token,
                         ValidTo=valid_to)

    def delete_imported_key_material(self, key: str) -> dict[str, Any]:
        return self.call("DeleteImportedKeyMaterial", KeyId=key)

    # -- policies and grants (the daemon's alone) ------------------------------------------

    def get_key_policy(self, key: str) -> dict[str, Any]:
        return dict(self.call("GetKeyPolicy", KeyId=key)["Policy"])

    def put_key_policy(self, key: str, policy: dict[str, Any]) -> None:
        self.call("PutKeyPolicy", KeyId=key, Policy=policy)

    def create_grant(self, key: str, grantee: str, operations: list[str],
                     constraints: dict[str, dict[str, str]] | None = None, retiring_principal: str | None = None,
                     name: str | None = None) -> dict[str, Any]:
        return self.call("CreateGrant", KeyId=key, GranteePrincipal=grantee, Operations=operations,
                         Constraints=constraints, RetiringPrincipal=retiring_principal, Name=name)

    def list_grants(self, key: str) -> list[dict[str, Any]]:
        return list(self.call("ListGrants", KeyId=key)["Grants"])

    def retire_grant(self, key: str, grant_id: str) -> None:
        self.call("RetireGrant", KeyId=key, GrantId=grant_id)

    def revoke_grant(self, key: str, grant_id: str) -> None:
        self.call("RevokeGrant", KeyId=key, GrantId=grant_id)

    def read_audit(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        start: int | None = 0
        while start is not None:
            page = self.call("ReadAudit", StartAt=start, MaxRecords=1000)
            records.extend(page["Records"])
            start = page.get("NextStartAt")
        return records

    # -- cryptographic operations ----------------------------------------------------------

    def generate_data_key(self, key: str, context: EncryptionContext | None = None, number_of_bytes: int = 32,
                          with_plaintext: bool = True, cache: DataKeyCache | None = None,
                          encfs_internal: bool = False) -> DataKey:
        context = dict(context or {})
        dk = _data_key(self.call("GenerateDataKey", KeyId=key, EncryptionContext=context,
                                 NumberOfBytes=number_of_bytes, WithPlaintext=with_plaintext,
                                 EncfsInternal=encfs_internal))
        if cache is not None and dk.plaintext is not None:
            cache.put(dk.ciphertext_blob, encode_context(context), dk.plaintext, dk.key_id, dk.key_version)
        return dk

    def generate_data_keys(self, key: str, contexts: Sequence[EncryptionContext], number_of_bytes: int = 32,
                           cache: DataKeyCache | None = None, encfs_internal: bool = False) -> list[DataKey]:
        plain = [dict(c) for c in contexts]
        r = self.call("GenerateDataKeys", KeyId=key, EncryptionContexts=plain, NumberOfBytes=number_of_bytes,
                      EncfsInternal=encfs_internal)
        return self._cached([_data_key(x) for x in r["DataKeys"]], plain, cache)

    def encrypt_many(self, key: str, plaintexts: Sequence[bytes], contexts: Sequence[EncryptionContext],
                     cache: DataKeyCache | None = None, encfs_internal: bool = False) -> list[DataKey]:
        plain = [dict(c) for c in contexts]
        r = self.call("EncryptMany", KeyId=key, Plaintexts=[b64(p) for p in plaintexts], EncryptionContexts=plain,
                      EncfsInternal=encfs_internal)
        return self._cached([_data_key(x) for x in r["DataKeys"]], plain, cache)

    @staticmethod
    def _cached(keys: list[DataKey], contexts: list[dict[str, str]], cache: DataKeyCache | None) -> list[DataKey]:
        if cache is not None:
            for dk, c in zip(keys, contexts):
                if dk.plaintext is not None:
                    cache.put(dk.ciphertext_blob, encode_context(c), dk.plaintext, dk.key_id, dk.key_version)
        return keys

    def key_usable(self, key_id: str, context: EncryptionContext) -> bool:
        # As a cache hit asks: Decrypt's permission in the context, and the key Enabled.
        return bool(self.call("CachedKeyUsable", KeyId=key_id, EncryptionContext=dict(context))["Usable"])

    def data_key_usable(self, key_id: str, key_version: int) -> bool:
        return bool(self.call("DataKeyUsable", KeyId=key_id, KeyVersion=key_version)["Usable"])

    def encrypt(self, key: str, plaintext: bytes, context: EncryptionContext | None = None,
                encfs_internal: bool = False) -> bytes:
        return unb64(self.call("Encrypt", KeyId=key, Plaintext=b64(plaintext), EncryptionContext=dict(context or {}),
                               EncfsInternal=encfs_internal)["CiphertextBlob"], "CiphertextBlob")

    def decrypt(self, blob: bytes, context: EncryptionContext | None = None, key: str | None = None,
                cache: DataKeyCache | None = None) -> Decrypted:
        context = dict(context or {})
        encoded = encode_context(context)
        if cache is not None:
            hit = cache.get_usable(blob, encoded, lambda key_id: bool(self.call(
                "CachedKeyUsable", KeyId=key_id, EncryptionContext=context, ExpectedKeyId=key)["Usable"]))
            if hit is not None:
                return Decrypted(hit[1], hit[2], hit[0])
        r = self.call("Decrypt", CiphertextBlob=b64(blob), EncryptionContext=context, KeyId=key)
        done = Decrypted(r["KeyId"], r["KeyVersion"], unb64(r["Plaintext"], "Plaintext"))
        if cache is not None:
            cache.put(blob, encoded, done.plaintext, done.key_id, done.key_version)
        return done

    def re_encrypt(self, blob: bytes, context: EncryptionContext | None, dest_key: str,
                   dest_context: EncryptionContext | None = None, encfs_internal: bool = False) -> bytes:
        args: dict[str, Any] = {"CiphertextBlob": b64(blob), "SourceEncryptionContext": dict(context or {}),
                                "DestinationKeyId": dest_key, "EncfsInternal": encfs_internal}
        if dest_context is not None:
            args["DestinationEncryptionContext"] = dict(dest_context)
        return unb64(self.conn.call("ReEncrypt", args)["CiphertextBlob"], "CiphertextBlob")
