"""Roles modelled on CloudHSM's, from the ``[roles]`` table of the daemon's keyd.toml.

    [roles]
    officers = ["user:alice"]                     # crypto officers: keys and policies, no data
    users = ["group:storage", "CN=host1,O=ex"]    # crypto users: what policies and grants allow
    auditors = ["user:carol"]                     # read the audit trail, nothing else

Invariants:
- A principal's roles are those of any of its names (uid:N, user:NAME, group:NAME, subject).
- With no principal listed in any role (no file, no table, or empty lists) every principal is a
  crypto user: key policies and grants alone decide, as AWS KMS without IAM would.
- A malformed table is a one-line ConfigError naming the file: never "no roles" by accident.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from encfs.errors import ConfigError
from encfs.keyd.policy import principal_name_error
from encfs.keyd.principal import Principal

OFFICER, USER, AUDITOR = "crypto-officer", "crypto-user", "auditor"
_TABLE_KEYS = {"officers": OFFICER, "users": USER, "auditors": AUDITOR}


@dataclass(frozen=True)
class Roles:
    officers: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    auditors: frozenset[str] = frozenset()

    @property
    def configured(self) -> bool:
        return bool(self.officers or self.users or self.auditors)

    @classmethod
    def load(cls, path: Path) -> Roles:
        """The ``[roles]`` table of the TOML file ``path``; a missing file configures no roles."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        return cls.from_table(data.get("roles"), str(path))

    @classmethod
    def from_table(cls, table: object, source: str = "keyd.toml") -> Roles:
        """Roles from an already parsed ``[roles]`` table (None: no roles)."""
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: roles is not a table")
        lists: dict[str, frozenset[str]] = {}
        for key, value in table.items():
            if key not in _TABLE_KEYS:
                raise ConfigError(f"{source}: unknown role list {key!r} (officers, users, auditors)")
            if not isinstance(value, list):
                raise ConfigError(f"{source}: roles.{key} is not a list of principal names")
            for name in value:
                error = principal_name_error(name)
                if error:
                    raise ConfigError(f"{source}: roles.{key}: {error}")
            lists[key] = frozenset(value)
        return cls(**lists)

    def of(self, principal: Principal) -> frozenset[str]:
        """The principal's roles (empty: it may do nothing)."""
        if not self.configured:
            return frozenset({USER})
        names = principal.names()
        return frozenset(role for role, members in ((OFFICER, self.officers), (USER, self.users),
                                                    (AUDITOR, self.auditors))
                         if not members.isdisjoint(names))
