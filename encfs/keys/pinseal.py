"""The embedded token's PINs sealed under a passphrase (``$ENCFS_HOME/softhsm/pins.sealed``).

By default the embedded SoftHSM2 token's user PIN and SO PIN sit beside the token in files of
mode 0600: any copy of the state directory opens every CMK (the SO PIN can also set a new user
PIN). ``encfs hsm protect-pin`` replaces both files with one file sealed under a key derived
from a passphrase, as gocryptfs and cryptsetup protect their master keys (docs/FORMAT.md
section 3, "The embedded token's PINs"):

    key    = scrypt(passphrase (UTF-8), salt (16 random bytes), N = 2^17, r = 8, p = 1, 32 bytes)
    sealed = AES-256-GCM(key, nonce (12 random bytes), JSON {"so": SO PIN, "user": user PIN},
                         AAD = b"encfs pins v1")

scrypt with N = 2^17, r = 8 uses 128 MiB and took 0.35 s on the 2-core development VM (0.17 s
at N = 2^16, gocryptfs's default; 0.68 s at 2^18); the parameters are stored, so they can grow.

Invariants:
- The passphrase comes from a terminal (getpass, which reads /dev/tty) or a file named with
  ``--passphrase-file`` (``/dev/fd/N`` for a descriptor); never from argv or the environment.
- A wrong passphrase changes nothing: files are replaced only after the old ones were opened.
- Converting writes the new file (fsync, rename, fsync of the directory) before removing the
  old ones; after an interruption the sealed file wins and the next conversion removes the
  leftover plain files.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from encfs.errors import ConfigError, PinIncorrect, StateError, UsageError

FORMAT = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
_MAX_MEMORY = 4 << 30  # scrypt needs 128 r N p bytes: a file asking for more is damaged, not stronger
_AAD = b"encfs pins v1"
MIN_PASSPHRASE = 8


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8", "surrogateescape"))


def seal(pins: dict[str, str], passphrase: str, n: int = SCRYPT_N) -> bytes:
    """The sealed-PINs file for ``pins`` ({"so": ..., "user": ...})."""
    salt, nonce = os.urandom(16), os.urandom(12)
    key = _kdf(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(pins, sort_keys=True).encode(), _AAD)

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    doc = {"format": FORMAT, "kdf": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
           "salt": b64(salt), "nonce": b64(nonce), "sealed": b64(sealed)}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def unseal(data: bytes, passphrase: str, where: Path) -> dict[str, str]:
    """The PINs in a sealed-PINs file; PinIncorrect for a wrong passphrase, StateError if damaged."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT or doc.get("kdf") != "scrypt":
            raise ValueError
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if n < 2 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * n * p > _MAX_MEMORY:
            raise ValueError
        salt, nonce, sealed = (base64.b64decode(doc[k], validate=True) for k in ("salt", "nonce", "sealed"))
        if len(nonce) != 12:
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StateError(f"sealed PIN file {where} is damaged") from None
    try:
        plain = AESGCM(_kdf(passphrase, salt, n, r, p)).decrypt(nonce, sealed, _AAD)
    except InvalidTag:
        raise PinIncorrect(f"wrong passphrase for the token PINs in {where}") from None
    pins = json.loads(plain)
    return {"so": str(pins["so"]), "user": str(pins["user"])}


def read_passphrase(passphrase_file: str | None, what: str, confirm: bool = False) -> str:
    """A passphrase from ``passphrase_file`` (first line) or, on a terminal, a prompt (twice if
    ``confirm``: a new passphrase mistyped would lock the token away)."""
    if passphrase_file:
        try:
            with open(passphrase_file, "rb") as f:
                text = f.read(64 * 1024).decode("utf-8", "surrogateescape")
        except OSError as e:
            raise ConfigError(f"cannot read passphrase file {passphrase_file}: {e.strerror}") from None
        passphrase = text.split("\n", 1)[0].removesuffix("\r")
        if not passphrase:
            raise ConfigError(f"passphrase file {passphrase_file} is empty")
    else:
        if not sys.stdin.isatty():
            raise ConfigError(f"{what}: no terminal to ask for the passphrase; give --passphrase-file FILE")
        passphrase = getpass.getpass(f"{what}: ")
        if confirm and getpass.getpass("again: ") != passphrase:
            raise UsageError("the two passphrases differ; nothing changed")
    if confirm and len(passphrase) < MIN_PASSPHRASE:
        raise UsageError(f"passphrase is shorter than {MIN_PASSPHRASE} characters; nothing changed")
    return passphrase
