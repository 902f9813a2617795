"""Key policies: AWS KMS's JSON documents, the subset encfs reads (docs/keyd.md, "Key policies").

Invariants:
- ``parse_policy`` accepts a document only if every part of it is understood: an unknown field,
  Effect, action, condition operator or condition key is a one-line UsageError naming the
  statement and the part, never ignored (an ignored Deny or Condition would widen access).
- A parsed statement list is what ``evaluate`` reads; the stored JSON is the document as given.
- Evaluation is AWS's: any matching Deny wins; else any matching Allow allows; else no decision
  here (a grant may still allow). Context keys and values compare exactly (case-sensitive).
- Negated operators (StringNotEquals, StringNotLike) match when the context lacks the key, and
  ForAllValues matches an empty context: both as AWS, and both documented as traps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from encfs.errors import UsageError
from encfs.keyd import actions
from encfs.keyd.principal import Principal

MAX_POLICY_BYTES = 32768  # AWS's limit on a key policy document
VERSIONS = ("2012-10-17", "2008-10-17")
CONTEXT_PREFIX = "kms:EncryptionContext:"
CONTEXT_KEYS = "kms:EncryptionContextKeys"
STRING_OPERATORS = ("StringEquals", "StringLike", "StringNotEquals", "StringNotLike")
SET_OPERATORS = ("ForAllValues:StringEquals", "ForAnyValue:StringEquals",
                 "ForAllValues:StringLike", "ForAnyValue:StringLike")
_STATEMENT_FIELDS = ("Sid", "Effect", "Principal", "Action", "Resource", "Condition")
_UNSUPPORTED_FIELDS = ("NotAction", "NotPrincipal", "NotResource")
_NAME_RE = re.compile(r"(uid:[0-9]+|(user|group):[^\s:]+)")


def principal_name_error(name: object) -> str | None:
    """Why ``name`` is not a principal name (None if it is one): ``uid:N``, ``user:NAME``,
    ``group:NAME`` or a certificate subject (``CN=host1,O=example``)."""
    if not isinstance(name, str) or not name:
        return f"principal {json.dumps(name)} is not a string"
    if name.startswith(("uid:", "user:", "group:")):
        return None if _NAME_RE.fullmatch(name) else f"principal {name!r} is malformed"
    if "=" in name and name.isprintable():
        return None
    return f"principal {name!r} is not uid:N, user:NAME, group:NAME or a certificate subject (CN=...)"


def creator_name(principal: Principal) -> str:
    """The name a new key's default policy gives its creator."""
    if principal.subject is not None:
        return principal.subject
    return f"user:{principal.user}" if principal.user else f"uid:{principal.uid}"


def default_policy(owner: str, policy_id: str = "encfs-default") -> dict[str, Any]:
    """A new key's policy: its creator (``owner``, a principal name) administers it, uses it and
    keeps secrets under it."""
    who = {"Encfs": [owner]}
    return {"Version": "2012-10-17", "Id": policy_id, "Statement": [
        {"Sid": "CreatorAdministers", "Effect": "Allow", "Principal": who,
         "Action": sorted(actions.KEY_ADMIN), "Resource": "*"},
        {"Sid": "CreatorUses", "Effect": "Allow", "Principal": who,
         "Action": sorted(actions.KEY_USE), "Resource": "*"},
        {"Sid": "CreatorSecrets", "Effect": "Allow", "Principal": who,
         "Action": "secretsmanager:*", "Resource": "*"}]}


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str                  # "kms:EncryptionContext:KEY" (KEY kept as written) or CONTEXT_KEYS
    values: tuple[str, ...]

    def matches(self, context: Mapping[str, str]) -> bool:
        like = self.operator.endswith("Like")
        if self.operator.startswith("For"):
            present = [k for k in context if any(_string_match(v, k, like) for v in self.values)]
            if self.operator.startswith("ForAllValues"):
                return len(present) == len(context)
            return bool(present)
        value = context.get(self.key[len(CONTEXT_PREFIX):])
        hit = value is not None and any(_string_match(v, value, like) for v in self.values)
        return not hit if "Not" in self.operator else hit


def _string_match(pattern: str, value: str, like: bool) -> bool:
    return actions.wildcard_match(pattern, value) if like else pattern == value


@dataclass(frozen=True)
class Statement:
    sid: str | None
    effect: str
    principals: frozenset[str] | None   # None: "*", everyone
    actions: frozenset[str]
    conditions: tuple[Condition, ...]

    def label(self, index: int) -> str:
        return f"statement {self.sid!r}" if self.sid else f"statement #{index + 1}"

    def applies(self, names: frozenset[str], action: str, context: Mapping[str, str]) -> bool:
        return (action in self.actions and (self.principals is None or not self.principals.isdisjoint(names))
                and all(c.matches(context) for c in self.conditions))


@dataclass(frozen=True)
class Decision:
    allowed: bool | None      # None: the policy neither allows nor denies
    statement: str | None     # the Sid (or "#N") that decided


def evaluate(statements: tuple[Statement, ...], principal: Principal, action: str,
             context: Mapping[str, str]) -> Decision:
    names = principal.names()
    allow: str | None = None
    for i, st in enumerate(statements):
        if st.applies(names, action, context):
            if st.effect == "Deny":
                return Decision(False, st.sid or f"#{i + 1}")
            allow = allow or (st.sid or f"#{i + 1}")
    return Decision(True, allow) if allow else Decision(None, None)


def policy_size(document: object) -> int:
    return len(json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode())


