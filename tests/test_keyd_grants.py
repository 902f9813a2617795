"""Grants of `encfs keyd` (encfs/keyd/acl.py, grants.py): AWS CreateGrant, ListGrants, RetireGrant,
RevokeGrant semantics, constraints, and their persistence. Kernel-free and token-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import AccessDenied, KeyNotFound, StateError, UsageError
from encfs.keyd.acl import AccessControl
from encfs.keyd.principal import Principal
from tests.test_keyd_acl import (
    ALICE,
    BOB,
    CAROL,
    CTX,
    DAVE,
    ERIN,
    HOST1,
    NOBODY,
    OWNER_UID,
    ROLES,
    allowed,
    denial,
    new_key,
    policy,
    statement,
)


@pytest.fixture
def acl(tmp_path: Path) -> AccessControl:
    return AccessControl(tmp_path / "state", ROLES, owner_uid=OWNER_UID)


@pytest.fixture
def key(acl: AccessControl) -> str:
    k = new_key()
    acl.on_key_created(k, BOB)
    return k


def grant(acl: AccessControl, key: str, grantee: str, ops: list[str], constraints: Any = None,
          retiring: str | None = None, name: str | None = None, creator: Principal = BOB) -> str:
    out = acl.create_grant(key, grantee, ops, constraints, retiring, name, creator)
    assert set(out) == {"GrantId", "GrantToken"} and len(out["GrantId"]) == 64
    return str(out["GrantId"])


def test_grant_takes_effect_at_once_and_only_for_its_operations(acl: AccessControl, key: str) -> None:
    assert not allowed(acl, HOST1, "kms:Decrypt", key, CTX)
    grant(acl, key, "CN=host1,O=ex", ["Decrypt", "kms:GenerateDataKey"])
    assert allowed(acl, HOST1, "kms:Decrypt", key, CTX) and allowed(acl, HOST1, "kms:GenerateDataKey", key, {})
    assert denial(acl, HOST1, "kms:Encrypt", key, CTX).endswith("no policy statement or grant allows it")
    assert not allowed(acl, HOST1, "kms:DescribeKey", key)
    assert not allowed(acl, ERIN, "kms:Decrypt", key, CTX)  # the grantee only
    assert not allowed(acl, HOST1, "kms:Decrypt", new_key(), CTX)  # this key only


def test_grant_to_a_group(acl: AccessControl, key: str) -> None:
    grant(acl, key, "group:storage", ["DescribeKey"])
    assert allowed(acl, ERIN, "kms:DescribeKey", key)
    assert not allowed(acl, HOST1, "kms:DescribeKey", key)


def test_grant_never_lifts_an_explicit_deny_or_a_role(acl: AccessControl, key: str) -> None:
    grant(acl, key, "user:erin", ["Decrypt"])
    grant(acl, key, "user:alice", ["Decrypt"])
    grant(acl, key, "user:carol", ["Decrypt"])
    grant(acl, key, "user:dave", ["Decrypt"])
    acl.put_policy(key, policy(statement("NoErin", "Deny", {"Encfs": "user:erin"}, "kms:Decrypt")))
    assert "denied by statement 'NoErin'" in denial(acl, ERIN, "kms:Decrypt", key, CTX)
    assert "crypto-officer has no data operations" in denial(acl, ALICE, "kms:Decrypt", key, CTX)
    assert "auditor only reads" in denial(acl, CAROL, "kms:Decrypt", key, CTX)
    assert "no role" in denial(acl, DAVE, "kms:Decrypt", key, CTX)


def test_grants_do_not_reach_secret_values(acl: AccessControl, key: str) -> None:
    grant(acl, key, "user:erin", ["Decrypt", "GenerateDataKey"])
    assert not allowed(acl, ERIN, "secretsmanager:GetSecretValue", key, {"encfs:secret": "db"})


@pytest.mark.parametrize("constraints, yes, no", [
    ({"EncryptionContextEquals": {"encfs:fs": "a1"}}, [{"encfs:fs": "a1"}],
     [{"encfs:fs": "a1", "x": "y"}, {"encfs:fs": "a2"}, {}]),
    ({"EncryptionContextSubset": {"encfs:fs": "a1"}}, [{"encfs:fs": "a1"}, {"encfs:fs": "a1", "x": "y"}],
     [{"encfs:fs": "a2"}, {"x": "y"}, {}]),
])
def test_grant_constraints(acl: AccessControl, key: str, constraints: dict[str, Any],
                           yes: list[dict[str, str]], no: list[dict[str, str]]) -> None:
    grant(acl, key, "user:erin", ["Decrypt", "DescribeKey"], constraints)
    for ctx in yes:
        assert allowed(acl, ERIN, "kms:Decrypt", key, ctx), ctx
    for ctx in no:
        assert not allowed(acl, ERIN, "kms:Decrypt", key, ctx), ctx
    assert allowed(acl, ERIN, "kms:DescribeKey", key)  # no context: the constraint does not apply


@pytest.mark.parametrize("kwargs, message", [
    ({"ops": []}, "non-empty list of operations"),
    ({"ops": ["Decrypt", "PutKeyPolicy"]}, "grant operation 'PutKeyPolicy' is not one of"),
    ({"grantee": "erin"}, "grant grantee: principal 'erin' is not uid:N"),
    ({"retiring": "uid:"}, "grant retiring principal: principal 'uid:' is malformed"),
    ({"constraints": {"EncryptionContextEquals": {"a": "1"}, "EncryptionContextSubset": {"a": "1"}}},
     "must be one of EncryptionContextEquals or EncryptionContextSubset"),
    ({"constraints": {"EncryptionContextSubset": {"a": 1}}}, "not a non-empty map of strings"),
    ({"constraints": {"Other": {"a": "1"}}}, "must be one of"),
    ({"name": "bad name!"}, "grant name must be 1 to 256 characters"),
])
def test_malformed_grant_is_a_usage_error(acl: AccessControl, key: str, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"grantee": "user:erin", "ops": ["Decrypt"], "constraints": None, "retiring": None,
                            "name": None} | kwargs
    with pytest.raises(UsageError, match=message):
        acl.create_grant(key, args["grantee"], args["ops"], args["constraints"], args["retiring"], args["name"], BOB)
    assert acl.list_grants(key) == []


def test_list_grants_entries(acl: AccessControl, key: str, clock: Any) -> None:
    acl.clock = clock
    gid = grant(acl, key, "user:erin", ["Decrypt", "RetireGrant", "decrypt"], {"EncryptionContextSubset": CTX},
                "CN=host1,O=ex", "fs-a1")
    (entry,) = acl.list_grants(key)
    assert entry == {"GrantId": gid, "KeyId": key, "Name": "fs-a1", "GranteePrincipal": "user:erin",
                     "RetiringPrincipal": "CN=host1,O=ex", "IssuingPrincipal": "user:bob",
                     "Operations": ["Decrypt", "RetireGrant"], "Constraints": {"EncryptionContextSubset": CTX},
                     "CreationDate": entry["CreationDate"]}
    assert entry["CreationDate"].endswith("Z")
    assert grant(acl, key, "user:erin", ["RetireGrant", "Decrypt"], {"EncryptionContextSubset": CTX},
                 "CN=host1,O=ex", "fs-a1") == gid  # same Name, same grant: AWS's idempotence
    assert grant(acl, key, "user:erin", ["Decrypt"], None, None, "fs-a1") != gid
    assert len(acl.list_grants(key)) == 2


def test_retire_by_grantee_needs_retire_grant(acl: AccessControl, key: str) -> None:
    plain = grant(acl, key, "user:erin", ["Decrypt"])
    retirable = grant(acl, key, "group:storage", ["Encrypt", "RetireGrant"])
    with pytest.raises(AccessDenied, match=f"uid 2005 \\(erin\\) may not kms:RetireGrant grant {plain} of key"):
        acl.retire_grant(ERIN, key, plain)
    with pytest.raises(AccessDenied):
        acl.retire_grant(HOST1, key, retirable)  # neither grantee nor retiring principal
    acl.retire_grant(ERIN, key, retirable)
    assert not allowed(acl, ERIN, "kms:Encrypt", key, CTX) and allowed(acl, ERIN, "kms:Decrypt", key, CTX)
    assert [g["GrantId"] for g in acl.list_grants(key)] == [plain]


def test_retire_by_retiring_principal(acl: AccessControl, key: str) -> None:
    gid = grant(acl, key, "user:erin", ["Decrypt"], retiring="CN=host1,O=ex")
    with pytest.raises(AccessDenied):
        acl.retire_grant(BOB, key, gid)  # the key's admin revokes, it does not retire
    acl.retire_grant(HOST1, key, gid)
    assert acl.list_grants(key) == [] and not allowed(acl, ERIN, "kms:Decrypt", key, CTX)
    with pytest.raises(KeyNotFound, match=f"key {key} has no grant {gid}"):
        acl.retire_grant(HOST1, key, gid)


def test_retiring_principal_without_a_role_may_not_retire(acl: AccessControl, key: str) -> None:
    gid = grant(acl, key, "user:erin", ["Decrypt"], retiring="user:dave")
    with pytest.raises(AccessDenied):
        acl.retire_grant(DAVE, key, gid)


def test_revoke_needs_revoke_grant_and_takes_effect_at_once(acl: AccessControl, key: str) -> None:
    gid = grant(acl, key, "user:erin", ["Decrypt"])
    assert allowed(acl, BOB, "kms:RevokeGrant", key) and allowed(acl, ALICE, "kms:RevokeGrant", key)
    assert not allowed(acl, ERIN, "kms:RevokeGrant", key)
    acl.revoke_grant(key, gid)
    assert not allowed(acl, ERIN, "kms:Decrypt", key, CTX)
    with pytest.raises(KeyNotFound):
        acl.revoke_grant(key, gid)


def test_grantee_with_create_grant_passes_on_no_more_than_it_holds(acl: AccessControl, key: str) -> None:
    grant(acl, key, "user:erin", ["Decrypt", "Encrypt", "CreateGrant"], {"EncryptionContextSubset": {"a": "1"}})
    assert allowed(acl, ERIN, "kms:CreateGrant", key)
    grant(acl, key, "CN=host1,O=ex", ["Decrypt"], {"EncryptionContextSubset": {"a": "1", "b": "2"}}, creator=ERIN)
    grant(acl, key, "CN=host1,O=ex", ["Encrypt"], {"EncryptionContextEquals": {"a": "1"}}, creator=ERIN)
    assert allowed(acl, HOST1, "kms:Decrypt", key, {"a": "1", "b": "2"})
    for ops, constraints in ((["GenerateDataKey"], {"EncryptionContextSubset": {"a": "1"}}),
                             (["Decrypt"], None),
                             (["Decrypt"], {"EncryptionContextSubset": {"a": "2"}}),
                             (["Decrypt"], {"EncryptionContextSubset": {"b": "2"}})):
        with pytest.raises(AccessDenied, match="its grants pass on fewer operations or a narrower"):
            acl.create_grant(key, "CN=host1,O=ex", ops, constraints, None, None, ERIN)
    with pytest.raises(AccessDenied, match="no policy statement or grant allows it"):
        acl.create_grant(key, "user:erin", ["Decrypt"], None, None, None, NOBODY)
    with pytest.raises(AccessDenied, match="has no role"):
        acl.create_grant(key, "user:erin", ["Decrypt"], None, None, None, DAVE)
    assert len(acl.list_grants(key)) == 3


def test_officer_creates_grants_on_any_key(acl: AccessControl, key: str) -> None:
    grant(acl, key, "user:erin", ["Decrypt"], creator=ALICE)
    assert allowed(acl, ERIN, "kms:Decrypt", key, CTX)


def test_grants_survive_a_new_instance_and_forget_key_drops_them(acl: AccessControl, key: str) -> None:
    gid = grant(acl, key, "user:erin", ["Decrypt"], {"EncryptionContextEquals": CTX})
    again = AccessControl(acl.store.state_dir, ROLES, owner_uid=OWNER_UID)
    assert allowed(again, ERIN, "kms:Decrypt", key, CTX) and not allowed(again, ERIN, "kms:Decrypt", key, {})
    assert [g["GrantId"] for g in again.list_grants(key)] == [gid]
    again.forget_key(key)
    assert again.list_grants(key) == [] and not allowed(again, ERIN, "kms:Decrypt", key, CTX)
    assert not (acl.store.state_dir / "grants" / f"{key}.json").exists()
    assert not (acl.store.state_dir / "policies" / f"{key}.json").exists()


@pytest.mark.parametrize("document", [
    "{", "[]", '{"Grants": 3}', '{"Grants": [{"GrantId": "x"}]}',
    '{"Grants": [{"GrantId": "x", "GranteePrincipal": "user:erin", "Operations": ["PutKeyPolicy"]}]}',
    ('{"Grants": [{"GrantId": "x", "GranteePrincipal": "user:erin", "Operations": ["Decrypt"],'
     ' "Constraints": {"EncryptionContextEquals": {"a": 1}}}]}'),
])
def test_damaged_grants_file_is_a_state_error(acl: AccessControl, key: str, document: str) -> None:
    grant(acl, key, "user:erin", ["Decrypt"])
    path = acl.store.state_dir / "grants" / f"{key}.json"
    json.loads(path.read_text())
    path.write_text(document)
    for call in (lambda: acl.check(ERIN, "kms:Decrypt", key, CTX), lambda: acl.list_grants(key),
                 lambda: acl.create_grant(key, "user:erin", ["Encrypt"], None, None, None, BOB)):
        with pytest.raises(StateError, match=f"^{path} is damaged"):
            call()
    assert path.read_text() == document  # not replaced by a fresh list
