"""Access control of `encfs keyd` (encfs/keyd/acl.py): roles, key policies, their persistence.

Kernel-free and token-free: principals are built from their names, as the transport would.
Grants are in test_keyd_grants.py.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import AccessDenied, ConfigError, StateError, UsageError
from encfs.keyd import actions
from encfs.keyd.acl import AccessControl
from encfs.keyd.principal import UNIX, Principal
from encfs.keyd.roles import Roles

ALICE = Principal(UNIX, uid=2001, gid=2001, pid=1, user="alice", groups=("alice", "admins"))
BOB = Principal(UNIX, uid=2002, gid=2002, pid=2, user="bob", groups=("bob", "storage"))
CAROL = Principal(UNIX, uid=2003, gid=2003, pid=3, user="carol", groups=("carol",))
DAVE = Principal(UNIX, uid=2004, gid=2004, pid=4, user="dave", groups=("dave",))
ERIN = Principal(UNIX, uid=2005, gid=2005, pid=5, user="erin", groups=("erin", "storage"))
NOBODY = Principal(UNIX, uid=4242, gid=4242, pid=6)  # no account: only uid:4242
HOST1 = Principal.from_certificate("CN=host1,O=ex")
ROLES = Roles.from_table({"officers": ["user:alice"], "users": ["group:storage", "uid:4242", "CN=host1,O=ex"],
                          "auditors": ["user:carol"]})
OWNER_UID = 999
CTX = {"encfs:fs": "feb24864"}


def new_key() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def acl(tmp_path: Path) -> AccessControl:
    return AccessControl(tmp_path / "state", ROLES, owner_uid=OWNER_UID)


def allowed(acl: AccessControl, who: Principal, action: str, key: str | None,
            context: dict[str, str] | None = None) -> bool:
    try:
        acl.check(who, action, key, context)
    except AccessDenied:
        return False
    return True


def denial(acl: AccessControl, who: Principal, action: str, key: str | None,
           context: dict[str, str] | None = None) -> str:
    with pytest.raises(AccessDenied) as e:
        acl.check(who, action, key, context)
    assert e.value.exit_code == 77 and "\n" not in str(e.value)
    return str(e.value)


def statement(sid: str, effect: str, who: Any, action: Any, condition: dict[str, Any] | None = None) -> dict[str, Any]:
    st: dict[str, Any] = {"Sid": sid, "Effect": effect, "Principal": who, "Action": action}
    if condition:
        st["Condition"] = condition
    return st


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


# -- default policy and every action class -------------------------------------------------------

@pytest.mark.parametrize("action", sorted(actions.KEY_ADMIN | actions.KEY_USE | actions.SECRET_VALUE
                                          | actions.SECRET_META))
def test_creator_may_everything_on_its_key_and_others_nothing(acl: AccessControl, action: str) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    assert allowed(acl, BOB, action, key, CTX)
    assert denial(acl, ERIN, action, key, CTX).endswith(": no policy statement or grant allows it")


def test_denial_names_principal_action_key_and_reason(acl: AccessControl) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    assert denial(acl, ERIN, "kms:Decrypt", key, CTX) == (
        f"uid 2005 (erin) may not kms:Decrypt key {key}: no policy statement or grant allows it")
    assert denial(acl, ERIN, "secretsmanager:GetSecretValue", key, {"encfs:secret": "db/pw"}) == (
        f"uid 2005 (erin) may not secretsmanager:GetSecretValue secret 'db/pw' (key {key}): "
        "no policy statement or grant allows it")
    assert "feb24864" not in denial(acl, ERIN, "kms:Encrypt", key, CTX)


def test_default_policy_names_the_creator(acl: AccessControl) -> None:
    for who, name in ((BOB, "user:bob"), (NOBODY, "uid:4242"), (HOST1, "CN=host1,O=ex")):
        key = new_key()
        acl.on_key_created(key, who)
        doc = acl.get_policy(key)
        assert {n for st in doc["Statement"] for n in st["Principal"]["Encfs"]} == {name}
        assert allowed(acl, who, "kms:GenerateDataKey", key, CTX)
        assert allowed(acl, who, "kms:PutKeyPolicy", key)


def test_key_without_policy_has_the_implicit_owner_policy(tmp_path: Path) -> None:
    acl = AccessControl(tmp_path, Roles(), owner_uid=BOB.uid)
    key = new_key()
    assert allowed(acl, BOB, "kms:Decrypt", key, CTX)
    assert not allowed(acl, ERIN, "kms:Decrypt", key, CTX)
    assert acl.get_policy(key)["Statement"][0]["Principal"] == {"Encfs": [f"uid:{BOB.uid}"]}
    assert not (tmp_path / "policies").exists()  # nothing written by a read


# -- roles ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(actions.KEY_ADMIN | actions.SECRET_META | actions.NO_KEY))
def test_officer_administers_any_key_without_a_policy(acl: AccessControl, action: str) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    acl.put_policy(key, policy(statement("NoAlice", "Deny", {"Encfs": "user:alice"}, "kms:*")))
    assert allowed(acl, ALICE, action, None if action in actions.NO_KEY else key)


@pytest.mark.parametrize("action", sorted(actions.DATA_ACTIONS))
def test_officer_has_no_data_operations(acl: AccessControl, action: str) -> None:
    key = new_key()
    acl.on_key_created(key, ALICE)  # even its own key, even with a policy allowing it
    assert denial(acl, ALICE, action, key, CTX).endswith(": role crypto-officer has no data operations")


def test_officer_also_listed_as_user_still_has_no_data_operations(tmp_path: Path) -> None:
    roles = Roles.from_table({"officers": ["user:bob"], "users": ["group:storage"]})
    acl = AccessControl(tmp_path, roles)
    key = new_key()
    acl.on_key_created(key, BOB)
    assert "crypto-officer has no data operations" in denial(acl, BOB, "kms:Decrypt", key, CTX)


@pytest.mark.parametrize("action", sorted(actions.ALL_ACTIONS))
def test_auditor_only_reads_the_audit(acl: AccessControl, action: str) -> None:
    key = new_key()
    acl.on_key_created(key, CAROL)
    if action == actions.READ_AUDIT:
        assert allowed(acl, CAROL, action, None)
    else:
        assert denial(acl, CAROL, action, None if action in actions.NO_KEY else key, CTX).endswith(
            ": role auditor only reads the audit trail")


def test_who_reads_the_audit(acl: AccessControl) -> None:
    assert allowed(acl, CAROL, "encfs:ReadAudit", None)
    assert allowed(acl, ALICE, "encfs:ReadAudit", None)
    assert "only an auditor or a crypto-officer" in denial(acl, BOB, "encfs:ReadAudit", None)
    assert "only an auditor or a crypto-officer" in denial(acl, HOST1, "encfs:ReadAudit", None)


@pytest.mark.parametrize("action", sorted(actions.ALL_ACTIONS))
def test_principal_in_no_role_is_denied_everything(acl: AccessControl, action: str) -> None:
    key = new_key()
    acl.put_policy(key, policy(statement("All", "Allow", "*", "*")))
    assert "it has no role" in denial(acl, DAVE, action, None if action in actions.NO_KEY | {
        actions.READ_AUDIT} else key, CTX)


@pytest.mark.parametrize("who", [BOB, ERIN, NOBODY, HOST1])
def test_crypto_users_create_and_list(acl: AccessControl, who: Principal) -> None:
    for action in sorted(actions.NO_KEY):
        assert allowed(acl, who, action, None)


def test_without_roles_everyone_is_a_crypto_user(tmp_path: Path) -> None:
    acl = AccessControl(tmp_path, Roles.load(tmp_path / "keyd.toml"), owner_uid=OWNER_UID)
    key = new_key()
    acl.on_key_created(key, DAVE)
    assert allowed(acl, DAVE, "kms:CreateKey", None)
    assert allowed(acl, DAVE, "kms:Decrypt", key, CTX)
    assert not allowed(acl, ALICE, "kms:Decrypt", key, CTX)
    assert not allowed(acl, ALICE, "kms:DisableKey", key)  # no officers either
    owner = Principal(UNIX, uid=OWNER_UID, gid=1, pid=1)
    root = Principal(UNIX, uid=0, gid=0, pid=1, user="root")
    assert allowed(acl, owner, "encfs:ReadAudit", None) and allowed(acl, root, "encfs:ReadAudit", None)
    assert "only root and the daemon's own user" in denial(acl, DAVE, "encfs:ReadAudit", None)


def test_roles_from_keyd_toml(tmp_path: Path) -> None:
    path = tmp_path / "keyd.toml"
    path.write_text('[listen]\nsocket = "/run/x"\n[roles]\nofficers = ["user:alice"]\n'
                    'users = ["group:storage", "CN=host1,O=ex"]\nauditors = ["user:carol"]\n')
    roles = Roles.load(path)
    assert roles.of(ALICE) == {"crypto-officer"} and roles.of(ERIN) == {"crypto-user"}
    assert roles.of(HOST1) == {"crypto-user"} and roles.of(CAROL) == {"auditor"} and not roles.of(DAVE)
    assert not Roles.load(tmp_path / "absent.toml").configured
    assert not Roles.from_table({"officers": [], "users": []}).configured


@pytest.mark.parametrize("text, message", [
    ('[roles]\nadmins = ["user:a"]\n', "unknown role list 'admins'"),
    ('[roles]\nusers = "user:a"\n', "roles.users is not a list"),
    ('[roles]\nusers = ["bob"]\n', "roles.users: principal 'bob' is not uid:N"),
    ('[roles]\nusers = ["uid:x"]\n', "principal 'uid:x' is malformed"),
    ("roles = 3\n", "roles is not a table"),
    ("[roles\n", "is not valid TOML"),
])
def test_malformed_roles_are_one_line_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keyd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        Roles.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -- policy evaluation ----------------------------------------------------------------------------

def test_explicit_deny_wins_and_names_its_statement(acl: AccessControl) -> None:
    key = new_key()
    acl.put_policy(key, policy(statement("All", "Allow", "*", "kms:*"),
                               statement("NoBob", "Deny", {"Encfs": ["user:bob"]}, "kms:Decrypt")))
    assert allowed(acl, ERIN, "kms:Decrypt", key, CTX)
    assert allowed(acl, BOB, "kms:Encrypt", key, CTX)
    assert denial(acl, BOB, "kms:Decrypt", key, CTX) == (
        f"uid 2002 (bob) may not kms:Decrypt key {key}: denied by statement 'NoBob' of its key policy")


def test_policy_change_takes_effect_at_once(acl: AccessControl) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    assert allowed(acl, BOB, "kms:Decrypt", key, CTX)
    acl.put_policy(key, policy(statement("Storage", "Allow", {"Encfs": "group:storage"}, "kms:Decrypt")))
    assert not allowed(acl, HOST1, "kms:Decrypt", key, CTX)
    assert allowed(acl, ERIN, "kms:Decrypt", key, CTX) and allowed(acl, BOB, "kms:Decrypt", key, CTX)
    assert not allowed(acl, BOB, "kms:Encrypt", key, CTX)
    acl.put_policy(key, policy(statement("Host", "Allow", {"Encfs": ["CN=host1,O=ex"]}, "kms:Decrypt")))
    assert not allowed(acl, BOB, "kms:Decrypt", key, CTX) and allowed(acl, HOST1, "kms:Decrypt", key, CTX)


@pytest.mark.parametrize("pattern, yes, no", [
    ("kms:ReEncrypt*", ["kms:ReEncryptFrom", "kms:ReEncryptTo"], ["kms:Encrypt", "kms:Decrypt"]),
    ("kms:Generate*", ["kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext"], ["kms:Encrypt"]),
    ("kms:*", sorted(actions.KEY_ADMIN | actions.KEY_USE), ["secretsmanager:GetSecretValue"]),
    ("KMS:decrypt", ["kms:Decrypt"], ["kms:Encrypt"]),
    ("kms:?ncrypt", ["kms:Encrypt"], ["kms:Decrypt", "kms:ReEncryptTo"]),
    ("secretsmanager:*", sorted(actions.SECRET_VALUE | actions.SECRET_META), ["kms:Decrypt"]),
    ("*", sorted(actions.KEY_SCOPED), []),
])
def test_action_wildcards(acl: AccessControl, pattern: str, yes: list[str], no: list[str]) -> None:
    key = new_key()
    acl.put_policy(key, policy(statement("W", "Allow", {"Encfs": "user:bob"}, [pattern])))
    for action in yes:
        assert allowed(acl, BOB, action, key, CTX), action
    for action in no:
        assert not allowed(acl, BOB, action, key, CTX), action


@pytest.mark.parametrize("condition, yes, no", [
    ({"StringEquals": {"kms:EncryptionContext:encfs:fs": "a1"}}, [{"encfs:fs": "a1"}, {"encfs:fs": "a1", "x": "y"}],
     [{"encfs:fs": "A1"}, {"encfs:fs": "a2"}, {}]),
    ({"StringEquals": {"kms:EncryptionContext:encfs:fs": ["a1", "b2"]}}, [{"encfs:fs": "b2"}], [{"encfs:fs": "c3"}]),
    ({"StringLike": {"kms:EncryptionContext:encfs:secret": "app/*"}}, [{"encfs:secret": "app/db"}],
     [{"encfs:secret": "other/app/db"}, {}]),
    ({"StringNotEquals": {"kms:EncryptionContext:tier": "prod"}}, [{"tier": "dev"}, {}], [{"tier": "prod"}]),
    ({"StringNotLike": {"kms:EncryptionContext:tier": "pr*"}}, [{"tier": "dev"}], [{"tier": "prod"}]),
    ({"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["encfs:fs", "tier"]}},
     [{"encfs:fs": "1"}, {"encfs:fs": "1", "tier": "2"}, {}], [{"encfs:fs": "1", "other": "2"}]),
    ({"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "tier"}}, [{"tier": "1", "x": "2"}],
     [{"x": "2"}, {}]),
    ({"StringEquals": {"kms:EncryptionContext:a": "1"}, "StringLike": {"kms:EncryptionContext:b": "?"}},
     [{"a": "1", "b": "2"}], [{"a": "1", "b": "22"}, {"a": "1"}]),
])
def test_conditions(acl: AccessControl, condition: dict[str, Any], yes: list[dict[str, str]],
                    no: list[dict[str, str]]) -> None:
    key = new_key()
    acl.put_policy(key, policy(statement("C", "Allow", {"Encfs": "group:storage"}, "kms:Decrypt", condition)))
    for ctx in yes:
        assert allowed(acl, ERIN, "kms:Decrypt", key, ctx), ctx
    for ctx in no:
        assert not allowed(acl, ERIN, "kms:Decrypt", key, ctx), ctx


def test_conditioned_deny_only_denies_where_it_matches(acl: AccessControl) -> None:
    key = new_key()
    acl.put_policy(key, policy(statement("Use", "Allow", {"Encfs": "group:storage"}, "kms:*"),
                               statement("NotProd", "Deny", "*", "kms:Decrypt",
                                         {"StringEquals": {"kms:EncryptionContext:tier": "prod"}})))
    assert allowed(acl, ERIN, "kms:Decrypt", key, {"tier": "dev"})
    assert "statement 'NotProd'" in denial(acl, ERIN, "kms:Decrypt", key, {"tier": "prod"})


# -- malformed documents --------------------------------------------------------------------------

GOOD = statement("S", "Allow", {"Encfs": ["user:bob"]}, "kms:Decrypt")


@pytest.mark.parametrize("document, message", [
    ([], "key policy is not a JSON object"),
    ({"Statement": []}, "has no Statement list"),
    ({"Version": "2020-01-01", "Statement": [GOOD]}, 'Version "2020-01-01"'),
    ({"Statement": [GOOD], "Extra": 1}, "unknown field 'Extra'"),
    (policy({**GOOD, "Effect": "Maybe"}), "statement 'S': Effect \"Maybe\" is not \"Allow\" or \"Deny\""),
    (policy({**GOOD, "Action": "kms:Frobnicate"}), "action 'kms:Frobnicate' is not one encfs knows"),
    (policy({**GOOD, "Action": "kms:CreateKey"}), "kms:CreateKey is not decided by a key policy"),
    (policy({**GOOD, "Action": []}), "Action is not an action or a list"),
    (policy({**GOOD, "Condition": {"NumericEquals": {"kms:EncryptionContext:a": "1"}}}),
     "condition operator 'NumericEquals' is not supported"),
    (policy({**GOOD, "Condition": {"StringEquals": {"kms:CallerAccount": "1"}}}),
     "condition key 'kms:CallerAccount' is not one encfs knows"),
    (policy({**GOOD, "Condition": {"ForAnyValue:StringEquals": {"kms:EncryptionContext:a": "1"}}}),
     "ForAnyValue:StringEquals takes kms:EncryptionContextKeys"),
    (policy({**GOOD, "Condition": {"StringEquals": {"kms:EncryptionContext:a": 1}}}), "is not a string"),
    (policy({**GOOD, "Principal": {"AWS": "*"}}), 'Principal must be "*" or {"Encfs": [names]}'),
    (policy({**GOOD, "Principal": {"Encfs": ["bob"]}}), "principal 'bob' is not uid:N, user:NAME"),
    (policy({**GOOD, "Resource": "arn:aws:kms:x"}), 'Resource must be "*"'),
    (policy({**GOOD, "NotAction": "kms:Decrypt"}), "NotAction is not supported by encfs"),
    (policy({k: v for k, v in GOOD.items() if k != "Sid"}, {**GOOD, "Frob": 1}), "statement 'S': unknown field 'Frob'"),
    (policy(GOOD, {k: v for k, v in GOOD.items() if k != "Sid"} | {"Effect": 1}), "statement #2: Effect 1"),
    (policy(GOOD, GOOD), "two statements with Sid 'S'"),
])
def test_malformed_policy_is_one_line_usage_error(acl: AccessControl, document: Any, message: str) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    with pytest.raises(UsageError) as e:
        acl.put_policy(key, document)
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    assert allowed(acl, BOB, "kms:Encrypt", key, CTX)  # the old policy stays


def test_policy_over_32_kib_is_refused(acl: AccessControl) -> None:
    key = new_key()
    names = [f"user:u{i:05d}" for i in range(2600)]
    acl.put_policy(key, policy(statement("Many", "Allow", {"Encfs": names[:2000]}, "kms:Decrypt")))
    with pytest.raises(UsageError, match=r"key policy is \d+ bytes; at most 32768"):
        acl.put_policy(key, policy(statement("Many", "Allow", {"Encfs": names}, "kms:Decrypt")))


# -- persistence ----------------------------------------------------------------------------------

def test_policies_survive_a_new_instance_and_forget_key_drops_them(tmp_path: Path) -> None:
    first = AccessControl(tmp_path, ROLES, owner_uid=OWNER_UID)
    key, other = new_key(), new_key()
    first.on_key_created(key, BOB)
    first.put_policy(other, policy(statement("Host", "Allow", {"Encfs": "CN=host1,O=ex"}, "kms:Encrypt")))
    path = tmp_path / "policies" / f"{other}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    again = AccessControl(tmp_path, ROLES, owner_uid=OWNER_UID)
    assert allowed(again, BOB, "kms:Decrypt", key, CTX) and not allowed(again, ERIN, "kms:Decrypt", key, CTX)
    assert allowed(again, HOST1, "kms:Encrypt", other, CTX) and not allowed(again, BOB, "kms:Encrypt", other, CTX)
    again.forget_key(other)
    assert not path.exists()
    assert again.get_policy(other)["Id"] == "encfs-implicit"


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[]", json.dumps(policy(
    {**GOOD, "Effect": "Maybe"})).encode()])
def test_damaged_policy_file_is_a_state_error(acl: AccessControl, content: bytes) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    path = acl.store.state_dir / "policies" / f"{key}.json"
    assert allowed(acl, BOB, "kms:Decrypt", key, CTX)  # cached before the damage
    path.write_bytes(content)
    os.utime(path, ns=(1, 1))
    for call in (lambda: acl.check(BOB, "kms:Decrypt", key, CTX), lambda: acl.get_policy(key)):
        with pytest.raises(StateError) as e:
            call()
        assert str(e.value).startswith(f"{path} is damaged") and "\n" not in str(e.value)


def test_unreadable_policy_file_is_a_state_error(acl: AccessControl) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    path = acl.store.state_dir / "policies" / f"{key}.json"
    path.unlink()
    path.mkdir()
    with pytest.raises(StateError, match=f"cannot read {path}"):
        acl.check(BOB, "kms:Decrypt", key, CTX)


def test_a_key_id_cannot_name_a_path(acl: AccessControl) -> None:
    with pytest.raises(UsageError, match="is not a key id"):
        acl.put_policy("../../etc/passwd", policy(GOOD))
    with pytest.raises(UsageError, match="is not a key id"):
        acl.check(BOB, "kms:Decrypt", "../x", CTX)


def test_unknown_action_is_a_bug_of_the_caller(acl: AccessControl) -> None:
    with pytest.raises(ValueError):
        acl.check(BOB, "kms:Frobnicate", new_key())


def test_officer_repairs_a_damaged_policy(acl: AccessControl) -> None:
    key = new_key()
    acl.on_key_created(key, BOB)
    (acl.store.state_dir / "policies" / f"{key}.json").write_text("{")
    assert allowed(acl, ALICE, "kms:PutKeyPolicy", key)  # an officer's check reads no policy
    acl.put_policy(key, policy(statement("Bob", "Allow", {"Encfs": "user:bob"}, "kms:Decrypt")))
    assert allowed(acl, BOB, "kms:Decrypt", key, CTX)
