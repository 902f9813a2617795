"""The key daemon's mutual TLS (encfs/keyd/tls.py): real handshakes over localhost TCP with the
contexts the daemon and its clients use; the server thread answers with the principal it read."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from keyd_tls import CLIENT_SUBJECT, Pair, Pki, make_pki

from encfs.errors import ConfigError
from encfs.keyd.principal import Principal
from encfs.keyd.tls import client_context, peer_subject, server_context, subject_of


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Outcome:
    subject: str | None = None  # what the server read from the client's certificate
    server_error: ssl.SSLError | None = None
    reply: bytes | None = None  # what the client received
    client_error: Exception | None = None
    version: str | None = None


def exchange(server: ssl.SSLContext, client: ssl.SSLContext, host: str = "localhost") -> Outcome:
    """One connection: the server sends back the subject of the client's certificate."""
    out = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    out.subject = peer_subject(tls)
                    tls.sendall(out.subject.encode())
            except ssl.SSLError as e:
                out.server_error = e
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                  client.wrap_socket(raw, server_hostname=host) as tls):
                out.version = tls.version()
                # TLS 1.3: the server judges the client's certificate after the client's side of
                # the handshake is done, so a refusal arrives as the first read's alert.
                out.reply = tls.recv(4096)
        except (ssl.SSLError, ConnectionError) as e:
            out.client_error = e
        finally:
            thread.join(timeout=10)
    assert not thread.is_alive()
    return out


def test_valid_client_is_known_by_its_subject(pki: Pki) -> None:
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca),
                   client_context(pki.ca, pki.client.cert, pki.client.key))
    assert out.server_error is None and out.client_error is None
    assert out.subject == CLIENT_SUBJECT and out.reply == CLIENT_SUBJECT.encode()
    assert out.version == "TLSv1.3"
    assert Principal.from_certificate(out.subject).names() == {CLIENT_SUBJECT}


def test_subject_of_reads_rfc4514(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.client.cert.read_bytes())
    assert subject_of(cert.public_bytes(serialization.Encoding.DER)) == "CN=host1,O=example"


@pytest.mark.parametrize("who, verify_message", [
    ("stranger", "unable to get local issuer certificate"),  # same subject, another CA
    ("expired", "certificate has expired"),
])
def test_client_certificate_refused(pki: Pki, who: str, verify_message: str) -> None:
    pair: Pair = getattr(pki, who)
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca),
                   client_context(pki.ca, pair.cert, pair.key))
    assert out.subject is None and not out.reply
    assert isinstance(out.server_error, ssl.SSLCertVerificationError), out.server_error
    assert out.server_error.verify_message == verify_message
    assert out.client_error is not None


def test_client_without_certificate_refused(pki: Pki) -> None:
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca), client_context(pki.ca))
    assert out.subject is None and not out.reply
    assert out.server_error is not None and out.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert out.client_error is not None


def test_client_ca_only_trusts_clients_not_the_system_store(pki: Pki) -> None:
    """A server whose client CA is the other CA refuses the first CA's clients: what decides is the
    configured file, nothing else."""
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.other_ca),
                   client_context(pki.ca, pki.client.cert, pki.client.key))
    assert isinstance(out.server_error, ssl.SSLCertVerificationError) and out.subject is None


@pytest.mark.parametrize("host, ok", [("localhost", True), ("127.0.0.1", True), ("keyd.example", False)])
def test_client_checks_the_host_it_dials(pki: Pki, host: str, ok: bool) -> None:
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca),
                   client_context(pki.ca, pki.client.cert, pki.client.key), host=host)
    if ok:
        assert out.reply == CLIENT_SUBJECT.encode()
    else:
        assert isinstance(out.client_error, ssl.SSLCertVerificationError)
        assert "Hostname mismatch" in out.client_error.verify_message
        assert out.subject is None


def test_client_refuses_server_from_another_ca(pki: Pki) -> None:
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca),
                   client_context(pki.other_ca, pki.client.cert, pki.client.key))
    assert isinstance(out.client_error, ssl.SSLCertVerificationError) and out.subject is None


def test_tls_1_2_client_accepted(pki: Pki) -> None:
    client = client_context(pki.ca, pki.client.cert, pki.client.key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    out = exchange(server_context(pki.server.cert, pki.server.key, pki.ca), client)
    assert out.version == "TLSv1.2" and out.subject == CLIENT_SUBJECT


def test_contexts_refuse_compression(pki: Pki) -> None:
    ctx = server_context(pki.server.cert, pki.server.key, pki.ca)
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.cert_store_stats()["x509_ca"] == 1  # the client CA, not the system's
    cli = client_context(pki.ca)
    assert cli.options & ssl.OP_NO_COMPRESSION and cli.check_hostname


def test_bad_files_are_one_line_config_errors(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    missing = tmp_path / "missing.pem"
    cases = [
        ((missing, pki.server.key, pki.ca), f"TLS certificate {missing}: no such file"),
        ((pki.server.cert, missing, pki.ca), f"TLS key {missing}: no such file"),
        ((pki.server.cert, pki.server.key, missing), f"TLS client CA {missing}: no such file"),
        ((garbage, pki.server.key, pki.ca), f"TLS certificate {garbage}: no PEM certificate in it"),
        ((pki.server.cert, garbage, pki.ca), f"TLS key {garbage}: no PEM private key in it"),
        ((pki.server.cert, pki.server.key, garbage), f"TLS client CA {garbage}: no PEM certificate in it"),
        ((pki.server.cert, encrypted, pki.ca), f"TLS key {encrypted}: encrypted"),
        ((pki.mismatched.cert, pki.mismatched.key, pki.ca),
         f"TLS certificate {pki.mismatched.cert} and key {pki.mismatched.key} do not match"),
        ((tmp_path, pki.server.key, pki.ca), f"TLS certificate {tmp_path}: is a directory"),
    ]
    for args, start in cases:
        with pytest.raises(ConfigError) as e:
            server_context(*args)
        assert e.value.message.startswith(start), e.value.message
        assert "\n" not in e.value.message and "PRIVATE KEY" not in e.value.message
    with pytest.raises(ConfigError, match="do not match"):
        client_context(pki.ca, pki.mismatched.cert, pki.mismatched.key)
    with pytest.raises(ConfigError, match="without its certificate"):
        client_context(pki.ca, None, pki.client.key)
