"""The key daemon's dispatcher decided against a real token, kernel-free: the defects a security
review of `encfs keyd` (#24) found, each pinned by a test that failed before its fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import AccessDenied, EncfsError, UsageError
from encfs.keyd.acl import AccessControl
from encfs.keyd.dispatch import Dispatcher, Request
from encfs.keyd.principal import UNIX, Principal
from encfs.keyd.roles import Roles
from encfs.keyd.secretstore import SecretStore
from encfs.keys.service import KeyService

OWNER = 4999  # the daemon's own uid in these tests (not this process's: nobody here is it)
ALICE = Principal(UNIX, uid=5001, gid=5001, pid=11, user="alice", groups=("alice",))
BOB = Principal(UNIX, uid=5002, gid=5002, pid=12, user="bob", groups=("bob",))
OFFICER = Principal(UNIX, uid=5003, gid=5003, pid=13, user="olga", groups=("olga",))


class Daemon:
    """A Dispatcher as the token worker builds it, with a few shortcuts."""

    def __init__(self, tmp_path: Path, ks: KeyService, roles: Roles, clock: Any) -> None:
        self.ks = ks
        self.access = AccessControl(tmp_path / "keyd", roles, clock, owner_uid=OWNER)
        self.dispatcher = Dispatcher(ks, self.access, SecretStore(ks.home, ks, clock))

    def __call__(self, who: Principal, op: str, **args: Any) -> dict[str, Any]:
        return self.dispatcher.call(who, op, args)

    def records(self, operation: str) -> list[dict[str, Any]]:
        return [r for r in self.ks.audit.read_all() if r["operation"] == operation]


@pytest.fixture
def daemon(tmp_path: Path, service: KeyService, clock: Any) -> Iterator[Daemon]:
    yield Daemon(tmp_path, service, Roles(), clock)


def _used_by(d: Daemon, key: str) -> dict[int, Any]:
    return {v["Version"]: v["UsedBy"] for v in d.ks.describe_key(key)["KeyVersions"]}


def _key_with_two_versions(d: Daemon) -> str:
    """Alice's key: version 1 under filesystem x (fs:x), then rotated (version 2 current)."""
    key = d(ALICE, "CreateKey")["KeyId"]
    d(ALICE, "GenerateDataKey", KeyId=key, EncryptionContext={"encfs:fs": "x"}, EncfsInternal=True)
    d(ALICE, "RotateKeyOnDemand", KeyId=key)
    return key


# -- ForgetUsage ------------------------------------------------------------------------------


def test_forget_usage_needs_reencrypt_from_on_the_versions_it_stops_naming(daemon: Daemon) -> None:
    d = daemon
    key = _key_with_two_versions(d)
    d(ALICE, "CreateGrant", KeyId=key, GranteePrincipal="user:bob", Operations=["ReEncryptTo"])
    with pytest.raises(AccessDenied, match="kms:ReEncryptFrom"):
        d(BOB, "ForgetUsage", Target="fs:x", KeepKeyId=key, KeepKeyVersion=2)
    assert _used_by(d, key)[1] == ["fs:x"]  # version 1 still counts as used: no retire can destroy it


def test_forget_usage_is_decided_in_the_targets_encryption_context(daemon: Daemon) -> None:
    d = daemon
    key = _key_with_two_versions(d)
    d(ALICE, "CreateGrant", KeyId=key, GranteePrincipal="user:bob", Operations=["ReEncryptFrom", "ReEncryptTo"],
      Constraints={"EncryptionContextEquals": {"encfs:fs": "x"}})
    assert d(BOB, "ForgetUsage", Target="fs:x", KeepKeyId=key, KeepKeyVersion=2) == {"Left": [[key, 1]]}
    d(ALICE, "GenerateDataKey", KeyId=key, EncryptionContext={"encfs:fs": "y"}, EncfsInternal=True)
    d(ALICE, "RotateKeyOnDemand", KeyId=key)
    with pytest.raises(AccessDenied):  # the grant is filesystem x's only
        d(BOB, "ForgetUsage", Target="fs:y", KeepKeyId=key, KeepKeyVersion=3)
    assert "fs:y" in _used_by(d, key)[2]


def test_forget_usage_is_audited_with_its_principal(daemon: Daemon) -> None:
    d = daemon
    key = _key_with_two_versions(d)
    d(ALICE, "ForgetUsage", Target="fs:x", KeepKeyId=key, KeepKeyVersion=2)
    [record] = d.records("ForgetUsage")
    assert record["principal"]["uid"] == ALICE.uid and record["key_id"] == key and record["target"] == "fs:x"


# -- aliases under alias/encfs/ ---------------------------------------------------------------


def test_a_user_cannot_take_the_secrets_default_alias(daemon: Daemon) -> None:
    """Whoever holds alias/encfs/secrets receives every secret created without a key: had bob taken
    it (and let everyone CreateSecret under his key), alice's next secret would be his to read."""
    d = daemon
    with pytest.raises(AccessDenied, match="alias/encfs/"):
        d(BOB, "CreateKey", Alias="encfs/secrets")
    mine = d(BOB, "CreateKey", Alias="bob/secrets")["KeyId"]
    with pytest.raises(AccessDenied, match="alias/encfs/"):
        d(BOB, "UpdateAlias", AliasName="alias/encfs/secrets", TargetKeyId=mine)
    with pytest.raises(EncfsError, match="no key or alias"):
        d.ks.resolve_key_id("alias/encfs/secrets")
    assert [r["outcome"] for r in d.records("ReservedAlias")] == ["denied", "denied"]
    daemon_user = Principal(UNIX, uid=OWNER, gid=OWNER, pid=14, user=None, groups=())
    key = d(daemon_user, "CreateKey", Alias="encfs/secrets")["KeyId"]
    assert d.ks.resolve_key_id("alias/encfs/secrets") == key