def parse_policy_text(text: str) -> dict[str, Any]:
    """A policy given as JSON text (PutKeyPolicy's ``Policy``): the document, or UsageError."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise UsageError(f"key policy is {len(text.encode())} bytes; at most {MAX_POLICY_BYTES} are allowed")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"key policy is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsageError("key policy is not a JSON object")
    return doc


def parse_policy(document: object) -> tuple[Statement, ...]:
    """The statements of a key policy document; UsageError (one line) naming what is wrong."""
    if not isinstance(document, dict):
        raise UsageError("key policy is not a JSON object")
    size = policy_size(document)
    if size > MAX_POLICY_BYTES:
        raise UsageError(f"key policy is {size} bytes; at most {MAX_POLICY_BYTES} are allowed")
    for field in document:
        if field not in ("Version", "Id", "Statement"):
            raise UsageError(f"key policy has unknown field {field!r} (Version, Id, Statement)")
    version = document.get("Version", "2012-10-17")
    if version not in VERSIONS:
        raise UsageError(f"key policy Version {json.dumps(version)} is not \"2012-10-17\"")
    if "Id" in document and not isinstance(document["Id"], str):
        raise UsageError("key policy Id is not a string")
    raw = document.get("Statement")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise UsageError("key policy has no Statement list")
    statements = tuple(_parse_statement(st, i) for i, st in enumerate(raw))
    sids = [st.sid for st in statements if st.sid]
    for sid in sids:
        if sids.count(sid) > 1:
            raise UsageError(f"key policy has two statements with Sid {sid!r}")
    return statements


def _parse_statement(raw: object, index: int) -> Statement:
    where = f"key policy statement #{index + 1}"
    if not isinstance(raw, dict):
        raise UsageError(f"{where} is not a JSON object")
    sid = raw.get("Sid")
    if sid is not None:
        if not isinstance(sid, str):
            raise UsageError(f"{where}: Sid is not a string")
        where = f"key policy statement {sid!r}" if sid else where
    for field in raw:
        if field in _UNSUPPORTED_FIELDS:
            raise UsageError(f"{where}: {field} is not supported by encfs (write {field[3:]})")
        if field not in _STATEMENT_FIELDS:
            raise UsageError(f"{where}: unknown field {field!r} ({', '.join(_STATEMENT_FIELDS)})")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise UsageError(f"{where}: Effect {json.dumps(effect)} is not \"Allow\" or \"Deny\"")
    if "Resource" in raw and raw["Resource"] not in ("*", ["*"]):
        raise UsageError(f"{where}: Resource must be \"*\" (a key policy applies to its own key)")
    return Statement(sid or None, effect, _parse_principal(raw.get("Principal"), where),
                     _parse_actions(raw.get("Action"), where),
                     _parse_conditions(raw.get("Condition", {}), where))


def _strings(value: object) -> list[str] | None:
    """A string or a non-empty list of strings, as a list; None if it is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _parse_principal(raw: object, where: str) -> frozenset[str] | None:
    if raw == "*":
        return None
    if not isinstance(raw, dict) or set(raw) != {"Encfs"}:
        raise UsageError(f"{where}: Principal must be \"*\" or {{\"Encfs\": [names]}}")
    names = _strings(raw["Encfs"])
    if names is None:
        raise UsageError(f"{where}: Principal Encfs is not a name or a list of names")
    if "*" in names:
        return None
    for name in names:
        error = principal_name_error(name)
        if error:
            raise UsageError(f"{where}: {error}")
    return frozenset(names)


def _parse_actions(raw: object, where: str) -> frozenset[str]:
    patterns = _strings(raw)
    if patterns is None:
        raise UsageError(f"{where}: Action is not an action or a list of actions")
    out: set[str] = set()
    for pattern in patterns:
        named = actions.expand(pattern)
        if not named:
            if pattern.lower() in (a.lower() for a in actions.NO_KEY | actions.ROLE_ONLY):
                raise UsageError(f"{where}: {pattern} is not decided by a key policy (roles decide it)")
            raise UsageError(f"{where}: action {pattern!r} is not one encfs knows")
        out |= named
    return frozenset(out)


def _parse_conditions(raw: object, where: str) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: Condition is not a JSON object")
    out = []
    for operator, block in raw.items():
        if operator not in STRING_OPERATORS + SET_OPERATORS:
            raise UsageError(f"{where}: condition operator {operator!r} is not supported "
                             f"({', '.join(STRING_OPERATORS + SET_OPERATORS)})")
        if not isinstance(block, dict) or not block:
            raise UsageError(f"{where}: {operator} is not a non-empty JSON object")
        for key, value in block.items():
            values = _strings(value)
            if values is None:
                raise UsageError(f"{where}: {operator} {key!r} is not a string or a list of strings")
            out.append(Condition(operator, _condition_key(operator, key, where), tuple(values)))
    return tuple(out)


def _condition_key(operator: str, key: str, where: str) -> str:
    if operator in SET_OPERATORS:
        if key.lower() != CONTEXT_KEYS.lower():
            raise UsageError(f"{where}: {operator} takes {CONTEXT_KEYS}, not {key!r}")
        return CONTEXT_KEYS
    if key.lower().startswith(CONTEXT_PREFIX.lower()) and len(key) > len(CONTEXT_PREFIX):
        return CONTEXT_PREFIX + key[len(CONTEXT_PREFIX):]
    raise UsageError(f"{where}: condition key {key!r} is not one encfs knows "
                     f"({CONTEXT_PREFIX}KEY; {CONTEXT_KEYS} with ForAllValues/ForAnyValue)")
