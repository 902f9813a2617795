"""The Secrets Manager of encfs (issue #24): encfs/keyd/secretstore.py on a real SoftHSM2 token, and
`encfs secret ...` through the real CLI. Stages after put and rotate, version selection, tampered and
moved values (refused, exit 65, never a wrong value), deletion windows and their lazy purge, and no
value in the audit log."""

from __future__ import annotations

import base64
import json
import string
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, init_home, run_encfs

from encfs.errors import (
    InvalidCiphertext,
    KeyNotFound,
    KeyStateError,
    SecretNotFound,
    SecretStateError,
    StateError,
    UsageError,
)
from encfs.keyd import secretdoc, secretstore
from encfs.keyd.secretstore import SecretStore, random_password
from encfs.keys.service import KeyService

VALUE = b"correct horse battery staple 7f3a"  # searched for in logs and files: unique on purpose


@pytest.fixture
def store(service: KeyService, clock: FakeClock) -> SecretStore:
    service.create_key(alias="encfs/secrets")
    return SecretStore(service.home, service, clock)


def doc_path(store: SecretStore, name: str) -> Path:
    return store.dir / secretdoc.file_name(name)


def load(store: SecretStore, name: str) -> dict[str, Any]:
    return json.loads(doc_path(store, name).read_bytes())


def save(store: SecretStore, name: str, doc: dict[str, Any]) -> None:
    doc_path(store, name).write_text(json.dumps(doc))


def stages(store: SecretStore, name: str) -> dict[str, list[str]]:
    return {v["VersionId"]: v["VersionStages"] for v in store.describe(name)["Versions"]}


