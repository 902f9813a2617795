"""Mutual TLS for `encfs keyd --listen HOST:PORT`: the daemon's and the client's ssl contexts, and the
principal name a verified client certificate stands for.

Invariants:
- The server asks every client for a certificate and refuses the handshake without one that chains
  to the configured client CA; no other CA (not the system store) is trusted on either side.
- The client checks the server certificate against its CA *and* the host it dials: the server
  certificate's subjectAltName must name that host (DNS name or IP address), as for HTTPS.
- TLS 1.2 at least (1.3 is negotiated whenever both ends have it), forward-secret AEAD ciphers only
  for 1.2, no compression, no renegotiation.
- A client's principal is the verified certificate's subject as RFC 4514 (``CN=host1,O=example``),
  never anything the client sends in a request.
- A file that cannot serve (missing, unreadable, malformed, an encrypted key, a key that is not the
  certificate's) is one ConfigError naming the file and the cause; nothing prompts for a passphrase
  (a daemon has no terminal) and no error carries the file's contents.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from encfs.errors import ConfigError

# TLS 1.2 suites with ECDHE (forward secrecy) and an AEAD; TLS 1.3's suites are all of that kind.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class _PeerCertificate(Protocol):
    """ssl.SSLSocket, ssl.SSLObject and trio.SSLStream (which forwards getpeercert) all fit."""

    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...


def server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The daemon's context: its certificate and key, and the one CA whose clients it accepts."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_identity(ctx, cert, key)
    _load_trust(ctx, client_ca, "client CA")
    ctx.verify_mode = ssl.CERT_REQUIRED
    # A resumed session skips certificate verification: a client certificate that expired (or whose
    # CA was replaced) after the ticket was issued would still get in. The daemon's connections are
    # long-lived, so a full handshake per connection costs little.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client's context: the CA that signs the daemon's certificate, and the client's own
    certificate and key (``key`` None: the key is in the certificate's file). The caller passes
    the host it dials as ``server_hostname``; the server certificate must name it."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    _load_trust(ctx, ca, "CA")
    ctx.check_hostname = True  # PROTOCOL_TLS_CLIENT's default: stated, since the invariant rests on it
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        _load_identity(ctx, cert, key or cert)
    elif key is not None:
        raise ConfigError(f"TLS key {key} given without its certificate")
    return ctx


def subject_of(der: bytes) -> str:
    """The principal name of a (verified) certificate: its subject as RFC 4514."""
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def peer_subject(conn: _PeerCertificate) -> str:
    """The verified peer certificate's subject on a server connection after its handshake. The
    server context requires a certificate, so a missing one here is a bug, not a client's fault."""
    der = conn.getpeercert(True)
    if der is None:
        raise RuntimeError("TLS connection without a verified peer certificate")
    return subject_of(der)


def _base_context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # RFC 5280 checks OpenSSL otherwise skips (Python 3.13's default): a CA without the CA basic
    # constraint, or a certificate without the key identifiers, cannot pass.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"TLS {what} {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"TLS {what} {path}: permission denied (the daemon's user must read it)") from None
    except IsADirectoryError:
        raise ConfigError(f"TLS {what} {path}: is a directory, not a PEM file") from None
    except OSError as e:
        raise ConfigError(f"TLS {what} {path}: {e.strerror or e}") from None


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"TLS {what} {path}: no PEM certificate in it")
    return certs


def _check_private_key(path: Path) -> None:
    """Parsed here first so that a malformed or encrypted key is a clear error, not OpenSSL's
    generic PEM failure or a passphrase prompt on the daemon's (absent) terminal."""
    data = _read(path, "key")
    try:
        load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"TLS key {path}: encrypted; give the key unencrypted, readable by the daemon's user only") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"TLS key {path}: no PEM private key in it (or an unsupported kind)") from None


def _load_identity(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    _certificates(cert, "certificate")
    _check_private_key(key)

    def no_passphrase() -> str:  # _check_private_key makes this unreachable; never prompt regardless
        raise ConfigError(f"TLS key {key}: encrypted")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS certificate {cert} and key {key} do not match") from None
        raise ConfigError(f"TLS certificate {cert} or key {key}: {e.reason or 'rejected by OpenSSL'}") from None


def _load_trust(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    _certificates(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise ConfigError(f"TLS {what} {ca}: {e.reason or 'rejected by OpenSSL'}") from None
