"""The nonce budget of a CMK's backing keys (encfs/keys/budget.py, docs/FORMAT.md §2): blobs are
counted per backing-key version in keys.json, a token key rotates before 2^31, an imported key
refuses past its limit. Real SoftHSM2 token (conftest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import KeyStateError
from encfs.keys import budget
from encfs.keys.service import KeyService
from keys_helpers import import_material, new_key, records_for


def sealed(service: KeyService, key: str) -> list[int]:
    return [v.sealed for v in service.store.load().keys[key].versions]


def set_sealed(service: KeyService, key: str, n: int) -> None:
    with service.store.transaction() as db:
        db.keys[key].current.sealed = n


def test_every_blob_is_counted_and_unused_reservations_come_back(service: KeyService, token: Any,
                                                                 tmp_path: Path) -> None:
    key = new_key(service)
    for _ in range(10):
        service.generate_data_key(key, {"n": "1"})
    service.encrypt(key, b"x")
    service.generate_data_keys(key, [{"i": str(i)} for i in range(5)])
    # reservations of 1, 2, 4, 8 (then 16): at most 31 counted while the service is open...
    assert 16 <= sealed(service, key)[0] <= 31
    service.budget.give_back()  # as close() does
    assert sealed(service, key) == [16]
    other = KeyService(tmp_path / "home", token, clock=service.clock)  # another process: its own reservations
    other.encrypt(key, b"y")
    assert sealed(other, key) == [17]  # one blob, reserved exactly: nothing to give back


def test_a_crash_keeps_an_unused_reservation_counted(service: KeyService) -> None:
    key = new_key(service)
    for _ in range(3):
        service.encrypt(key, b"x")  # reservations 1, 2: 3 counted, none left
    service.encrypt(key, b"x")  # reserves 4, uses 1
    assert sealed(service, key) == [7]  # a crash now leaves 7 >= 4 used: the count errs high only


def test_a_token_key_rotates_before_its_budget_is_spent(service: KeyService) -> None:
    key = new_key(service)
    old_blob = service.encrypt(key, b"before", {"c": "1"})
    service.budget.give_back()
    set_sealed(service, key, budget.ROTATE_AT - 1)
    fresh = KeyService(service.home, service.token, clock=service.clock)
    last = fresh.encrypt(key, b"last", {"c": "2"})  # the last seal version 1 may make
    blob = fresh.encrypt(key, b"after", {"c": "2"})
    assert sealed(fresh, key)[0] == budget.ROTATE_AT  # never more under version 1
    assert len(sealed(fresh, key)) == 2
    assert fresh.decrypt(last, {"c": "2"}).key_version == 1
    assert fresh.decrypt(blob, {"c": "2"}).key_version == 2
    assert fresh.decrypt(old_blob, {"c": "1"}).plaintext == b"before"
    (rotation,) = [r for r in records_for(fresh, "RotateKey") if r.get("trigger") == "nonce budget"]
    assert rotation["key_version"] == 2


def test_imported_material_refuses_new_blobs_past_its_limit(service: KeyService) -> None:
    key = new_key(service, origin="EXTERNAL")
    import_material(service, key, os.urandom(32))
    blob = service.encrypt(key, b"x", {"c": "1"})
    service.budget.give_back()
    set_sealed(service, key, budget.SEAL_LIMIT - 1)
    fresh = KeyService(service.home, service.token, clock=service.clock)
    fresh.encrypt(key, b"last")  # the last one the limit allows
    with pytest.raises(KeyStateError, match="nonce budget"):
        fresh.encrypt(key, b"one too many")
    assert fresh.decrypt(blob, {"c": "1"}).plaintext == b"x"  # decrypting never stops
    assert sealed(fresh, key) == [budget.SEAL_LIMIT]
