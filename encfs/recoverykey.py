"""Recovery key files: 32 random bytes, written as 64 hex digits and a newline (mode 0600).

One format for every recovery key encfs takes or makes: a key-store backup's
(``encfs hsm backup --recovery-key``) and a filesystem's or volume's.

Invariants:
- A recovery key is read only from a file named on the command line, never from argv's text,
  the environment or a log line; messages name the file, never its contents.
- A new recovery key file is created with O_EXCL and mode 0600 and fsync'd before use: an
  existing file is never replaced (it may be the only copy of an older key).
"""

from __future__ import annotations

import logging
import os
import secrets

from encfs.errors import ConfigError, UsageError

RECOVERY_KEY_BYTES = 32

log = logging.getLogger("encfs")


def read_recovery_key(path: str) -> bytes:
    """A recovery key file: exactly 64 hex digits (and a newline), as new_recovery_key writes, or
    32 raw bytes that are not all printable ASCII (32 hex characters are half a key typed in, not
    a key). One warning line if the file is readable by group or others."""
    try:
        with open(path, "rb") as f:
            data = f.read(1024)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise ConfigError(f"cannot read recovery key file {path}: {e.strerror}") from None
    key = b""
    if len(data) == RECOVERY_KEY_BYTES and not all(0x20 <= c < 0x7F or c in b"\t\r\n" for c in data):
        key = data
    else:
        text = data.strip()
        if len(text) == 2 * RECOVERY_KEY_BYTES and all(c in b"0123456789abcdefABCDEF" for c in text):
            key = bytes.fromhex(text.decode("ascii"))
    if len(key) != RECOVERY_KEY_BYTES:
        raise ConfigError(f"recovery key file {path} holds no recovery key (64 hex digits or 32 bytes)")
    if mode & 0o044:
        log.warning("recovery key file %s is readable by %s: `chmod 600 %s`", path,
                    "group and others" if mode & 0o044 == 0o044 else "its group" if mode & 0o040 else "others", path)
    return key


def new_recovery_key(path: str, option: str = "--new-recovery-key") -> bytes:
    """A fresh random recovery key, written to the new file ``path`` (``option`` names the flag
    that asked for it, for the refusal when the file exists)."""
    key = secrets.token_bytes(RECOVERY_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: {option} never replaces a file") from None
    except OSError as e:
        raise ConfigError(f"cannot create recovery key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key
