"""Access control of `encfs keyd`: roles, key policies and grants decide each request.

The dispatcher calls ``check`` before every operation and the grant/policy methods for the
operations that change them (docs/dev/keyd.md, "Access control"; docs/keyd.md for users).

Invariants:
- Order of decision: roles first (no role: nothing; auditor: the audit only; aliases under
  alias/encfs/: officers only, or root and the daemon's user without roles; crypto officer: key
  administration on any key with no policy consulted, never a data operation or a secret value),
  then, for a crypto user, the key policy (an explicit Deny wins over everything), then grants.
- A denial is one AccessDenied line naming the principal, the action, the key (and secret) and the
  reason; it never holds context values, key material or secret values.
- A key without a stored policy (created before the daemon, or by a local command) has the
  implicit policy that gives the daemon's own uid what a creator gets: the PIN holder could use
  every key before the daemon existed; crypto officers put a real policy on it.
- Every change is on disk (AclStore) before the method returns and is seen by the next check.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from encfs.errors import AccessDenied, KeyNotFound, StateError, UsageError
from encfs.keyd import actions, grants
from encfs.keyd.aclstore import GRANTS, POLICIES, AclStore
from encfs.keyd.policy import Statement, creator_name, default_policy, evaluate, parse_policy, principal_name_error
from encfs.keyd.principal import Principal
from encfs.keyd.roles import AUDITOR, OFFICER, USER, Roles
from encfs.keys.audit import iso_time

SECRET_CONTEXT = "encfs:secret"
NO_GRANT_ALLOWS = "no policy statement or grant allows it"


class AccessControl:
    def __init__(self, state_dir: Path, roles: Roles, clock: Callable[[], float] = time.time,
                 owner_uid: int | None = None) -> None:
        """``owner_uid``: the daemon's own uid (default: this process's), named by the implicit
        policy of keys without one and, with no roles configured, allowed to read the audit."""
        self.store = AclStore(state_dir)
        self.roles = roles
        self.clock = clock
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self._implicit: tuple[Statement, ...] | None = None
        self._grant_lock = threading.Lock()

    # -- decisions -----------------------------------------------------------------------------

    def check(self, principal: Principal, action: str, key_id: str | None,
              context: Mapping[str, str] | None = None) -> None:
        """Return if ``principal`` may do ``action`` on ``key_id`` (None for the actions that name
        no key) in ``context``; else raise AccessDenied. ValueError for an unknown action."""
        action = actions.canonical(action)
        ctx = dict(context or {})
        reason, grants_may_allow = self._decide(principal, action, key_id, ctx)
        if reason is None:
            return
        if grants_may_allow and key_id is not None:
            names = principal.names()
            if any(grants.allows(g, names, action, ctx) for g in self._grants(key_id)):
                return
        raise AccessDenied(self._denial(principal, action, key_id, ctx, reason))

    def roles_of(self, principal: Principal) -> frozenset[str]:
        return self.roles.of(principal)

    def _decide(self, principal: Principal, action: str, key_id: str | None,
                ctx: Mapping[str, str]) -> tuple[str | None, bool]:
        """Roles and the key policy: (None, _) allowed; (reason, True) not allowed by them but a
        grant may still allow it; (reason, False) denied whatever the grants say."""
        roles = self.roles.of(principal)
        if not roles:
            return "it has no role in the key daemon's configuration (keyd.toml [roles])", False
        if action == actions.READ_AUDIT:
            return self._audit_reader(principal, roles), False
        if OFFICER in roles:
            if action in actions.DATA_ACTIONS:
                return f"role {OFFICER} has no data operations", False
            return None, False
        if USER not in roles:
            return f"role {AUDITOR} only reads the audit trail", False
        if action == actions.RESERVED_ALIAS:
            return self._reserved_alias_holder(principal), False
        if action in actions.NO_KEY:
            return None, False
        if key_id is None:
            raise ValueError(f"{action} is checked on a key")
        decision = evaluate(self._statements(key_id), principal, action, ctx)
        if decision.allowed is False:
            return f"denied by statement {decision.statement!r} of its key policy", False
        if decision.allowed:
            return None, False
        return NO_GRANT_ALLOWS, action in actions.KEY_ADMIN | actions.KEY_USE

    def _audit_reader(self, principal: Principal, roles: frozenset[str]) -> str | None:
        if self.roles.configured:
            return None if roles & {AUDITOR, OFFICER} else f"only an {AUDITOR} or a {OFFICER} reads the audit trail"
        if self._root_or_owner(principal):
            return None
        return "with no roles configured only root and the daemon's own user read the audit trail"

    def _reserved_alias_holder(self, principal: Principal) -> str | None:
        """Officers were decided before (every action but data ones is theirs): anyone else."""
        if self.roles.configured:
            return f"only a {OFFICER} names a key by an alias under alias/encfs/"
        if self._root_or_owner(principal):
            return None
        return "with no roles configured only root and the daemon's own user name keys under alias/encfs/"

    def _root_or_owner(self, principal: Principal) -> bool:
        """A local caller that is root or the daemon's own user (no TLS subject)."""
        return principal.subject is None and principal.uid in (0, self.owner_uid)

    @staticmethod
    def _denial(principal: Principal, action: str, key_id: str | None, ctx: Mapping[str, str],
                reason: str) -> str:
        what = ""
        if key_id is not None:
            secret = ctx.get(SECRET_CONTEXT) if action.startswith("secretsmanager:") else None
            what = f" secret {secret!r} (key {key_id})" if secret is not None else f" key {key_id}"
        return f"{principal.describe()} may not {action}{what}: {reason}"

    # -- key policies --------------------------------------------------------------------------

    def on_key_created(self, key_id: str, creator: Principal) -> None:
        """Write a new key's default policy: its creator administers and uses it."""
        self.store.write(POLICIES, key_id, default_policy(creator_name(creator)))

    def forget_key(self, key_id: str) -> None:
        """The key is gone: drop its policy and its grants."""
        self.store.remove(GRANTS, key_id)
        self.store.remove(POLICIES, key_id)

    def get_policy(self, key_id: str) -> dict[str, Any]:
        stored = self.store.read(POLICIES, key_id, _parse_stored_policy)
        if stored is None:
            return self._implicit_policy()
        return stored[0]

    def put_policy(self, key_id: str, document: dict[str, Any]) -> None:
        """Replace the key's policy; UsageError (one line) if the document is malformed."""
        parse_policy(document)
        self.store.write(POLICIES, key_id, document)

    def _statements(self, key_id: str) -> tuple[Statement, ...]:
        stored = self.store.read(POLICIES, key_id, _parse_stored_policy)
        if stored is not None:
            return stored[1]
        if self._implicit is None:  # constant: parsed once, not per check
            self._implicit = parse_policy(self._implicit_policy())
        return self._implicit

    def _implicit_policy(self) -> dict[str, Any]:
        return default_policy(f"uid:{self.owner_uid}", "encfs-implicit")

    # -- grants --------------------------------------------------------------------------------

    def create_grant(self, key_id: str, grantee: str, operations: list[str],
                     constraints: dict[str, dict[str, str]] | None, retiring_principal: str | None,
                     name: str | None, creator: Principal) -> dict[str, Any]:
        """AWS CreateGrant: {"GrantId", "GrantToken"}. A creator allowed CreateGrant only by a grant
        passes on no more than that grant holds (AccessDenied otherwise)."""
        grantee = grants.check_principal(grantee, "grantee")
        ops = grants.parse_operations(operations)
        constraint = grants.parse_constraints(constraints)
        if retiring_principal is not None:
            retiring_principal = grants.check_principal(retiring_principal, "retiring principal")
        if name is not None:
            name = grants.check_name(name)
        with self._grant_lock:
            current = self._grants(key_id)
            self._check_grant_creator(creator, key_id, ops, constraint, current)
            record: dict[str, Any] = {
                "KeyId": key_id, "Name": name, "GranteePrincipal": grantee,
                "RetiringPrincipal": retiring_principal, "IssuingPrincipal": creator_name(creator),
                "Operations": ops, "Constraints": {constraint[0]: constraint[1]} if constraint else None}
            record = grants.entry(record)
            same = [g for g in current if name is not None and _same_grant(g, record)]
            if same:  # AWS: the same request with the same Name returns the same grant
                return {"GrantId": same[0]["GrantId"], "GrantToken": secrets.token_urlsafe(32)}
            if len(current) >= grants.MAX_GRANTS_PER_KEY:
                raise UsageError(f"key {key_id} has {len(current)} grants, the most encfs keeps: "
                                        "retire or revoke some first")
            record = {"GrantId": secrets.token_hex(32), **record, "CreationDate": iso_time(self.clock())}
            self.store.write(GRANTS, key_id, {"Grants": current + [record]})
        return {"GrantId": record["GrantId"], "GrantToken": secrets.token_urlsafe(32)}

    def _check_grant_creator(self, creator: Principal, key_id: str, ops: list[str],
                             constraint: grants.Constraint, current: list[dict[str, Any]]) -> None:
        action = "kms:CreateGrant"
        reason, grants_may_allow = self._decide(creator, action, key_id, {})
        if reason is None:
            return
        if grants_may_allow:
            names = creator.names()
            held = [g for g in current if grants.allows(g, names, action, {})]
            if any(grants.narrows(ops, constraint, g) for g in held):
                return
            if held:
                reason = "its grants pass on fewer operations or a narrower encryption context"
        raise AccessDenied(self._denial(creator, action, key_id, {}, reason))

    def list_grants(self, key_id: str) -> list[dict[str, Any]]:
        return [grants.entry(g) for g in self._grants(key_id)]

    def retire_grant(self, principal: Principal, key_id: str, grant_id: str) -> None:
        """AWS RetireGrant: by the grant's retiring principal, or by its grantee if the grant holds
        RetireGrant; anyone else (or a principal with no role) gets AccessDenied."""
        with self._grant_lock:
            current = self._grants(key_id)
            grant = _find(current, key_id, grant_id)
            names = principal.names()
            roles = self.roles.of(principal)
            allowed = bool(roles - {AUDITOR}) and (
                grant.get("RetiringPrincipal") in names
                or (grant["GranteePrincipal"] in names and "RetireGrant" in grant["Operations"]))
            if not allowed:
                raise AccessDenied(f"{principal.describe()} may not kms:RetireGrant grant {grant_id} of key {key_id}: "
                                   "only its retiring principal, or its grantee if the grant holds RetireGrant, "
                                   "retires it")
            self._drop(key_id, current, grant_id)

    def revoke_grant(self, key_id: str, grant_id: str) -> None:
        """AWS RevokeGrant (the caller's kms:RevokeGrant on the key is check()'s)."""
        with self._grant_lock:
            current = self._grants(key_id)
            _find(current, key_id, grant_id)
            self._drop(key_id, current, grant_id)

    def _drop(self, key_id: str, current: list[dict[str, Any]], grant_id: str) -> None:
        rest = [g for g in current if g["GrantId"] != grant_id]
        if rest:
            self.store.write(GRANTS, key_id, {"Grants": rest})
        else:
            self.store.remove(GRANTS, key_id)

    def _grants(self, key_id: str) -> list[dict[str, Any]]:
        return list(self.store.read(GRANTS, key_id, _parse_stored_grants) or [])


