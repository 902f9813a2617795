"""One key-daemon request being decided and run (Call), and the argument decoders its operations share.

Invariants:
- ``Call.allow`` is the one way an operation asks AccessControl: a denial is audited there (one
  record, ``outcome: denied``, the reason) and raised as AccessDenied.
- Arguments are checked for type here, in one line each (UsageError), before any key is touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from encfs.errors import AccessDenied, UsageError
from encfs.keyd.principal import Principal
from encfs.keyd.protocol import b64
from encfs.keys.blob import key_id_of
from encfs.keys.service import DataKey, KeyService

Handler = Callable[["Call", dict[str, Any]], dict[str, Any]]


class Access(Protocol):
    """What dispatch needs of access control (encfs.keyd.acl.AccessControl)."""

    def check(self, principal: Principal, action: str, key_id: str | None,
              context: Mapping[str, str] | None = None) -> None: ...

    def on_key_created(self, key_id: str, creator: Principal) -> None: ...

    def forget_key(self, key_id: str) -> None: ...

    def get_policy(self, key_id: str) -> dict[str, Any]: ...

    def put_policy(self, key_id: str, document: dict[str, Any]) -> None: ...

    def create_grant(self, key_id: str, grantee: str, operations: list[str],
                     constraints: dict[str, dict[str, str]] | None, retiring_principal: str | None,
                     name: str | None, creator: Principal) -> dict[str, Any]: ...

    def list_grants(self, key_id: str) -> list[dict[str, Any]]: ...

    def retire_grant(self, principal: Principal, key_id: str, grant_id: str) -> None: ...

    def revoke_grant(self, key_id: str, grant_id: str) -> None: ...


@dataclass
class Call:
    """One request being decided and run: who asks, and what the daemon holds."""

    principal: Principal
    ks: KeyService
    access: Access
    secrets: Any  # encfs.keyd.secretstore.SecretStore, or None before it is configured

    def allow(self, action: str, key_id: str | None, context: Mapping[str, str] | None = None) -> None:
        try:
            self.access.check(self.principal, action, key_id, context)
        except AccessDenied as e:
            self.record(action.split(":", 1)[1], key_id, outcome="denied", context=context, error=e.message)
            raise

    def record(self, operation: str, key_id: str | None, **extra: Any) -> None:
        """One audit record naming this request's principal: a denial, or an allowed request the
        key service does not audit itself (it reads or changes only the daemon's state)."""
        self.ks.audit.record(operation, key_id=key_id, principal=self.principal.audit_fields(), now=time.time(),
                             **extra)

    def key(self, args: dict[str, Any], name: str = "KeyId") -> str:
        ref = args.get(name)
        if not isinstance(ref, str) or not ref:
            raise UsageError(f"{name} is needed: a key id, alias/NAME or NAME")
        return self.ks.resolve_key_id(ref)


def context_arg(args: dict[str, Any], name: str = "EncryptionContext") -> dict[str, str]:
    value = args.get(name) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UsageError(f"{name} must be an object of strings")
    return value


def int_arg(args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name} must be an integer")
    return value


def bool_arg(args: dict[str, Any], name: str, default: bool = False) -> bool:
    """A JSON true or false (absent or null: ``default``); never a truthy string such as "false"."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false")
    return value


def str_arg(args: dict[str, Any], name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string")
    return value


def blob_key_id(blob: bytes) -> str:
    return key_id_of(blob)


def data_key_json(dk: DataKey) -> dict[str, Any]:
    out: dict[str, Any] = {"KeyId": dk.key_id, "KeyVersion": dk.key_version, "CiphertextBlob": b64(dk.ciphertext_blob)}
    if dk.plaintext is not None:
        out["Plaintext"] = b64(dk.plaintext)
    return out


def contexts_arg(a: dict[str, Any]) -> list[dict[str, str]]:
    raw = a.get("EncryptionContexts")
    if not isinstance(raw, list) or not raw or len(raw) > 4096:
        raise UsageError("EncryptionContexts must be a list of 1 to 4096 contexts")
    return [context_arg({"c": x}, "c") for x in raw]
