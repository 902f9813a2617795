"""Grants: AWS CreateGrant's model, the parts encfs keeps (docs/keyd.md, "Grants").

Invariants:
- A grant names one grantee principal, a non-empty subset of GRANT_OPERATIONS and at most one
  constraint (EncryptionContextEquals or EncryptionContextSubset); anything else is a one-line
  UsageError at creation, never stored.
- A constraint applies to the operations that carry an encryption context (the use operations);
  DescribeKey, RetireGrant and CreateGrant ignore it, as in AWS. A grant created under a grant
  (not a policy) must be at least as narrow as one grant its creator holds (``narrows``).
- The stored entry is ListGrants' entry; the grant token is returned once and not kept (one
  daemon makes a grant effective at once, so a token proves nothing more).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from encfs.errors import UsageError
from encfs.keyd import actions
from encfs.keyd.policy import principal_name_error

EQUALS, SUBSET = "EncryptionContextEquals", "EncryptionContextSubset"
MAX_GRANTS_PER_KEY = 1000  # one file per key, read on a change: keep it small (AWS: 50,000)
_NAME_RE = re.compile(r"[a-zA-Z0-9:/_-]{1,256}")
_OPERATION_NAMES = {op.lower(): op for op in actions.GRANT_OPERATIONS}

Constraint = tuple[str, dict[str, str]] | None


def operation_of(action: str) -> str | None:
    """The grant operation that allows ``action`` (``kms:Decrypt`` -> ``Decrypt``), if any."""
    op = action.removeprefix("kms:")
    return op if op in actions.GRANT_OPERATIONS else None


def parse_operations(operations: object) -> list[str]:
    if not isinstance(operations, list) or not operations:
        raise UsageError("a grant needs a non-empty list of operations")
    out: set[str] = set()
    for op in operations:
        name = _OPERATION_NAMES.get(str(op).lower().removeprefix("kms:"))
        if name is None:
            raise UsageError(f"grant operation {op!r} is not one of {', '.join(sorted(actions.GRANT_OPERATIONS))}")
        out.add(name)
    return sorted(out)


def parse_constraints(constraints: object) -> Constraint:
    if constraints is None or constraints == {}:
        return None
    if not isinstance(constraints, dict) or len(constraints) != 1 or next(iter(constraints)) not in (EQUALS, SUBSET):
        raise UsageError(f"grant constraints must be one of {EQUALS} or {SUBSET}")
    kind, pairs = next(iter(constraints.items()))
    if (not isinstance(pairs, dict) or not pairs
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())):
        raise UsageError(f"grant constraint {kind} is not a non-empty map of strings to strings")
    return kind, dict(pairs)


def check_principal(name: object, what: str) -> str:
    error = principal_name_error(name)
    if error:
        raise UsageError(f"grant {what}: {error}")
    assert isinstance(name, str)
    return name


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError("grant name must be 1 to 256 characters of a-z, A-Z, 0-9, ':', '/', '_', '-'")
    return name


def constraint_of(grant: Mapping[str, Any]) -> Constraint:
    c = grant.get("Constraints")
    if not c:
        return None
    kind, pairs = next(iter(c.items()))
    return str(kind), dict(pairs)


def constraint_allows(constraint: Constraint, context: Mapping[str, str]) -> bool:
    if constraint is None:
        return True
    kind, pairs = constraint
    if kind == EQUALS:
        return dict(context) == pairs
    return all(context.get(k) == v for k, v in pairs.items())


def allows(grant: Mapping[str, Any], names: frozenset[str], action: str, context: Mapping[str, str]) -> bool:
    """Whether ``grant`` lets a principal with ``names`` do ``action`` in ``context``."""
    op = operation_of(action)
    if op is None or op not in grant["Operations"] or grant["GranteePrincipal"] not in names:
        return False
    return op not in actions.GRANT_CONTEXT_OPERATIONS or constraint_allows(constraint_of(grant), context)


def narrows(child_ops: list[str], child: Constraint, parent: Mapping[str, Any]) -> bool:
    """Whether a grant of ``child_ops`` under ``child`` is within what ``parent`` (a grant that
    holds CreateGrant) may pass on: its operations, and a constraint at least as strict."""
    if not set(child_ops) <= set(parent["Operations"]):
        return False
    outer = constraint_of(parent)
    if outer is None:
        return True
    if child is None:
        return False
    kind, pairs = outer
    if kind == EQUALS:
        return child == outer
    return all(child[1].get(k) == v for k, v in pairs.items())


def entry(grant: Mapping[str, Any]) -> dict[str, Any]:
    """ListGrants' entry for a stored grant (absent fields left out, as AWS does)."""
    return {k: v for k, v in grant.items() if v is not None}
