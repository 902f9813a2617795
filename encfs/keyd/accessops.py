"""The key daemon's access-control operations: key policies, grants, the audit trail, and the
usage ledger's ``forget`` (a re-key's last step). Each is decided on its key like any other.
"""

from __future__ import annotations

from typing import Any

from encfs.errors import AccessDenied, UsageError
from encfs.keyd.call import Call, Handler, int_arg, str_arg
from encfs.keys.usage import TARGET_KINDS

# -- policies and grants ----------------------------------------------------------------------


def get_key_policy(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    c.allow("kms:GetKeyPolicy", key_id)
    policy = c.access.get_policy(key_id)
    c.record("GetKeyPolicy", key_id)
    return {"Policy": policy}


def put_key_policy(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    policy = a.get("Policy")
    if not isinstance(policy, dict):
        raise UsageError("Policy must be a JSON object")
    c.allow("kms:PutKeyPolicy", key_id)
    c.access.put_policy(key_id, policy)
    c.record("PutKeyPolicy", key_id)
    return {}


def create_grant(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    ops = a.get("Operations")
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise UsageError("Operations must be a list of operation names")
    constraints = a.get("Constraints")
    if constraints is not None and not isinstance(constraints, dict):
        raise UsageError("Constraints must be an object")
    c.allow("kms:CreateGrant", key_id)
    retiring, name = a.get("RetiringPrincipal"), a.get("Name")
    out = c.access.create_grant(key_id, str_arg(a, "GranteePrincipal"), ops, constraints,
                                retiring if isinstance(retiring, str) else None,
                                name if isinstance(name, str) else None, c.principal)
    c.record("CreateGrant", key_id, grant_id=out.get("GrantId"), grantee=a.get("GranteePrincipal"), operations=ops)
    return out


def list_grants(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    c.allow("kms:ListGrants", key_id)
    found = c.access.list_grants(key_id)
    c.record("ListGrants", key_id)
    return {"Grants": found}


def retire_grant(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, grant_id = c.key(a), str_arg(a, "GrantId")
    try:
        c.access.retire_grant(c.principal, key_id, grant_id)
    except AccessDenied as e:
        c.record("RetireGrant", key_id, outcome="denied", error=e.message, grant_id=grant_id)
        raise
    c.record("RetireGrant", key_id, grant_id=grant_id)
    return {}


def revoke_grant(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, grant_id = c.key(a), str_arg(a, "GrantId")
    c.allow("kms:RevokeGrant", key_id)
    c.access.revoke_grant(key_id, grant_id)
    c.record("RevokeGrant", key_id, grant_id=grant_id)
    return {}


def read_audit(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    """A page of the audit trail (oldest first): ``StartAt`` records are skipped, at most
    ``MaxRecords`` (<= 1000) returned, so every reply stays under the frame limit."""
    c.allow("encfs:ReadAudit", None)
    start, limit = int_arg(a, "StartAt", 0), min(max(int_arg(a, "MaxRecords", 500), 1), 1000)
    c.record("ReadAudit", None, start_at=start)  # before the read: a reader sees its own request
    records: list[dict[str, Any]] = []
    for i, record in enumerate(c.ks.audit.read_all()):
        if i >= start + limit:
            return {"Records": records, "NextStartAt": start + limit}
        if i >= start:
            records.append(record)
    return {"Records": records}


def forget_usage(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    """A re-key moved every blob of a filesystem or volume (``Target``) under one key version
    (UsageLedger.forget): it needs kms:ReEncryptTo on that key, and kms:ReEncryptFrom on every key
    with a version it stops naming, that key's own older versions too (so that nobody makes
    another's version look unused, and a retire destroy it). Both are decided in the target's
    encryption context (``{"encfs:fs": ID}``), as its blobs were sealed."""
    target = str_arg(a, "Target")
    context = _target_context(target)
    keep = None
    if a.get("KeepKeyId") is not None:
        keep = (c.key(a, "KeepKeyId"), int_arg(a, "KeepKeyVersion"))
        c.allow("kms:ReEncryptTo", keep[0], context)
    for meta in c.ks.list_keys():
        if any(target in (v.get("UsedBy") or []) and (meta["KeyId"], v.get("Version")) != keep
               for v in meta.get("KeyVersions", []) if isinstance(v, dict)):
            c.allow("kms:ReEncryptFrom", meta["KeyId"], context)
    left = c.ks.usage.forget(target, keep)
    c.record("ForgetUsage", keep[0] if keep else None, key_version=keep[1] if keep else None, target=target,
             left=[[k, v] for k, v in left])
    return {"Left": [[k, v] for k, v in left]}


def _target_context(target: str) -> dict[str, str]:
    """The encryption context a target's blobs carry (usage.target_of's inverse): ``fs:ID`` ->
    ``{"encfs:fs": ID}``; an unknown kind has none (the ledger forgets nothing of it)."""
    kind, _, ident = target.partition(":")
    return {key: ident for key, k in TARGET_KINDS if k == kind and ident}


ACCESS_OPERATIONS: dict[str, Handler] = {
    "GetKeyPolicy": get_key_policy,
    "PutKeyPolicy": put_key_policy,
    "CreateGrant": create_grant,
    "ListGrants": list_grants,
    "RetireGrant": retire_grant,
    "RevokeGrant": revoke_grant,
    "ReadAudit": read_audit,
    "ForgetUsage": forget_usage,
}