def test_with_roles_the_encfs_aliases_are_the_officers(tmp_path: Path, service: KeyService, clock: Any) -> None:
    d = Daemon(tmp_path, service, Roles(officers=frozenset({"user:olga"}), users=frozenset({"user:bob"})), clock)
    with pytest.raises(AccessDenied, match="crypto-officer"):
        d(BOB, "CreateKey", Alias="alias/encfs/secrets")
    key = d(OFFICER, "CreateKey", Alias="alias/encfs/secrets")["KeyId"]
    assert d.ks.resolve_key_id("alias/encfs/secrets") == key
    d(BOB, "CreateKey", Alias="encfsnot/mine")  # only the alias/encfs/ folder is reserved


# -- the audit trail --------------------------------------------------------------------------


def test_reading_policies_grants_and_the_audit_is_audited(daemon: Daemon) -> None:
    d = daemon
    key = d(ALICE, "CreateKey")["KeyId"]
    d(ALICE, "GetKeyPolicy", KeyId=key)
    d(ALICE, "ListGrants", KeyId=key)
    d(Principal(UNIX, uid=0, gid=0, pid=15, user="root", groups=("root",)), "ReadAudit")
    for op, uid, key_id in (("GetKeyPolicy", ALICE.uid, key), ("ListGrants", ALICE.uid, key), ("ReadAudit", 0, None)):
        [record] = d.records(op)
        assert (record["outcome"], record["principal"]["uid"], record["key_id"]) == ("success", uid, key_id)


# -- malformed arguments ----------------------------------------------------------------------


def test_flags_are_json_booleans_not_truthy_strings(daemon: Daemon) -> None:
    d = daemon
    key = d(ALICE, "CreateKey")["KeyId"]
    d(ALICE, "CreateSecret", SecretId="db", SecretValue="c2VjcmV0", KmsKeyId=key)
    with pytest.raises(UsageError, match="ForceDeleteWithoutRecovery must be true or false"):
        d(ALICE, "DeleteSecret", SecretId="db", ForceDeleteWithoutRecovery="false")
    assert d(ALICE, "GetSecretValue", SecretId="db")["SecretString"] == "secret"  # not deleted for good
    for flag in ("WithPlaintext", "EncfsInternal"):
        with pytest.raises(UsageError, match=f"{flag} must be true or false"):
            d(ALICE, "GenerateDataKey", KeyId=key, **{flag: "false"})


def test_a_batch_does_not_take_true_for_a_size(daemon: Daemon) -> None:
    d = daemon
    key = d(ALICE, "CreateKey")["KeyId"]
    requests = [Request(ALICE, "GenerateDataKey", {"KeyId": key, "NumberOfBytes": True}) for _ in range(2)]
    replies = d.dispatcher.run_batch(requests)
    assert all(isinstance(r, UsageError) and "NumberOfBytes must be an integer" in r.message for r in replies)


# -- secrets ----------------------------------------------------------------------------------


def test_a_secret_whose_key_was_deleted_can_still_be_described_and_deleted(daemon: Daemon, clock: Any) -> None:
    d = daemon
    key = d(ALICE, "CreateKey")["KeyId"]
    d(ALICE, "CreateSecret", SecretId="orphan", SecretValue="c2VjcmV0", KmsKeyId=key)
    d(ALICE, "ScheduleKeyDeletion", KeyId=key, PendingWindowInDays=7)
    clock.advance(days=8)
    with pytest.raises(EncfsError, match="was deleted"):
        d.ks.resolve_key_id(key)
    assert d(ALICE, "DescribeSecret", SecretId="orphan")["KmsKeyId"] == key
    with pytest.raises(AccessDenied):
        d(BOB, "DeleteSecret", SecretId="orphan", ForceDeleteWithoutRecovery=True)
    d(ALICE, "DeleteSecret", SecretId="orphan", ForceDeleteWithoutRecovery=True)
    assert d(ALICE, "ListSecrets")["SecretList"] == []


def test_blobs_naming_unknown_keys_do_not_grow_the_daemons_memory(daemon: Daemon) -> None:
    """Any client can send a blob whose header names a random key id (Decrypt decides on it): each
    is denied, and the access-control store remembers nothing of them (no policy or grant file)."""
    import uuid

    d = daemon
    store = d.access.store

    def remembered() -> int:
        return sum(len(v) for v in vars(store).values() if isinstance(v, dict))

    key = d(ALICE, "CreateKey")["KeyId"]
    d.access.check(ALICE, "kms:Decrypt", key, {})  # a policy that exists is remembered
    before = remembered()
    assert before
    for _ in range(200):
        with pytest.raises(AccessDenied):
            d.access.check(BOB, "kms:Decrypt", str(uuid.uuid4()), {})
    assert remembered() == before
