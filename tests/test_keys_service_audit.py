"""KeyService API on a real SoftHSM2 token: the audit log (every call, validation failures, never a
secret) and the metadata file keys.json (dead writers' temporaries, maintenance computed once per
version).

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from keys_helpers import CTX, audit_records, import_material, new_key, records_for

from encfs.errors import ContextMismatch, KeyNotFound, KeyStateError, StateError, UsageError
from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService

# -- audit -------------------------------------------------------------------


def test_audit_records_every_call(service: KeyService, clock: Any) -> None:
    key_id = new_key(service, alias="audited")
    other = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    service.decrypt(dk.ciphertext_blob, CTX)
    blob = service.encrypt(key_id, b"p", CTX)
    service.re_encrypt(blob, CTX, other)
    service.describe_key("audited")
    service.list_keys()
    service.rotate_key(key_id)
    service.disable_key(key_id)
    with pytest.raises(KeyStateError):
        service.encrypt(key_id, b"p", CTX)
    with pytest.raises(ContextMismatch):
        service.decrypt(service.encrypt(other, b"q", CTX), {"wrong": "ctx"})
    with pytest.raises(KeyNotFound):
        service.describe_key("alias/missing")
    service.enable_key(key_id)
    service.schedule_key_deletion(other, days=7)
    service.cancel_key_deletion(other)

    recs = audit_records(service)
    for r in recs:
        assert r["outcome"] in ("success", "failure")
        assert r["principal"]["uid"] == os.getuid()
        assert r["principal"]["pid"] == os.getpid()
        assert r["time"].endswith("Z")
        if r["outcome"] == "failure":
            assert r["error"]
        else:
            assert "error" not in r
    ops = [r["operation"] for r in recs]
    for op in ("CreateKey", "GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt", "DescribeKey", "ListKeys",
               "RotateKeyOnDemand", "DisableKey", "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion"):
        assert op in ops, op
    by_op = {}
    for r in recs:
        by_op.setdefault(r["operation"], []).append(r)
    gdk = by_op["GenerateDataKey"][0]
    assert (gdk["key_id"], gdk["key_version"], gdk["encryption_context"]) == (key_id, 1, CTX)
    assert by_op["CreateKey"][0]["key_id"] == key_id
    enc_fail = [r for r in by_op["Encrypt"] if r["outcome"] == "failure"]
    assert len(enc_fail) == 1 and enc_fail[0]["key_id"] == key_id and "disabled" in enc_fail[0]["error"]
    dec_fail = [r for r in by_op["Decrypt"] if r["outcome"] == "failure"]
    assert len(dec_fail) == 1 and dec_fail[0]["key_id"] == other
    assert dec_fail[0]["encryption_context"] == {"wrong": "ctx"}
    desc_fail = [r for r in by_op["DescribeKey"] if r["outcome"] == "failure"]
    assert len(desc_fail) == 1 and "missing" in desc_fail[0]["error"]
    assert by_op["ScheduleKeyDeletion"][0]["key_id"] == other


def test_audit_records_validation_failures(service: KeyService) -> None:
    """Calls rejected for bad arguments are audited as failures too."""
    key_id = new_key(service)
    attempts = [
        ("ScheduleKeyDeletion", lambda: service.schedule_key_deletion(key_id, days=3)),
        ("EnableKeyRotation", lambda: service.enable_key_rotation(key_id, period_days=10)),
        ("GenerateDataKey", lambda: service.generate_data_key(key_id, number_of_bytes=0)),
        ("GetParametersForImport", lambda: service.get_parameters_for_import(key_id, "RSA_NONE")),
        ("CreateKey", lambda: service.create_key(origin="BOGUS")),
    ]
    for op, call in attempts:
        before = len(records_for(service, op))
        with pytest.raises(UsageError) as exc:
            call()
        recs = records_for(service, op)
        assert len(recs) == before + 1, op
        assert recs[-1]["outcome"] == "failure"
        assert recs[-1]["error"] == exc.value.message


def test_audit_log_never_contains_secrets(service: KeyService, tmp_path: Path) -> None:
    key_id = new_key(service)
    secrets: list[bytes] = []
    cache = DataKeyCache()
    for n in (16, 32, 64):
        dk = service.generate_data_key(key_id, CTX, number_of_bytes=n)
        assert dk.plaintext is not None
        secrets.append(dk.plaintext)
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        service.re_encrypt(dk.ciphertext_blob, CTX, key_id)
    no_pt = service.generate_data_key(key_id, CTX, with_plaintext=False)
    secrets.append(service.decrypt(no_pt.ciphertext_blob, CTX).plaintext)
    messages = [b"TOP-SECRET-PAYLOAD-" + os.urandom(8).hex().encode(), os.urandom(200)]
    for m in messages:
        blob = service.encrypt(key_id, m, CTX)
        service.decrypt(blob, CTX)
        with pytest.raises(ContextMismatch):
            service.decrypt(blob, {"bad": "ctx"})
    with pytest.raises(UsageError):
        service.encrypt(key_id, messages[0] * 300, CTX)
    ext = new_key(service, origin="EXTERNAL")
    material = os.urandom(32)
    import_material(service, ext, material)
    secrets.append(material)

    raw = (service.home / "audit.log").read_bytes()
    assert raw.count(b"\n") >= 20
    for line in raw.splitlines():
        json.loads(line)
    for s in secrets:
        for form in (s, s.hex().encode(), s.hex().upper().encode(), base64.b64encode(s),
                     base64.urlsafe_b64encode(s), base64.b64encode(s).rstrip(b"=")):
            assert form not in raw
    for m in messages:
        for form in (m, m.hex().encode(), base64.b64encode(m)):
            assert form not in raw
    # sanity: the search above would have found what it looks for
    assert key_id.encode() in raw


# -- the metadata file (keys.json) -------------------------------------------


def test_a_killed_writers_temporary_copy_is_removed_by_the_next_write(service: KeyService) -> None:
    """A writer killed between writing keys.json.tmp.PID (or the copy's) and renaming it leaves
    that file; the next writer, under the lock, removes those of dead processes only."""
    import subprocess
    import sys

    service.create_key(alias="first")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    home = service.store.path.parent
    dead = [home / f"keys.json.tmp.{gone}", home / f"keys.json.bak.tmp.{gone}"]
    live = home / "keys.json.bak.tmp.1"  # pid 1 is alive: its copy is not ours to remove
    for p in (*dead, live):
        p.write_bytes(b"{}")
    service.create_key(alias="second")
    assert not any(p.exists() for p in dead) and live.exists()


def test_a_dead_writers_temporary_that_cannot_be_removed_is_a_state_error(service: KeyService) -> None:
    """A leftover temporary the next writer cannot remove (here a directory in its place) is one
    line naming it, and no change is made, rather than an OSError escaping the store."""
    import subprocess
    import sys

    service.create_key(alias="first")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stuck = service.store.path.parent / f"keys.json.bak.tmp.{gone}"
    stuck.mkdir()
    before = service.store.path.read_bytes()
    with pytest.raises(StateError) as exc:
        service.create_key(alias="second")
    assert str(exc.value) == f"cannot remove a dead writer's temporary key metadata {stuck}: Is a directory"
    assert service.store.path.read_bytes() == before
    stuck.rmdir()
    service.create_key(alias="second")


def test_maintenance_due_is_computed_once_per_metadata_version(service: KeyService, clock: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every data-key operation asks when maintenance is next due; the walk over the keys runs once
    per version of keys.json, and a change (a deletion scheduled) is seen by the next call."""
    from encfs.keys import metadata

    key, other = new_key(service), new_key(service)
    blob = service.encrypt(key, b"x")
    walks = []
    real = metadata.KeyDB.next_event
    monkeypatch.setattr(metadata.KeyDB, "next_event", lambda db: walks.append(1) or real(db))
    for _ in range(20):
        service.decrypt(blob)
    assert len(walks) <= 1
    service.schedule_key_deletion(other, days=7)
    clock.advance(days=8)
    service.decrypt(blob)  # the first call after the window ends deletes the other key
    assert other not in {k["KeyId"] for k in service.list_keys()}
