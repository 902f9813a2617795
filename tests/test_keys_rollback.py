"""Key states recorded on the token (encfs.keys.tokenstate): restoring an older keys.json must
not bring a Disabled key, a key pending deletion or destroyed key material back into use.

Each test takes a copy of keys.json (and its .bak), changes the key's state, puts the copy
back, and checks that every use of the key is refused with one line naming the rollback, and
that the refusal is audited.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import KeyStateError
from encfs.keys.service import KeyService, token_object_id
from encfs.keys.token import Token
from tests.conftest import run_encfs
from tests.keys_helpers import CTX, crypto_ops, import_material, new_key


def backup(home: Path) -> dict[str, bytes]:
    return {name: (home / name).read_bytes() for name in ("keys.json", "keys.json.bak")
            if (home / name).exists()}


def restore(home: Path, saved: dict[str, bytes]) -> None:
    for name, data in saved.items():
        (home / name).write_bytes(data)


def assert_refused_as_rollback(service: KeyService, key_id: str, blob: bytes, other: str, what: str) -> None:
    assert service.describe_key(key_id)["KeyState"] == "Enabled"  # what the restored keys.json says
    for name, op in crypto_ops(service, key_id, blob, other).items():
        with pytest.raises(KeyStateError, match="rollback detected") as exc:
            op()
        message = str(exc.value)
        assert "\n" not in message and key_id in message and what in message, (name, message)
    with pytest.raises(KeyStateError, match="rollback detected"):
        service.generate_data_keys(key_id, [CTX, CTX])
    with pytest.raises(KeyStateError, match="rollback detected"):
        service.re_encrypt(service.encrypt(other, b"x", CTX), CTX, key_id)
    flagged = [r for r in service.audit.read() if r.get("rollback_detected")]
    assert flagged and all(r["outcome"] == "failure" and key_id in (r["key_id"], r.get("destination_key_id"))
                           for r in flagged)
    assert {r["operation"] for r in flagged} >= {"Encrypt", "Decrypt", "GenerateDataKey", "ReEncrypt"}


def test_restored_keys_json_does_not_undo_disable(service: KeyService, token: Token) -> None:
    key_id, other = new_key(service), new_key(service)
    service.rotate_key(key_id)  # every version is marked, not only the current one
    old_blob = service.encrypt(key_id, b"payload", CTX)
    saved = backup(service.home)
    service.disable_key(key_id)
    label, usable = token.key_record(token_object_id(key_id, 1)) or ("", True)
    assert label == f"encfs-cmk:{key_id}:v1:Disabled" and not usable
    restore(service.home, saved)
    assert_refused_as_rollback(service, key_id, old_blob, other, "is Disabled on the token")
    assert service.describe_key(key_id)["TokenState"] == "Disabled"
    # an explicit enable is a deliberate decision, and brings the key back
    service.enable_key(key_id)
    assert token.key_record(token_object_id(key_id, 2)) == (f"encfs-cmk:{key_id}:v2", True)
    assert service.decrypt(old_blob, CTX).plaintext == b"payload"


def test_restored_keys_json_does_not_undo_scheduled_deletion(service: KeyService, clock: Any) -> None:
    key_id, other = new_key(service), new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)
    saved = backup(service.home)
    service.schedule_key_deletion(key_id, days=7)
    restore(service.home, saved)
    assert_refused_as_rollback(service, key_id, blob, other, "pending deletion on the token")
    with pytest.raises(KeyStateError, match="cancel-deletion"):
        service.enable_key(key_id)  # enabling would silently cancel the deletion
    with pytest.raises(KeyStateError, match="rollback"):
        service.disable_key(key_id)
    # cancelling works from the token's record, and the key comes back Disabled as in AWS KMS
    assert service.cancel_key_deletion(key_id)["KeyState"] == "Disabled"
    service.enable_key(key_id)
    assert service.decrypt(blob, CTX).plaintext == b"payload"


def test_restored_keys_json_does_not_bring_back_deleted_material(service: KeyService, token: Token,
                                                                  clock: Any) -> None:
    key_id, other = new_key(service), new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)
    saved = backup(service.home)
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    service.list_keys()  # applies the deletion: the material is destroyed
    assert not token.has_object(token_object_id(key_id, 1))
    restore(service.home, saved)
    assert_refused_as_rollback(service, key_id, blob, other, "no key material on the token")
    assert service.describe_key(key_id)["TokenState"] == "Destroyed"


def test_restored_keys_json_does_not_bring_back_deleted_imported_material(service: KeyService) -> None:
    key_id, other = new_key(service, origin="EXTERNAL"), new_key(service)
    import_material(service, key_id, os.urandom(32))
    blob = service.encrypt(key_id, b"payload", CTX)
    saved = backup(service.home)
    service.delete_imported_key_material(key_id)
    restore(service.home, saved)
    ops = crypto_ops(service, key_id, blob, other)
    del ops["rotate"]  # imported keys never rotate
    for name, op in ops.items():
        with pytest.raises(KeyStateError, match="no key material on the token.*rollback detected"):
            op()


def test_rotation_of_a_rolled_back_key_makes_no_usable_version(service: KeyService, token: Token,
                                                               clock: Any) -> None:
    """An automatic rotation due in the restored keys.json creates a version the token refuses too."""
    key_id = new_key(service)
    service.enable_key_rotation(key_id, period_days=90)
    saved = backup(service.home)
    service.disable_key(key_id)
    restore(service.home, saved)
    clock.advance(days=91)
    with pytest.raises(KeyStateError, match="rollback detected"):
        service.encrypt(key_id, b"x", CTX)
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 2  # the rotation ran...
    label, usable = token.key_record(token_object_id(key_id, 2)) or ("", True)
    assert not usable and label.endswith(":Disabled")  # ...but made no usable version


def test_disable_by_another_process_reaches_a_session_copy(service: KeyService, softhsm: Any,
                                                            clock: Any) -> None:
    """generate_data_keys seals under a session copy of the key; a Disable by another connection,
    followed by a restored keys.json, must still stop it (the copy keeps the old attributes)."""
    key_id = new_key(service)
    service.generate_data_keys(key_id, [CTX] * 4)  # makes this connection's copy
    saved = backup(service.home)
    other_token = Token(softhsm.spec())
    other = KeyService(service.home, other_token, clock=clock)
    try:
        other.disable_key(key_id)
    finally:
        other.audit.close()
        other_token.close()
    restore(service.home, saved)
    with pytest.raises(KeyStateError, match="rollback detected"):
        service.generate_data_keys(key_id, [CTX] * 4)


def test_cli_rollback_is_one_line(cli_home: Path) -> None:
    assert run_encfs("hsm", "init", home=cli_home).returncode == 0
    r = run_encfs("key", "create", "--alias", "app", home=cli_home)
    assert r.returncode == 0, r.stderr
    blob = run_encfs("key", "encrypt", "app", input=b"secret", home=cli_home).stdout
    saved = backup(cli_home)
    assert run_encfs("key", "disable", "app", home=cli_home).returncode == 0
    shutil.copy(cli_home / "keys.json", cli_home / "disabled.json")
    restore(cli_home, saved)
    r = run_encfs("key", "decrypt", input=blob, home=cli_home)
    assert r.returncode != 0 and r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs: key ") and "rollback detected" in lines[0], lines


@pytest.mark.parametrize("operation", ["disable", "schedule", "enable", "cancel"])
def test_a_state_change_keys_json_cannot_record_leaves_the_key_as_it_was(
        service: KeyService, token: Token, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """The token is written first; when keys.json then cannot be written (a full disk), the token
    gets its state back: the command failed, and the key is not left refused as "rolled back"."""
    from encfs.errors import StateError
    from encfs.keys import metadata

    key_id = new_key(service)
    if operation == "enable":
        service.disable_key(key_id)
    if operation == "cancel":
        service.schedule_key_deletion(key_id, 7)
    before = token.key_record(token_object_id(key_id, 1))
    state = service.describe_key(key_id)["KeyState"]

    def full(self: object, data: object) -> None:
        raise StateError("cannot write key metadata keys.json: No space left on device")

    monkeypatch.setattr(metadata.KeyStore, "_save", full)
    calls = {"disable": lambda: service.disable_key(key_id), "schedule": lambda: service.schedule_key_deletion(key_id, 7),
             "enable": lambda: service.enable_key(key_id), "cancel": lambda: service.cancel_key_deletion(key_id)}
    with pytest.raises(StateError, match="No space left"):
        calls[operation]()
    monkeypatch.undo()
    assert token.key_record(token_object_id(key_id, 1)) == before
    assert service.describe_key(key_id)["KeyState"] == state
    if state == "Enabled":
        assert service.decrypt(service.encrypt(key_id, b"x", CTX), CTX).plaintext == b"x"  # not a "rollback"


def test_a_token_that_takes_one_version_and_refuses_the_next_is_put_back(
        service: KeyService, token: Token, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disable writes every version's record on the token; when the second write fails, the
    first version gets its state back (it refused its blobs as "rolled back" before), and the
    audit record says so."""
    from encfs.errors import TokenError

    key_id = new_key(service)
    blob = service.encrypt(key_id, b"v1", CTX)
    service.rotate_key(key_id)
    service.rotate_key(key_id)
    real = Token.set_key_record
    writes = []

    def second_fails(self: Token, obj_id: bytes, label: str, usable: bool) -> bool:
        writes.append(obj_id)
        if len(writes) == 2:
            raise TokenError("PKCS#11 C_SetAttributeValue failed: DeviceError")
        return real(self, obj_id, label, usable)

    monkeypatch.setattr(Token, "set_key_record", second_fails)
    with pytest.raises(TokenError):
        service.disable_key(key_id)
    monkeypatch.undo()
    for v in (1, 2, 3):
        assert token.key_record(token_object_id(key_id, v)) == (f"encfs-cmk:{key_id}:v{v}", True)
    assert service.decrypt(blob, CTX).plaintext == b"v1"
    failed = [r for r in service.audit.read() if r["operation"] == "DisableKey"]
    assert failed[-1]["outcome"] == "failure" and failed[-1]["token_state_restored"] is True


