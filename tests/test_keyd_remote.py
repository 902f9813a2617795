"""`encfs keyd --listen` end to end: the real CLI as a TLS client on another "host" (issue #24).

One daemon for the module, serving its Unix socket and 127.0.0.1 with tests/keyd_tls.py's PKI. Its
key's policy is put through the Unix socket by the key's creator (root here) and names the TLS
client's subject; the client then works by the flags or by ``[keyd]`` in its config.toml. Refused
clients (another CA, expired, no certificate) get one line and a non-zero exit, never a traceback
or a silent death; the audit trail names the certificate subject of allowed and denied calls.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs
from keyd_rig import client, home_with_key, keyd
from keyd_tls import CLIENT_SUBJECT, Pair, Pki, make_pki

from encfs.keyd.tls import client_context


@dataclass
class Remote:
    home: Path  # the daemon's
    sock: Path
    address: str  # 127.0.0.1:PORT
    pki: Pki
    key: str  # alias/shared: its policy lets CLIENT_SUBJECT Encrypt and Decrypt
    other_key: str  # alias/private: root's alone
    client_home: Path  # the TLS client's ENCFS_HOME (no token there)

    def tls(self, pair: Pair | None, *args: str, input: bytes = b"", home: Path | None = None,
            flags: bool = True) -> Any:
        """`encfs ARGS` as a TLS client presenting ``pair`` (None: no certificate)."""
        extra = ["--keyd", self.address, "--keyd-ca", str(self.pki.ca)] if flags else []
        if pair is not None and flags:
            extra += ["--keyd-cert", str(pair.cert), "--keyd-key", str(pair.key)]
        return run_encfs(*args, *extra, home=home or self.client_home, input=input)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    root = tmp_path_factory.mktemp("keyd-remote")
    pki = make_pki(root)
    home = root / "home"
    home_with_key(home, "local")
    sock, port = root / "keyd.sock", free_port()
    with keyd(home, sock, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(pki.server.cert),
              "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca)):
        made = [client(sock, "key", "create", "--alias", a, home=home) for a in ("shared", "private")]
        assert all(m.returncode == 0 for m in made), [m.stderr for m in made]
        policy = json.loads(client(sock, "key", "get-policy", "shared", home=home).stdout)
        policy["Statement"].append({"Sid": "Host1", "Effect": "Allow", "Principal": {"Encfs": CLIENT_SUBJECT},
                                    "Action": ["kms:Encrypt", "kms:Decrypt"]})
        put = client(sock, "key", "put-policy", "shared", home=home, input=json.dumps(policy).encode())
        assert put.returncode == 0, put.stderr
        yield Remote(home, sock, f"127.0.0.1:{port}", pki, made[0].stdout.decode().strip(),
                     made[1].stdout.decode().strip(), root / "client-home")


def records(r: Remote) -> list[dict[str, Any]]:
    out = client(r.sock, "key", "audit", "--json", home=r.home)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["Records"])


def one_line(proc: Any) -> str:
    err = proc.stderr.decode()
    assert proc.returncode > 0, (proc.returncode, err)  # an exit code, not a signal
    assert err.startswith("encfs: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_tls_client_the_policy_names_encrypts_and_decrypts(remote: Remote) -> None:
    r = remote
    blob = r.tls(r.pki.client, "key", "encrypt", "shared", "--encryption-context", "app=tls", input=b"over tls")
    assert blob.returncode == 0, blob.stderr
    opened = r.tls(r.pki.client, "key", "decrypt", "--encryption-context", "app=tls", input=blob.stdout)
    assert (opened.returncode, opened.stdout) == (0, b"over tls"), opened.stderr
    # The same blob through the Unix socket, by the key's creator: one key, two transports.
    local = client(r.sock, "key", "decrypt", "--encryption-context", "app=tls", home=r.home, input=blob.stdout)
    assert local.stdout == b"over tls", local.stderr
    mine = [x for x in records(r) if x["Principal"].get("Kind") == "tls" and x.get("KeyId") == r.key]
    assert {(x["Operation"], x["Outcome"]) for x in mine} >= {("Encrypt", "success"), ("Decrypt", "success")}
    assert all(x["Principal"] == {"Kind": "tls", "Subject": CLIENT_SUBJECT} for x in mine)


def test_what_the_policy_does_not_cover_is_denied_and_audited(remote: Remote) -> None:
    r = remote
    denied = [r.tls(r.pki.client, "key", "encrypt", "private", input=b"x"),
              r.tls(r.pki.client, "key", "disable", "shared")]
    for proc in denied:
        err = one_line(proc)
        assert proc.returncode == 77 and err.startswith(f"encfs: {CLIENT_SUBJECT} may not kms:"), err
    trail = [x for x in records(r) if x["Principal"].get("Subject") == CLIENT_SUBJECT and x["Outcome"] == "denied"]
    assert {(x["Operation"], x["KeyId"]) for x in trail} >= {("Encrypt", r.other_key), ("DisableKey", r.key)}
    assert all(x["Principal"]["Kind"] == "tls" and CLIENT_SUBJECT in x["Error"] for x in trail)


@pytest.mark.parametrize("who", ["stranger", "expired", "unnamable"])
def test_a_certificate_the_daemon_does_not_trust_is_one_line(remote: Remote, who: str) -> None:
    r = remote
    before = len(records(r))
    proc = r.tls(getattr(r.pki, who), "key", "encrypt", "shared", input=b"x")
    err = one_line(proc)
    if who == "unnamable":  # a valid certificate, but a subject no policy can name (a newline in it)
        assert proc.returncode == 77 and "its subject is no principal name" in err, err
    else:
        assert proc.returncode == 69 and r.address in err and "TLS" in err, err
    # Refused in the handshake: no principal, so no request reached the access checks.
    assert not [x for x in records(r)[before:] if x["Principal"].get("Kind") == "tls"]


def test_no_certificate_is_refused_by_the_client_and_by_the_daemon(remote: Remote) -> None:
    r = remote
    for extra in ([], ["--keyd-ca", str(r.pki.ca)]):
        proc = run_encfs("key", "encrypt", "shared", "--keyd", r.address, *extra, home=r.client_home, input=b"x")
        assert proc.returncode == 2 and "--keyd-cert" in one_line(proc)
    # A client that does not hold back: the daemon ends the handshake, and keeps serving others.
    host, port = r.address.split(":")
    with (socket.create_connection((host, int(port)), timeout=10) as raw,
          client_context(r.pki.ca).wrap_socket(raw, server_hostname=host) as tls,
          pytest.raises((ssl.SSLError, ConnectionError))):  # TLS 1.3: the alert comes with the first read
        tls.sendall(b"\0\0\0\2{}")
        tls.recv(4096)  # a bare EOF (b"") would be a refusal the client cannot tell from a crash
    assert r.tls(r.pki.client, "key", "encrypt", "shared", input=b"x").returncode == 0


def test_keyd_table_in_config_toml_works_like_the_flags(remote: Remote, tmp_path: Path) -> None:
    r = remote
    home = tmp_path / "configured"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[keyd]\naddress = "{r.address}"\nca = "{r.pki.ca}"\ncert = "{r.pki.client.cert}"\n'
        f'key = "{r.pki.client.key}"\n')
    blob = r.tls(None, "key", "encrypt", "shared", input=b"configured", home=home, flags=False)
    assert blob.returncode == 0, blob.stderr
    opened = r.tls(None, "key", "decrypt", input=blob.stdout, home=home, flags=False)
    assert opened.stdout == b"configured", opened.stderr
    assert one_line(r.tls(None, "key", "encrypt", "private", input=b"x", home=home, flags=False)).startswith(
        f"encfs: {CLIENT_SUBJECT} may not kms:Encrypt")
    # A flag overrides its setting: the stranger's certificate through the same table is refused.
    stranger = run_encfs("key", "encrypt", "shared", "--keyd-cert", str(r.pki.stranger.cert), "--keyd-key",
                         str(r.pki.stranger.key), home=home, input=b"x")
    assert stranger.returncode == 69 and "TLS" in one_line(stranger)
