"""Certificates for the key daemon's TLS tests, made with cryptography into a temporary directory.

`make_pki(dir)` writes a CA, a server certificate for localhost and 127.0.0.1, and client
certificates: a valid one, one from another CA, an expired one, and one whose key is another's.
EC P-256 keys: generating them takes microseconds, RSA would take most of a test's time.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

CLIENT_SUBJECT = "CN=host1,O=example"  # the valid client's principal name, as policies list it
ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # trusted by both ends
    other_ca: Path  # a CA nobody trusts
    server: Pair  # SAN localhost, 127.0.0.1
    client: Pair  # CLIENT_SUBJECT, signed by ca
    stranger: Pair  # signed by other_ca
    expired: Pair  # signed by ca, expired yesterday
    mismatched: Pair  # client's certificate with the stranger's key
    unnamable: Pair  # signed by ca, but its subject (a newline in it) is no principal name


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _name(rfc4514: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(rfc4514)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             issuer_key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime,
             not_after: datetime.datetime) -> x509.CertificateBuilder:
    # Key identifiers: the contexts verify with VERIFY_X509_STRICT, which requires them.
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False))


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
    return path


def make_ca(path: Path, subject: str) -> _Issuer:
    key, name = _key(), _name(subject)
    now = datetime.datetime.now(datetime.UTC)
    cert = (_builder(name, name, key, key, now - ONE_DAY, now + 30 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(path, cert)
    return _Issuer(name, key)


def issue(path: Path, ca: _Issuer, subject: str, *, server: bool = False, hosts: tuple[str, ...] = (),
          expired: bool = False, key: ec.EllipticCurvePrivateKey | None = None) -> Pair:
    """A leaf certificate at ``path`` (its key beside it, ``.key``): a TLS server's, naming ``hosts``
    (DNS names or IP addresses), or a TLS client's."""
    key = key or _key()
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - 30 * ONE_DAY, now - ONE_DAY) if expired else (now - ONE_DAY, now + 30 * ONE_DAY)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(_name(subject), ca.name, key, ca.key, start, end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _write(path, b.sign(ca.key, hashes.SHA256()), key)
    return Pair(path, path.with_suffix(".key"))


def make_pki(root: Path) -> Pki:
    ca = make_ca(root / "ca.pem", "CN=encfs test CA,O=example")
    other = make_ca(root / "other-ca.pem", "CN=other CA,O=elsewhere")
    stranger_key = _key()
    client = issue(root / "client.pem", ca, CLIENT_SUBJECT)
    stranger = issue(root / "stranger.pem", other, "CN=host1,O=example", key=stranger_key)
    mismatched = Pair(client.cert, stranger.key)
    return Pki(ca=root / "ca.pem", other_ca=root / "other-ca.pem",
               server=issue(root / "server.pem", ca, "CN=keyd", server=True, hosts=("localhost", "127.0.0.1")),
               client=client, stranger=stranger,
               expired=issue(root / "expired.pem", ca, "CN=old,O=example", expired=True),
               mismatched=mismatched,
               unnamable=issue(root / "unnamable.pem", ca, "CN=bad\nname,O=example"))