def flip(b64: str, at: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# -- stages and versions --------------------------------------------------------------


def test_put_moves_current_to_the_new_version_and_previous_to_the_old(store: SecretStore) -> None:
    v1 = store.create("db/password", b"one")["VersionId"]
    v2 = store.put("db/password", b"two")["VersionId"]
    assert stages(store, "db/password") == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    v3 = store.put("db/password", b"three")["VersionId"]
    assert stages(store, "db/password") == {v1: [], v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    assert store.get("db/password")["SecretString"] == "three"
    assert store.get("db/password", version_stage="AWSPREVIOUS")["SecretString"] == "two"
    assert store.get("db/password", version_id=v1)["SecretString"] == "one"
    assert store.get("db/password", version_id=v2, version_stage="AWSPREVIOUS")["VersionId"] == v2
    with pytest.raises(SecretNotFound, match="is not staged AWSCURRENT"):
        store.get("db/password", version_id=v2, version_stage="AWSCURRENT")
    with pytest.raises(SecretNotFound, match="no version staged AWSPENDING"):
        store.get("db/password", version_stage="AWSPENDING")
    with pytest.raises(SecretNotFound, match="has no version"):
        store.get("db/password", version_id="00000000-0000-4000-8000-000000000000")


def test_a_version_put_with_other_stages_leaves_current_where_it_is(store: SecretStore) -> None:
    v1 = store.create("s", b"one")["VersionId"]
    v2 = store.put("s", b"two", ["blue"])["VersionId"]
    assert stages(store, "s") == {v1: ["AWSCURRENT"], v2: ["blue"]}
    assert store.get("s", version_stage="blue")["SecretString"] == "two"
    v3 = store.put("s", b"three", ["blue"])["VersionId"]
    assert stages(store, "s") == {v1: ["AWSCURRENT"], v2: [], v3: ["blue"]}


def test_rotate_makes_a_random_current_version_and_keeps_the_old_as_previous(store: SecretStore) -> None:
    v1 = store.create("api", b"old")["VersionId"]
    v2 = store.rotate("api")["VersionId"]
    assert stages(store, "api") == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    new = store.get("api")["SecretString"]
    assert len(new) == 32 and new != "old"
    assert "LastRotatedDate" in store.describe("api")
    v3 = store.rotate("api", b"chosen")["VersionId"]
    assert stages(store, "api") == {v1: [], v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    assert store.get("api")["SecretString"] == "chosen"


def test_rotate_finishes_a_rotation_cut_short_with_its_pending_version(store: SecretStore) -> None:
    v1 = store.create("api", b"old")["VersionId"]
    pending = store.put("api", b"set in the database already", ["AWSPENDING"])["VersionId"]
    assert store.rotate("api")["VersionId"] == pending
    assert stages(store, "api") == {v1: ["AWSPREVIOUS"], pending: ["AWSCURRENT"]}
    assert store.get("api")["SecretString"] == "set in the database already"


def test_random_password_is_32_characters_of_each_kind() -> None:
    for _ in range(20):
        pw = random_password()
        assert len(pw) == 32
        for kind in (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation):
            assert any(c in kind for c in pw)


def test_old_versions_without_a_stage_are_pruned(store: SecretStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secretstore, "MAX_VERSIONS", 4)
    first = store.create("s", b"v0")["VersionId"]
    store.put("s", b"keep", ["pinned"])
    ids = [store.put("s", f"v{i}".encode())["VersionId"] for i in range(1, 6)]
    kept = stages(store, "s")
    assert len(kept) == 4 and first not in kept  # the oldest unstaged went first
    assert set(kept) == {*[k for k, s in kept.items() if s == ["pinned"]], ids[-3], ids[-2], ids[-1]}
    assert store.get("s", version_stage="pinned")["SecretString"] == "keep"


def test_binary_values_come_back_as_secret_binary(store: SecretStore) -> None:
    store.create("bin", b"\xff\x00\xfe")
    assert store.get("bin")["SecretBinary"] == b"\xff\x00\xfe"
    assert "SecretString" not in store.get("bin")


# -- names, keys and limits ---------------------------------------------------------------------


def test_names_are_checked_and_never_make_a_path_outside_the_directory(store: SecretStore) -> None:
    for bad in ("", "a b", "x" * 513, "semi;colon", "ünï"):
        with pytest.raises(UsageError, match="secret name"):
            store.create(bad, VALUE)
    name = "../../" + "x" * 506
    store.create(name, b"v")
    assert [p.name for p in store.dir.iterdir() if p.suffix == ".json"] == [secretdoc.file_name(name)]
    assert store.get(name)["SecretString"] == "v"


def test_a_secret_is_sealed_under_the_key_given_or_alias_encfs_secrets(service: KeyService, clock: FakeClock) -> None:
    store = SecretStore(service.home, service, clock)
    with pytest.raises(KeyNotFound, match="alias/encfs/secrets"):
        store.create("s", VALUE)
    assert not list(store.dir.glob("*.json"))
    other = service.create_key(alias="other")["KeyId"]
    assert store.create("s", VALUE, key="alias/other")["KmsKeyId"] == other
    assert store.key_of("s") == other == store.describe("s")["KmsKeyId"]
    default = service.create_key(alias="encfs/secrets")["KeyId"]
    assert store.create("t", VALUE)["KmsKeyId"] == default
    service.disable_key(other)  # the CMK's state rules its secrets' values
    with pytest.raises(KeyStateError):
        store.get("s")
    with pytest.raises(KeyStateError):
        store.put("s", b"new")


def test_create_refuses_an_existing_name_and_values_out_of_bounds(store: SecretStore) -> None:
    store.create("s", VALUE)
    with pytest.raises(UsageError, match="already exists"):
        store.create("s", VALUE)
    with pytest.raises(UsageError, match="1 to 65536 bytes"):
        store.put("s", b"")
    with pytest.raises(UsageError, match="1 to 65536 bytes"):
        store.put("s", b"x" * 65537)
    store.put("s", b"x" * 65536)
    for bad in ([], ["two words"], ["x" * 257], [f"s{i}" for i in range(21)]):
        with pytest.raises(UsageError, match="stage"):
            store.put("s", VALUE, bad)
    with pytest.raises(SecretNotFound):
        store.put("missing", VALUE)


# -- tampering and moved values -------------------------------------------------------------


@pytest.mark.parametrize("field,at", [("sealed_value", 0), ("sealed_value", 5), ("sealed_value", 20),
                                      ("sealed_value", -1), ("wrapped_key", 50), ("wrapped_key", -1)])
def test_a_flipped_byte_is_refused_never_a_wrong_value(store: SecretStore, field: str, at: int) -> None:
    store.create("s", VALUE)
    doc = load(store, "s")
    doc["versions"][0][field] = flip(doc["versions"][0][field], at)
    save(store, "s", doc)
    with pytest.raises(InvalidCiphertext) as e:
        store.get("s")
    assert VALUE.decode() not in str(e.value) and "s version" in str(e.value)


def test_a_version_moved_to_another_secret_or_version_is_refused(store: SecretStore) -> None:
    store.create("a", b"value of a")
    store.create("b", b"value of b")
    store.put("b", b"second of b")
    a, b = load(store, "a"), load(store, "b")
    whole = dict(a["versions"][0], version_id=b["versions"][1]["version_id"], stages=["AWSCURRENT"])
    save(store, "b", dict(b, versions=[b["versions"][0], whole]))  # wrapped key and value, under b's id
    with pytest.raises(InvalidCiphertext, match="secret b version .*encryption context does not match"):
        store.get("b")
    value_only = dict(b["versions"][1], sealed_value=a["versions"][0]["sealed_value"])
    save(store, "b", dict(b, versions=[b["versions"][0], value_only]))  # b's data key, a's value
    with pytest.raises(InvalidCiphertext, match="failed authentication"):
        store.get("b")
    swapped = [dict(b["versions"][0], version_id=b["versions"][1]["version_id"], stages=["AWSCURRENT"]),
               dict(b["versions"][1], version_id=b["versions"][0]["version_id"], stages=["AWSPREVIOUS"])]
    save(store, "b", dict(b, versions=swapped))  # two versions of one secret trade their ids
    with pytest.raises(InvalidCiphertext):
        store.get("b")
    save(store, "b", b)
    assert store.get("b")["SecretString"] == "second of b"


def test_a_damaged_or_misplaced_file_is_one_line_naming_it(store: SecretStore) -> None:
    store.create("a", VALUE)
    store.create("b", VALUE)
    path = doc_path(store, "a")
    path.write_bytes(path.read_bytes()[:40])
    for call in (lambda: store.get("a"), store.list):
        with pytest.raises(StateError, match=f"secret file {path} is damaged"):
            call()
    path.write_bytes(doc_path(store, "b").read_bytes())  # b's document under a's file name
    with pytest.raises(StateError, match="names another secret"):
        store.describe("a")


# -- deletion -----------------------------------------------------------------------------------


def test_deletion_is_refused_in_its_window_restorable_and_purged_after(store: SecretStore, clock: FakeClock) -> None:
    store.create("s", VALUE)
    with pytest.raises(UsageError, match="7 to 30 days"):
        store.delete("s", 6)
    deleted = store.delete("s", 7)
    assert store.describe("s")["DeletedDate"] == deleted["DeletionDate"]
    with pytest.raises(SecretStateError, match="scheduled for deletion on .*encfs secret restore s"):
        store.get("s")
    with pytest.raises(SecretStateError):
        store.put("s", b"x")
    with pytest.raises(SecretStateError, match="already scheduled"):
        store.delete("s")
    with pytest.raises(SecretStateError, match="scheduled for deletion"):
        store.create("s", VALUE)
    store.restore("s")
    assert store.get("s")["SecretString"] == VALUE.decode()
    with pytest.raises(SecretStateError, match="not scheduled"):
        store.restore("s")
    store.delete("s", 7)
    clock.advance(days=7, seconds=-1)
    assert [e["Name"] for e in store.list()] == ["s"]
    clock.advance(2)
    assert doc_path(store, "s").exists()  # purged lazily: by the first call that finds it due
    with pytest.raises(SecretNotFound):
        store.get("s")
    assert not doc_path(store, "s").exists()
    purges = [r for r in store.keys.audit.read() if r.get("trigger") == "recovery window ended"]
    assert [(r["operation"], r["secret_name"]) for r in purges] == [("DeleteSecret", "s")]
    store.create("s", b"a new secret of that name")


def test_list_purges_what_is_due_and_force_deletes_at_once(store: SecretStore, clock: FakeClock) -> None:
    for name in ("a", "b", "c"):
        store.create(name, VALUE)
    store.delete("a", 7)
    store.delete("b", force=True)
    assert not doc_path(store, "b").exists()
    assert [e["Name"] for e in store.list()] == ["a", "c"]
    clock.advance(days=8)
    assert [e["Name"] for e in store.list()] == ["c"]
    assert not doc_path(store, "a").exists()


# -- the audit trail -------------------------------------------------------------------------------


def test_every_call_is_audited_without_the_value(store: SecretStore) -> None:
    v1 = store.create("s", VALUE)["VersionId"]
    store.put("s", VALUE + b"2")
    store.get("s", version_id=v1)
    store.rotate("s", VALUE + b"3")
    store.describe("s")
    store.list()
    store.delete("s")
    with pytest.raises(SecretStateError):
        store.get("s")
    store.restore("s")
    records = list(store.keys.audit.read())
    ops = [r["operation"] for r in records if "secret_name" in r or r["operation"] == "ListSecrets"]
    assert ops == ["CreateSecret", "PutSecretValue", "GetSecretValue", "RotateSecret", "DescribeSecret", "ListSecrets",
                   "DeleteSecret", "GetSecretValue", "RestoreSecret"]
    get = next(r for r in records if r["operation"] == "GetSecretValue")
    assert get["version_id"] == v1 and get["key_id"] == store.key_of("s") and get["outcome"] == "success"
    kms = [r for r in records if r["operation"] in ("GenerateDataKey", "Decrypt")]
    assert {r["encryption_context"]["encfs:secret"] for r in kms} == {"s"}
    text = store.keys.audit.path.read_bytes()
    assert VALUE not in text and base64.b64encode(VALUE) not in text


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def secret_home(cli_home: Path) -> Path:
    init_home(cli_home)
    assert run_encfs("key", "create", "--alias", "encfs/secrets", home=cli_home).returncode == 0
    return cli_home


def ok(*args: str, home: Path, input: bytes = b"") -> bytes:
    proc = run_encfs(*args, home=home, input=input)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_put_get_rotate_list_describe(secret_home: Path, tmp_path: Path) -> None:
    home = secret_home
    created = json.loads(ok("secret", "put", "app/db", "--description", "the db", "--json", home=home, input=VALUE))
    assert ok("secret", "put", "app/db", home=home, input=b"second\n").startswith(b"app/db: version ")
    assert ok("secret", "get", "app/db", home=home) == b"second\n"  # raw, byte for byte
    assert ok("secret", "get", "app/db", "--version-stage", "AWSPREVIOUS", home=home) == VALUE
    assert ok("secret", "get", "app/db", "--version-id", created["VersionId"], home=home) == VALUE
    (tmp_path / "v").write_bytes(b"\x00\xffrotated")
    rotated = json.loads(ok("secret", "rotate", "app/db", "--secret-string-file", str(tmp_path / "v"), "--json",
                            home=home))
    got = json.loads(ok("secret", "get", "app/db", "--json", home=home))
    assert got["VersionId"] == rotated["VersionId"] and got["VersionStages"] == ["AWSCURRENT"]
    assert base64.b64decode(got["SecretBinary"]) == b"\x00\xffrotated"
    described = json.loads(ok("secret", "describe", "app/db", "--json", home=home))
    assert described["Description"] == "the db" and len(described["Versions"]) == 3
    assert described["VersionIdsToStages"][rotated["VersionId"]] == ["AWSCURRENT"]
    listed = json.loads(ok("secret", "list", "--json", home=home))["SecretList"]
    assert [s["Name"] for s in listed] == ["app/db"] and "Versions" not in listed[0]
    refused = run_encfs("secret", "put", "app/db", "--kms-key-id", "alias/other", home=home, input=b"x")
    assert refused.returncode == 2 and b"--kms-key-id applies to a new secret" in refused.stderr


def test_cli_delete_restore_and_exit_codes(secret_home: Path) -> None:
    home = secret_home
    ok("secret", "create", "s", home=home, input=VALUE)
    missing = run_encfs("secret", "get", "nope", home=home)
    assert missing.returncode == 66 and missing.stderr == b"encfs: no secret named 'nope'\n"
    assert b"scheduled for deletion on" in ok("secret", "delete", "s", "--recovery-window-in-days", "7", home=home)
    refused = run_encfs("secret", "get", "s", home=home)
    assert refused.returncode == 78 and refused.stdout == b""
    assert refused.stderr.startswith(b"encfs: secret s is scheduled for deletion on ") and refused.stderr.count(b"\n") == 1
    ok("secret", "restore", "s", home=home)
    assert ok("secret", "get", "s", home=home) == VALUE
    ok("secret", "delete", "s", "--force-delete-without-recovery", home=home)
    assert run_encfs("secret", "describe", "s", home=home).returncode == 66
    audit = (home / "audit.log").read_bytes()
    assert b"GetSecretValue" in audit and VALUE not in audit


def test_cli_tampered_or_moved_value_is_exit_65_and_no_value(secret_home: Path) -> None:
    home = secret_home
    ok("secret", "put", "a", home=home, input=b"value of a")
    ok("secret", "put", "b", home=home, input=b"value of b")
    path_a, path_b = (home / "secrets" / secretdoc.file_name(n) for n in ("a", "b"))
    a, b = json.loads(path_a.read_bytes()), json.loads(path_b.read_bytes())
    moved = dict(b, versions=[dict(a["versions"][0], version_id=b["versions"][0]["version_id"])])
    path_b.write_text(json.dumps(moved))
    proc = run_encfs("secret", "get", "b", home=home)
    assert proc.returncode == 65 and proc.stdout == b"" and proc.stderr.count(b"\n") == 1, proc.stderr
    a["versions"][0]["sealed_value"] = flip(a["versions"][0]["sealed_value"], 30)
    path_a.write_text(json.dumps(a))
    proc = run_encfs("secret", "get", "a", home=home)
    assert proc.returncode == 65 and proc.stdout == b"" and b"failed authentication" in proc.stderr
    assert b"value of" not in proc.stderr
