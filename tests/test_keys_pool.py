"""Batched data keys: KeyService.generate_data_keys and DataKeyPool, on the real SoftHSM2 token."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pkcs11 import Attribute

from encfs.errors import KeyStateError, UsageError
from encfs.keys.cache import DataKeyCache
from encfs.keys.context import encode_context
from encfs.keys.pool import DataKeyPool
from encfs.keys.service import KeyService, token_object_id


def _key(service: KeyService) -> str:
    return service.create_key(description="pool")["KeyId"]


def _labels() -> Any:
    def new_label() -> tuple[bytes, dict[str, str]]:
        label = os.urandom(16)
        return label, {"purpose": "test", "object": label.hex()}
    return new_label


def _records(service: KeyService, operation: str) -> list[dict[str, Any]]:
    return [r for r in service.audit.read() if r["operation"] == operation]


def test_generate_data_keys_gives_independent_bound_keys_and_one_audit_record_each(service: KeyService) -> None:
    key_id = _key(service)
    contexts = [{"n": str(i)} for i in range(5)]
    keys = service.generate_data_keys(key_id, contexts)
    assert len(keys) == 5
    assert len({k.plaintext for k in keys}) == 5 and all(len(k.plaintext or b"") == 32 for k in keys)
    for ctx, dk in zip(contexts, keys):
        assert service.decrypt(dk.ciphertext_blob, ctx).plaintext == dk.plaintext
    with pytest.raises(Exception, match="context"):  # bound to its own context, not a neighbour's
        service.decrypt(keys[0].ciphertext_blob, contexts[1])
    records = _records(service, "GenerateDataKey")
    assert [r["encryption_context"] for r in records] == contexts
    assert all(r["key_id"] == key_id and r["outcome"] == "success" for r in records)
    assert not any(k.plaintext.hex() in str(records) for k in keys if k.plaintext)  # no key material
    service.generate_data_key(key_id, {"n": "single"})
    single = _records(service, "GenerateDataKey")[-1]
    for r in records:  # each batched record reads exactly like a separate call's
        assert r.keys() == single.keys()
        assert {k: v for k, v in r.items() if k not in ("time", "encryption_context")} == \
            {k: v for k, v in single.items() if k not in ("time", "encryption_context")}


def test_generate_data_keys_refuses_a_disabled_key_and_audits_each_failure(service: KeyService) -> None:
    key_id = _key(service)
    service.disable_key(key_id)
    with pytest.raises(KeyStateError, match="disabled"):
        service.generate_data_keys(key_id, [{"n": "1"}, {"n": "2"}])
    failures = [r for r in _records(service, "GenerateDataKey") if r["outcome"] == "failure"]
    assert [r["encryption_context"] for r in failures] == [{"n": "1"}, {"n": "2"}]
    with pytest.raises(UsageError):
        service.generate_data_keys(_key(service), [{"n": "1"}], number_of_bytes=0)


def test_pool_hands_out_each_key_once_bound_to_its_label(service: KeyService) -> None:
    key_id = _key(service)
    cache = DataKeyCache()
    pool = DataKeyPool(service, key_id, _labels(), batch=4, cache=cache)
    taken = [pool.take() for _ in range(10)]
    assert len({label for label, _ in taken}) == 10
    assert len({dk.plaintext for _, dk in taken}) == 10
    for label, dk in taken:
        ctx = {"purpose": "test", "object": label.hex()}
        assert service.decrypt(dk.ciphertext_blob, ctx).plaintext == dk.plaintext
        assert cache.get(dk.ciphertext_blob, encode_context(ctx)) is not None  # seeded for the first open
    # three batches of four: the token was asked three times, each key audited once
    assert len(_records(service, "GenerateDataKey")) == 12


def test_pool_stops_handing_out_keys_once_the_cmk_is_disabled(service: KeyService) -> None:
    key_id = _key(service)
    pool = DataKeyPool(service, key_id, _labels(), batch=8)
    pool.take()  # seven keys wait in the pool
    service.disable_key(key_id)
    with pytest.raises(KeyStateError, match="disabled"):
        pool.take()
    service.enable_key(key_id)
    assert pool.take()[1].key_id == key_id


def test_pool_follows_rotation_and_drops_old_keys(service: KeyService, clock: Any) -> None:
    key_id = _key(service)
    pool = DataKeyPool(service, key_id, _labels(), batch=8, max_age=60, clock=clock)
    assert pool.take()[1].key_version == 1
    service.rotate_key(key_id)
    assert pool.take()[1].key_version == 2  # the pooled version-1 keys were dropped
    before = len(_records(service, "GenerateDataKey"))
    pool.take()
    assert len(_records(service, "GenerateDataKey")) == before  # served from the pool
    clock.advance(61)
    pool.take()
    assert len(_records(service, "GenerateDataKey")) == before + 8  # too old: a new batch


def _session_copies(token: Any, obj_id: bytes) -> list[Any]:
    with token._locked("find") as session:
        return list(session.get_objects({Attribute.ID: b"encfs-session-copy:" + obj_id}))


def test_batches_wrap_under_a_sensitive_session_copy_that_goes_with_the_key(service: KeyService,
                                                                            token: Any) -> None:
    key_id = _key(service)
    tid = token_object_id(key_id, 1)
    contexts = [{"n": str(i)} for i in range(3)]
    keys = service.generate_data_keys(key_id, contexts)
    (copy,) = _session_copies(token, tid)
    assert copy[Attribute.TOKEN] is False and copy[Attribute.SENSITIVE] is True
    assert copy[Attribute.EXTRACTABLE] is False and copy[Attribute.NEVER_EXTRACTABLE] is True
    for ctx, dk in zip(contexts, keys):  # Decrypt uses the token object: the copy is the same key
        assert service.decrypt(dk.ciphertext_blob, ctx).plaintext == dk.plaintext
    service.generate_data_keys(key_id, [{"n": "again"}])
    assert len(_session_copies(token, tid)) == 1  # one per key version and session
    assert token.has_object(tid) and token.destroy(tid) == 1  # its own CKA_ID: never counted as the key
    assert _session_copies(token, tid) == []  # destroyed with the key
    with pytest.raises(KeyStateError, match="no key material on the token"):
        service.generate_data_keys(key_id, contexts)
