"""The actions the key daemon checks, by class, and AWS-style wildcards over them.

Invariants:
- Every action the daemon checks is in ALL_ACTIONS; anything else is a bug of the caller
  (``ValueError``) or, in a policy, a malformed document.
- Classes are disjoint: KEY_ADMIN, KEY_USE, NO_KEY (roles alone decide them), SECRET_VALUE and
  SECRET_META (checked on the secret's CMK policy), and READ_AUDIT and RESERVED_ALIAS (roles alone).
- DATA_ACTIONS (the use actions and the secret values) are what a crypto officer never gets.
- Names compare case-insensitively, as AWS compares actions; a wildcard is ``*`` (any run of
  characters) and ``?`` (one character), nothing else (no character classes).
"""

from __future__ import annotations

import re
from functools import lru_cache

KEY_ADMIN = frozenset({
    "kms:DescribeKey", "kms:EnableKey", "kms:DisableKey", "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion", "kms:RotateKeyOnDemand", "kms:EnableKeyRotation", "kms:DisableKeyRotation",
    "kms:GetKeyPolicy", "kms:PutKeyPolicy", "kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant",
    "kms:UpdateAlias", "kms:DeleteAlias", "kms:GetParametersForImport", "kms:ImportKeyMaterial",
    "kms:DeleteImportedKeyMaterial", "kms:RetireKeyVersion",
})
KEY_USE = frozenset({
    "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:Encrypt", "kms:Decrypt",
    "kms:ReEncryptFrom", "kms:ReEncryptTo",
})
NO_KEY = frozenset({"kms:CreateKey", "kms:ListKeys", "kms:ListAliases", "kms:DescribeToken",
                    "secretsmanager:ListSecrets"})
# Reading or writing a secret's value is a data operation (it needs the CMK's data keys).
SECRET_VALUE = frozenset({"secretsmanager:CreateSecret", "secretsmanager:GetSecretValue",
                          "secretsmanager:PutSecretValue", "secretsmanager:RotateSecret"})
SECRET_META = frozenset({"secretsmanager:DescribeSecret", "secretsmanager:DeleteSecret",
                         "secretsmanager:RestoreSecret"})
READ_AUDIT = "encfs:ReadAudit"
# Naming a key by an alias under alias/encfs/ (encfs's own names, as alias/aws/ is AWS's: the
# secrets' default key alias/encfs/secrets): whoever holds such an alias receives what others seal
# to it, so it is not first come, first served.
RESERVED_ALIAS = "encfs:ReservedAlias"
RESERVED_ALIAS_PREFIX = "alias/encfs/"

DATA_ACTIONS = KEY_USE | SECRET_VALUE
# What a key policy statement can allow or deny: the rest is decided by roles alone.
KEY_SCOPED = KEY_ADMIN | KEY_USE | SECRET_VALUE | SECRET_META
ROLE_ONLY = frozenset({READ_AUDIT, RESERVED_ALIAS})  # decided by roles, never by a policy
ALL_ACTIONS = KEY_SCOPED | NO_KEY | ROLE_ONLY

_CANONICAL = {a.lower(): a for a in ALL_ACTIONS}

# CreateGrant's Operations: AWS names without the service prefix.
GRANT_OPERATIONS = frozenset({a.removeprefix("kms:") for a in KEY_USE}
                             | {"CreateGrant", "RetireGrant", "DescribeKey"})
# Grant operations whose requests carry an encryption context: constraints apply to these only.
GRANT_CONTEXT_OPERATIONS = frozenset(a.removeprefix("kms:") for a in KEY_USE)


def canonical(action: str) -> str:
    """The action's canonical spelling; ValueError if encfs does not know it."""
    try:
        return _CANONICAL[action.lower()]
    except KeyError:
        raise ValueError(f"unknown action {action!r}") from None


@lru_cache(maxsize=1024)
def wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """``*`` and ``?`` as AWS reads them in Action and StringLike; every other character literal."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def wildcard_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    if "*" not in pattern and "?" not in pattern:
        return pattern.lower() == value.lower() if ignore_case else pattern == value
    return wildcard_regex(pattern, ignore_case).fullmatch(value) is not None


@lru_cache(maxsize=1024)  # every policy parse expands the same few patterns (a parse per check was 0.5 ms)
def expand(pattern: str, within: frozenset[str] = KEY_SCOPED) -> frozenset[str]:
    """The actions of ``within`` that an Action entry (a name or a wildcard) names."""
    return frozenset(a for a in within if wildcard_match(pattern, a, ignore_case=True))