def _find(current: list[dict[str, Any]], key_id: str, grant_id: str) -> dict[str, Any]:
    for g in current:
        if g["GrantId"] == grant_id:
            return g
    raise KeyNotFound(f"key {key_id} has no grant {str(grant_id)[:80]}")


def _same_grant(stored: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return {k: v for k, v in stored.items() if k not in ("GrantId", "CreationDate")} == dict(new)


def _parse_stored_policy(document: Any, path: Path) -> tuple[dict[str, Any], tuple[Statement, ...]]:
    return document, parse_policy(document)


def _parse_stored_grants(document: Any, path: Path) -> list[dict[str, Any]]:
    """The stored grants; StateError if their shape is not what create_grant writes."""
    items = document.get("Grants") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise StateError(f"{path} is damaged: no Grants list")
    for g in items:
        ok = (isinstance(g, dict) and isinstance(g.get("GrantId"), str)
              and principal_name_error(g.get("GranteePrincipal")) is None
              and isinstance(g.get("Operations"), list) and set(g["Operations"]) <= actions.GRANT_OPERATIONS)
        try:
            ok = ok and grants.parse_constraints(g.get("Constraints")) == grants.constraint_of(g)
        except UsageError:
            ok = False
        if not ok:
            raise StateError(f"{path} is damaged: a grant is malformed")
    return items
