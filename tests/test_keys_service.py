"""KeyService API on a real SoftHSM2 token: keys, aliases, states and rotation.

Context binding, tamper detection and size bounds are in test_keys_service_crypto.py, BYOK in
test_keys_service_byok.py, the data-key cache in test_keys_service_cache.py, the audit log and the
metadata file in test_keys_service_audit.py; their helpers in keys_helpers.py.

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from keys_helpers import CTX, crypto_ops, new_key, records_for

from encfs.errors import InvalidCiphertext, KeyNotFound, KeyStateError, UsageError
from encfs.keys.audit import iso_time
from encfs.keys.blob import CiphertextBlob
from encfs.keys.service import KeyService, token_object_id

# -- create / list / describe ------------------------------------------------


def test_create_list_describe(service: KeyService, clock: Any) -> None:
    assert service.list_keys() == []
    created = service.create_key(description="first key")
    key_id = created["KeyId"]
    assert str(uuid.UUID(key_id)) == key_id
    assert created["KeyState"] == "Enabled"
    assert created["Origin"] == "TOKEN"
    assert created["CurrentKeyVersion"] == 1
    assert created["Description"] == "first key"
    clock.advance(1)
    second = new_key(service, description="second key")
    assert second != key_id

    listed = service.list_keys()
    assert [k["KeyId"] for k in listed] == [key_id, second]
    assert {k["Description"] for k in listed} == {"first key", "second key"}

    desc = service.describe_key(key_id)
    assert desc["KeyId"] == key_id
    assert desc["KeyState"] == "Enabled"
    assert desc["KeyRotationEnabled"] is False
    assert [v["Version"] for v in desc["KeyVersions"]] == [1]
    attrs = desc["TokenAttributes"]
    assert attrs["sensitive"] is True
    assert attrs["extractable"] is False
    assert attrs["never_extractable"] is True


def test_create_key_puts_a_backing_key_on_the_token(service: KeyService, token: Any) -> None:
    key_id = new_key(service)
    assert token.has_object(token_object_id(key_id, 1))
    assert not token.has_object(token_object_id(key_id, 2))


def test_create_key_rejects_unknown_origin(service: KeyService) -> None:
    with pytest.raises(UsageError, match="origin"):
        service.create_key(origin="AWS_CLOUDHSM")
    assert service.list_keys() == []


def test_unknown_key_ids_and_aliases(service: KeyService) -> None:
    new_key(service)
    missing = str(uuid.uuid4())
    with pytest.raises(KeyNotFound, match=missing):
        service.describe_key(missing)
    with pytest.raises(KeyNotFound, match="nosuchalias"):
        service.describe_key("alias/nosuchalias")
    with pytest.raises(KeyNotFound, match="nosuchalias"):
        service.describe_key("nosuchalias")
    with pytest.raises(KeyNotFound):
        service.generate_data_key(missing)
    with pytest.raises(KeyNotFound):
        service.encrypt("alias/nosuchalias", b"x")
    with pytest.raises(KeyNotFound):
        service.update_alias("alias/dangling", missing)
    assert "alias/dangling" not in service.list_aliases()


# -- aliases -----------------------------------------------------------------


def test_alias_create_resolve_move_delete(service: KeyService) -> None:
    a = service.create_key(alias="zq-payments-master")
    key_a = a["KeyId"]
    assert a["Aliases"] == ["alias/zq-payments-master"]
    key_b = new_key(service)

    # resolve by bare name and by alias/name
    assert service.describe_key("zq-payments-master")["KeyId"] == key_a
    assert service.describe_key("alias/zq-payments-master")["KeyId"] == key_a
    assert service.list_aliases() == {"alias/zq-payments-master": key_a}

    # a data key generated via the alias belongs to the key
    dk = service.generate_data_key("zq-payments-master", CTX)
    assert dk.key_id == key_a

    # move the alias
    assert service.update_alias("alias/zq-payments-master", key_b) == key_b
    assert service.describe_key("zq-payments-master")["KeyId"] == key_b
    assert service.describe_key(key_a)["Aliases"] == []
    assert service.describe_key(key_b)["Aliases"] == ["alias/zq-payments-master"]
    # the old blob still decrypts (it names the key id, not the alias)
    assert service.decrypt(dk.ciphertext_blob, CTX).plaintext == dk.plaintext
    # ...and insisting on the alias (now key_b) fails
    with pytest.raises(InvalidCiphertext):
        service.decrypt(dk.ciphertext_blob, CTX, key="zq-payments-master")

    # a second alias for the same key; update_alias creates it
    service.update_alias("zq-second", key_b)
    assert service.describe_key(key_b)["Aliases"] == ["alias/zq-payments-master", "alias/zq-second"]

    service.delete_alias("zq-payments-master")
    assert service.list_aliases() == {"alias/zq-second": key_b}
    with pytest.raises(KeyNotFound):
        service.describe_key("alias/zq-payments-master")
    # the keys themselves are untouched
    assert {k["KeyId"] for k in service.list_keys()} == {key_a, key_b}


def test_create_key_with_taken_alias_fails_without_creating_a_key(service: KeyService) -> None:
    new_key(service, alias="taken")
    with pytest.raises(UsageError, match="already exists"):
        service.create_key(alias="alias/taken")
    assert len(service.list_keys()) == 1


def test_delete_unknown_alias_fails(service: KeyService) -> None:
    with pytest.raises((UsageError, KeyNotFound), match="does not exist"):
        service.delete_alias("never-created")


@pytest.mark.parametrize("bad", ["alias/aws/ebs", "awsfoo", "has space", "alias/", "", "x" * 300])
def test_invalid_alias_names(service: KeyService, bad: str) -> None:
    key_id = new_key(service)
    with pytest.raises(UsageError):
        service.update_alias(bad, key_id)
    assert service.list_aliases() == {}


def test_alias_is_never_stored_in_ciphertext(service: KeyService) -> None:
    name = "Zebra-Quokka_7731"
    key_id = new_key(service, alias=name)
    blobs = [
        service.encrypt(name, b"some plaintext", CTX),
        service.encrypt(f"alias/{name}", b"some plaintext", CTX),
        service.generate_data_key(name, CTX).ciphertext_blob,
        service.generate_data_key(f"alias/{name}", {}, with_plaintext=False).ciphertext_blob,
    ]
    for blob in blobs:
        assert name.encode() not in blob
        assert b"alias/" not in blob
        assert uuid.UUID(key_id).bytes in blob  # the key id is what the blob carries
    # after the alias is deleted every blob still decrypts
    service.delete_alias(name)
    assert service.decrypt(blobs[0], CTX).plaintext == b"some plaintext"
    assert service.decrypt(blobs[3], {}).key_id == key_id


# -- state machine -----------------------------------------------------------


def test_disable_enable(service: KeyService) -> None:
    key_id = new_key(service)
    other = new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)

    assert service.disable_key(key_id)["KeyState"] == "Disabled"
    assert service.describe_key(key_id)["KeyState"] == "Disabled"
    for name, op in crypto_ops(service, key_id, blob, other).items():
        with pytest.raises(KeyStateError, match="disabled") as exc:
            op()
        assert key_id in str(exc.value), name
    # re-encrypting *to* a disabled key fails too
    other_blob = service.encrypt(other, b"x", CTX)
    with pytest.raises(KeyStateError, match="disabled"):
        service.re_encrypt(other_blob, CTX, key_id)
    # disabling twice is harmless
    assert service.disable_key(key_id)["KeyState"] == "Disabled"

    assert service.enable_key(key_id)["KeyState"] == "Enabled"
    assert service.decrypt(blob, CTX).plaintext == b"payload"
    for op in crypto_ops(service, key_id, blob, other).values():
        op()


def test_schedule_deletion_window_bounds(service: KeyService) -> None:
    key_id = new_key(service)
    for days in (0, 6, 31, 365, -7):
        with pytest.raises(UsageError, match="7 to 30"):
            service.schedule_key_deletion(key_id, days=days)
        assert service.describe_key(key_id)["KeyState"] == "Enabled"
    for days in (7, 30):
        k = new_key(service)
        desc = service.schedule_key_deletion(k, days=days)
        assert desc["KeyState"] == "PendingDeletion"
        assert "DeletionDate" in desc


def test_pending_deletion_blocks_crypto_and_cancel_returns_disabled(service: KeyService) -> None:
    key_id = new_key(service)
    other = new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)
    service.schedule_key_deletion(key_id, days=7)
    assert service.describe_key(key_id)["KeyState"] == "PendingDeletion"

    for name, op in crypto_ops(service, key_id, blob, other).items():
        with pytest.raises(KeyStateError) as exc:
            op()
        assert "pending deletion" in str(exc.value).lower(), name
    with pytest.raises(KeyStateError, match="pending deletion"):
        service.re_encrypt(service.encrypt(other, b"x", CTX), CTX, key_id)
    with pytest.raises(KeyStateError):
        service.enable_key(key_id)
    with pytest.raises(KeyStateError):
        service.schedule_key_deletion(key_id, days=7)

    desc = service.cancel_key_deletion(key_id)
    assert desc["KeyState"] == "Disabled"
    assert "DeletionDate" not in desc
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(blob, CTX)
    with pytest.raises(KeyStateError):
        service.cancel_key_deletion(key_id)
    service.enable_key(key_id)
    assert service.decrypt(blob, CTX).plaintext == b"payload"


def test_deletion_happens_after_window(service: KeyService, token: Any, clock: Any) -> None:
    key_id = new_key(service, alias="doomed")
    service.rotate_key(key_id)
    keeper = new_key(service)
    blobs = [service.encrypt(key_id, b"old data", CTX)]
    service.rotate_key(key_id)
    blobs.append(service.generate_data_key(key_id, CTX).ciphertext_blob)
    versions = [1, 2, 3]
    for v in versions:
        assert token.has_object(token_object_id(key_id, v))

    service.schedule_key_deletion(key_id, days=10)
    clock.advance(days=9)
    assert service.describe_key(key_id)["KeyState"] == "PendingDeletion"  # not yet
    for v in versions:
        assert token.has_object(token_object_id(key_id, v))

    clock.advance(days=2)  # window + 1 day
    listed = [k["KeyId"] for k in service.list_keys()]  # any call applies the deletion
    assert key_id not in listed and keeper in listed
    for v in versions:
        assert not token.has_object(token_object_id(key_id, v))
    with pytest.raises(KeyNotFound, match="deleted"):
        service.describe_key(key_id)
    with pytest.raises(KeyNotFound):
        service.describe_key("doomed")  # its alias went with it
    assert "alias/doomed" not in service.list_aliases()
    for blob in blobs:
        with pytest.raises(KeyNotFound, match="deleted"):
            service.decrypt(blob, CTX)
    deletes = records_for(service, "DeleteKey")
    assert [r["key_id"] for r in deletes] == [key_id]
    assert deletes[0]["outcome"] == "success" and deletes[0]["trigger"]
    # the surviving key is untouched
    assert token.has_object(token_object_id(keeper, 1))
    service.encrypt(keeper, b"still fine")


def test_deletion_is_triggered_by_a_crypto_call_too(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    blob = service.encrypt(key_id, b"x")
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    with pytest.raises(KeyNotFound, match="deleted"):
        service.decrypt(blob)


# -- rotation ----------------------------------------------------------------


def test_rotate_on_demand(service: KeyService, token: Any) -> None:
    key_id = new_key(service)
    dk1 = service.generate_data_key(key_id, CTX)
    enc1 = service.encrypt(key_id, b"v1 data", CTX)
    assert dk1.key_version == 1

    desc = service.rotate_key(key_id)
    assert desc["CurrentKeyVersion"] == 2
    assert [v["Version"] for v in desc["KeyVersions"]] == [1, 2]
    assert token.has_object(token_object_id(key_id, 2))
    assert token.has_object(token_object_id(key_id, 1))  # old version kept

    dk2 = service.generate_data_key(key_id, CTX)
    assert dk2.key_version == 2
    assert CiphertextBlob.parse(dk2.ciphertext_blob).header.key_version == 2
    assert CiphertextBlob.parse(service.encrypt(key_id, b"x")).header.key_version == 2

    d1 = service.decrypt(dk1.ciphertext_blob, CTX)
    assert (d1.plaintext, d1.key_version) == (dk1.plaintext, 1)
    assert service.decrypt(enc1, CTX).plaintext == b"v1 data"
    d2 = service.decrypt(dk2.ciphertext_blob, CTX)
    assert (d2.plaintext, d2.key_version) == (dk2.plaintext, 2)

    rec = records_for(service, "RotateKeyOnDemand")
    assert [(r["key_id"], r["key_version"], r["outcome"]) for r in rec] == [(key_id, 2, "success")]


def test_automatic_rotation(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    old = service.generate_data_key(key_id, CTX)
    start = clock()
    desc = service.enable_key_rotation(key_id, period_days=90)
    assert desc["KeyRotationEnabled"] is True
    assert desc["RotationPeriodInDays"] == 90

    clock.advance(days=89)
    assert service.generate_data_key(key_id, CTX).key_version == 1  # not before the period
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 1

    clock.advance(days=2)  # 91 days after enabling
    assert service.generate_data_key(key_id, CTX).key_version == 2
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 2
    assert service.decrypt(old.ciphertext_blob, CTX).plaintext == old.plaintext

    auto = records_for(service, "RotateKey")
    assert len(auto) == 1
    assert auto[0]["key_id"] == key_id and auto[0]["key_version"] == 2
    assert "automatic" in auto[0]["trigger"]

    # a lazily applied rotation is dated at its scheduled time (day 90), so the
    # schedule does not drift with usage: the next one is due at day 180, not 181
    versions = service.describe_key(key_id)["KeyVersions"]
    assert versions[1]["CreationDate"] == iso_time(start + 90 * 86400)
    clock.advance(days=88.5)  # day 179.5
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 2
    clock.advance(days=1)  # day 180.5
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 3

    # several missed periods give one new version, dated at the latest scheduled time
    clock.advance(days=300)  # day 480.5: rotations were due at 270, 360 and 450
    desc = service.describe_key(key_id)
    assert desc["CurrentKeyVersion"] == 4
    assert desc["KeyVersions"][-1]["CreationDate"] == iso_time(start + 450 * 86400)

    service.disable_key_rotation(key_id)
    clock.advance(days=400)
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 4
    assert len(records_for(service, "RotateKey")) == 3


def test_automatic_rotation_skips_disabled_keys(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    service.enable_key_rotation(key_id, period_days=90)
    service.disable_key(key_id)
    clock.advance(days=100)
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 1
    assert records_for(service, "RotateKey") == []


@pytest.mark.parametrize("period", [0, 1, 89, 2561, 10000])
def test_rotation_period_bounds(service: KeyService, period: int) -> None:
    key_id = new_key(service)
    with pytest.raises(UsageError, match="90 to 2560"):
        service.enable_key_rotation(key_id, period_days=period)
    assert service.describe_key(key_id)["KeyRotationEnabled"] is False


def test_rotation_period_limits_accepted(service: KeyService) -> None:
    for period in (90, 2560):
        key_id = new_key(service)
        assert service.enable_key_rotation(key_id, period_days=period)["RotationPeriodInDays"] == period
