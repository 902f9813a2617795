"""Which PKCS#11 token to use and how to log in to it: PinSource (where the user PIN comes from)
and TokenSpec (the module, the token and the PIN source). Plain values: nothing here calls a
PKCS#11 module (token.py does).
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field

from encfs.errors import ConfigError
from encfs.keys.tokenguard import TokenFileCopies


@dataclass(frozen=True)
class PinSource:
    """Where a PIN comes from: a literal, a file, an environment variable, a prompt, or the
    embedded token's passphrase-sealed PIN file (encfs.keys.pinseal)."""

    kind: str  # "value" | "file" | "env" | "prompt" | "sealed"
    where: str = ""
    passphrase_file: str | None = None  # "sealed": where the passphrase comes from (None: prompt)

    @classmethod
    def parse(cls, spec: str) -> PinSource:
        """Parse ``file:PATH``, ``env:VAR`` or ``prompt``."""
        kind, _, where = spec.partition(":")
        if kind in ("file", "env") and where:
            return cls(kind, where)
        if spec == "prompt":
            return cls("prompt")
        raise ConfigError(f"PIN source must be file:PATH, env:VAR or prompt, got {spec!r}")

    def describe(self) -> str:
        return {"value": "a literal PIN", "prompt": "a prompt"}.get(self.kind, f"{self.kind}:{self.where}")

    def resolve(self, token_label: str) -> str:
        if self.kind == "value":
            return self.where
        if self.kind == "sealed":
            from pathlib import Path

            from encfs.keys import pinseal

            path = Path(self.where)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read sealed PIN file {path}: {e.strerror}") from None
            passphrase = pinseal.read_passphrase(self.passphrase_file, f"passphrase for token {token_label!r}")
            return pinseal.unseal(data, passphrase, path)["user"]
        if self.kind == "file":
            try:
                with open(self.where, encoding="utf-8") as f:
                    pin = f.read().strip("\r\n")
            except OSError as e:
                raise ConfigError(f"cannot read PIN file {self.where}: {e.strerror}") from None
            if not pin:
                raise ConfigError(f"PIN file {self.where} is empty")
            return pin
        if self.kind == "env":
            env_pin = os.environ.get(self.where)
            if not env_pin:
                raise ConfigError(f"PIN environment variable {self.where} is not set")
            return env_pin
        if not sys.stdin.isatty():
            raise ConfigError(
                f"no PIN for token {token_label!r}: give --pin-file, --pin-env or a pin-source"
            )
        return getpass.getpass(f"PIN for token {token_label!r}: ")


@dataclass(frozen=True)
class TokenSpec:
    """Which module and token to use, and how to log in."""

    module: str
    label: str | None
    pin: PinSource
    serial: str | None = None
    slot_id: int | None = None
    # The embedded token's copies of its files (tokenguard.py): checked under the store's exclusive
    # lock before the module reads the store, brought up to date after each call that wrote it.
    store_copies: TokenFileCopies | None = field(default=None, compare=False)

    def describe(self) -> str:
        for name, value in (("token", self.label), ("serial", self.serial), ("slot", self.slot_id)):
            if value is not None:
                return f"{name} {value!r}"
        return "the only token"
