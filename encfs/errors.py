"""Errors that reach users.

Invariant: every ``EncfsError`` message is one line that names the cause and
never contains key material, PINs or plaintext. The CLI prints ``encfs: <msg>``
and exits with ``exit_code``, one per kind of failure (EXIT_CODES, README "Exit codes"),
taken from sysexits(3) where one fits.
"""

from __future__ import annotations

# What each exit code means, for `encfs --help` and the README (the classes below carry them).
EXIT_CODES = {
    0: "success",
    1: "any other failure (fsck: fsck(8)'s codes instead)",
    2: "usage: a malformed command line or argument",
    65: "integrity failure: tampered or damaged data, blob or archive (EX_DATAERR)",
    66: "not found: key, alias, secret, key store, token or PKCS#11 module (EX_NOINPUT)",
    69: "token unreachable or failing (EX_UNAVAILABLE)",
    70: "internal error: a bug; one line naming its traceback's log, <state dir>/log/encfs-cli.log (EX_SOFTWARE)",
    74: "I/O error on a file the message names, or a volume detached whose final flush failed (EX_IOERR)",
    75: "busy: mounted, attached, in use, the mountpoint taken, or a file encfs did not install in the way (EX_TEMPFAIL)",
    77: "wrong PIN, token locked, wrong passphrase or recovery key, or denied by the key daemon (EX_NOPERM)",
    78: "key or secret state forbids it: disabled, pending deletion, wrong usage (EX_CONFIG)",
}


class IntegrityError(Exception):
    """Stored data failed authentication or cannot be parsed: tampering or damage. The FUSE
    servers answer EIO for it (and log it), never the bytes; not an EncfsError, since it is
    caught and reported where it happens, by path, block or sector."""


class EncfsError(Exception):
    """Base class for every error encfs reports to a user."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(EncfsError):
    """The caller asked for something malformed (bad argument, oversize input)."""

    exit_code = 2


class Busy(EncfsError):
    """What the command needs is in use: a mounted CIPHERDIR, an attached volume, a busy mountpoint."""

    exit_code = 75  # EX_TEMPFAIL: try again once it is free


class ConfigError(EncfsError):
    """A configuration file, URI or PIN source is missing or malformed."""


class StateError(EncfsError):
    """The state directory, or a file encfs keeps in it, cannot be used (owner, mode, damage, disk)."""


class NoKeyStore(StateError):
    """The state directory holds no embedded token: a mistyped --home or ENCFS_HOME, or a store not
    created yet. Only `encfs hsm init` creates one; exit code 66 (EX_NOINPUT) so scripts can tell."""

    exit_code = 66

    def __init__(self, home: object) -> None:
        super().__init__(f"no key store at {home} (run 'encfs hsm init' to create one)")


class WrongPassphrase(EncfsError):
    """The passphrase or recovery key does not open a key store backup."""

    exit_code = 77  # EX_NOPERM


class ArchiveDamaged(EncfsError):
    """A key store backup is not one, is truncated, or failed authentication (tampering, damage)."""

    exit_code = 65  # EX_DATAERR


class TokenError(EncfsError):
    """The PKCS#11 module or token is unavailable or misbehaves."""

    exit_code = 69  # EX_UNAVAILABLE


class ModuleNotFound(TokenError):
    """The PKCS#11 module (shared library) cannot be loaded."""

    exit_code = 66


class TokenNotFound(TokenError):
    """No token with the requested label/serial is present."""

    exit_code = 66


class PinIncorrect(TokenError):
    """C_Login rejected the PIN."""

    exit_code = 77


class PinLocked(TokenError):
    """The token refuses logins after too many wrong PINs."""

    exit_code = 77


class AccessDenied(EncfsError):
    """The key daemon's policies, grants and roles do not allow the caller this action (the message
    names the action, the principal and the reason; the denial is audited)."""

    exit_code = 77  # EX_NOPERM


class KeydUnavailable(EncfsError):
    """The key daemon named by --keyd or the config cannot be reached, or broke off a request."""

    exit_code = 69  # EX_UNAVAILABLE


class KeyNotFound(EncfsError):
    """No key with that id or alias exists (or it was deleted)."""

    exit_code = 66


class KeyStateError(EncfsError):
    """The key exists but its state forbids the operation (not Enabled, ...)."""

    exit_code = 78


class SecretNotFound(EncfsError):
    """No secret with that name exists (or it was deleted), or it has no such version or stage."""

    exit_code = 66


class SecretStateError(EncfsError):
    """The secret exists but its state forbids the operation (scheduled for deletion, ...)."""

    exit_code = 78


class InvalidCiphertext(EncfsError):
    """A ciphertext blob is truncated, malformed, tampered or under another key."""

    exit_code = 65


class ContextMismatch(InvalidCiphertext):
    """The encryption context given on decrypt differs from the one bound at encrypt."""


class KeyImportError(EncfsError):
    """Imported key material was rejected (wrong wrapping, wrong size, mismatch)."""


class MountError(EncfsError):
    """The filesystem cannot be mounted or unmounted."""


class MountpointBusy(MountError, Busy):
    """Something is already mounted on the mountpoint."""
