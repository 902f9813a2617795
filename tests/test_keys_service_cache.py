"""KeyService API on a real SoftHSM2 token: the data-key cache (DataKeyCache): hits that skip the
token and the audit log, its use and age limits, and key states it must not outlive.

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

from typing import Any

import pytest
from keys_helpers import CTX, new_key, records_for

from encfs.errors import ContextMismatch, InvalidCiphertext, KeyNotFound, KeyStateError
from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService

# -- data-key cache ------------------------------------------------------------


class MonoClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cache_hits_skip_token_and_audit(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    first = service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert first.plaintext == dk.plaintext
    assert cache.hits == 0
    n_decrypt = len(records_for(service, "Decrypt"))
    assert n_decrypt == 1
    for i in range(5):
        again = service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        assert again.plaintext == dk.plaintext
        assert (again.key_id, again.key_version) == (key_id, 1)
        assert cache.hits == i + 1
    assert len(records_for(service, "Decrypt")) == n_decrypt
    # a different context is a different entry and is checked on the token
    with pytest.raises(ContextMismatch):
        service.decrypt(dk.ciphertext_blob, {"other": "ctx"}, cache=cache)
    # insisting on the wrong key is refused even with a cached entry
    other = new_key(service)
    with pytest.raises(InvalidCiphertext):
        service.decrypt(dk.ciphertext_blob, CTX, key=other, cache=cache)


def test_cache_max_uses(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache(max_uses=3)
    for _ in range(7):
        assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    # 1 unwrap + 2 hits, 1 unwrap + 2 hits, 1 unwrap
    assert len(records_for(service, "Decrypt")) == 3
    assert cache.hits == 4


def test_cache_max_age(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    mono = MonoClock()
    cache = DataKeyCache(max_age=60, clock=mono)
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    mono.t += 59
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 1
    assert len(records_for(service, "Decrypt")) == 1
    mono.t += 1  # 60 s after the unwrap: expired
    assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    assert cache.hits == 1
    assert len(records_for(service, "Decrypt")) == 2
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 2


def test_cache_respects_key_state(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 1
    service.disable_key(key_id)
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    fail = [r for r in records_for(service, "Decrypt") if r["outcome"] == "failure"]
    assert len(fail) == 1 and "disabled" in fail[0]["error"]
    service.enable_key(key_id)
    assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    service.schedule_key_deletion(key_id, days=7)
    with pytest.raises(KeyStateError, match="pending deletion"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)


def test_cache_entry_of_deleted_key_is_not_served(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    with pytest.raises(KeyNotFound, match="deleted"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert len(cache) == 0
    fail = [r for r in records_for(service, "Decrypt") if r["outcome"] == "failure"]
    assert len(fail) == 1 and fail[0]["key_id"] == key_id


def test_cache_sees_state_changes_made_by_another_service_instance(service: KeyService, token: Any,
                                                                  clock: Any) -> None:
    """Another KeyService on the same home (as another process would be) disables the key."""
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    other = KeyService(service.home, token, clock=clock)
    try:
        other.disable_key(key_id)
    finally:
        other.audit.close()
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)


def test_cache_limits_validated() -> None:
    for kw in ({"max_age": 0}, {"max_uses": 0}, {"max_entries": 0}):
        with pytest.raises(ValueError):
            DataKeyCache(**kw)


def test_generate_data_key_can_seed_the_cache(service: KeyService) -> None:
    from encfs.keys.cache import DataKeyCache

    key = service.create_key()["KeyId"]
    cache = DataKeyCache()
    dk = service.generate_data_key(key, {"f": "1"}, cache=cache)
    before = sum(1 for r in service.audit.read() if r["operation"] == "Decrypt")
    assert service.decrypt(dk.ciphertext_blob, {"f": "1"}, cache=cache).plaintext == dk.plaintext
    assert sum(1 for r in service.audit.read() if r["operation"] == "Decrypt") == before  # no token call
    assert cache.hits == 1
    service.disable_key(key)
    with pytest.raises(KeyStateError):
        service.decrypt(dk.ciphertext_blob, {"f": "1"}, cache=cache)