def test_the_put_back_runs_before_another_writer_changes_the_key(
        service: KeyService, token: Token, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disable whose keys.json write fails puts the token back under the keys.json lock: a
    deletion scheduled meanwhile by another writer waits for it, and the token ends as keys.json
    says (PendingDeletion), not Enabled."""
    import threading
    import time

    from encfs.errors import StateError
    from encfs.keys import metadata

    key_id = new_key(service)
    other = KeyService(service.home, token, clock=clock)
    real_save, real_put_back = metadata.KeyStore._save, KeyService._put_back
    in_put_back, go = threading.Event(), threading.Event()

    def full(self: Any, data: Any) -> None:
        if threading.current_thread().name == "disable":
            raise StateError("cannot write key metadata keys.json: No space left on device")
        real_save(self, data)

    def slow_put_back(self: KeyService, *args: Any) -> bool:
        in_put_back.set()
        go.wait(10)
        return real_put_back(self, *args)

    monkeypatch.setattr(metadata.KeyStore, "_save", full)
    monkeypatch.setattr(KeyService, "_put_back", slow_put_back)
    errors: list[BaseException] = []
    result: list[Any] = []

    def disable() -> None:
        try:
            service.disable_key(key_id)
        except StateError as e:
            errors.append(e)

    a = threading.Thread(target=disable, name="disable")
    b = threading.Thread(target=lambda: result.append(other.schedule_key_deletion(key_id, 7)), name="schedule")
    a.start()
    try:
        assert in_put_back.wait(10)
        b.start()
        time.sleep(0.5)
        assert not result, "another writer changed the key while the failed disable put the token back"
    finally:
        go.set()
        a.join(10)
        if b.is_alive() or b.ident is not None:
            b.join(10)
        other.audit.close()
    assert len(errors) == 1 and result and result[0]["KeyState"] == "PendingDeletion"
    record = token.key_record(token_object_id(key_id, 1))
    assert record is not None and record[0].startswith(f"encfs-cmk:{key_id}:v1:PendingDeletion"), record


def test_a_rotation_schedule_change_does_not_ask_the_token(service: KeyService, token: Token) -> None:
    """Only the four state changes read the token's records: a rotation schedule's change works
    on a key whose current version the token holds twice (that version's use fails, in one line)."""
    key_id = new_key(service)
    token.generate_aes_key(token_object_id(key_id, 1), "a second object with the same id")
    service.enable_key_rotation(key_id, 90)
    service.disable_key_rotation(key_id)
