"""A real `encfs keyd` and clients that are other unix users: policies, grants, roles and the audit
trail of them, through the real CLI (issue #24)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keyd_rig import home_with_key, keyd, stop
from keyd_users import UnixUser, UnixUsers, run_as, temporary_users, user_python_fixture  # noqa: F401


class World:
    """A daemon run by root, its socket in a directory every user can reach, and users."""

    def __init__(self, root: Path, home: Path, users: UnixUsers, python: Any) -> None:
        self.root, self.home, self.users, self.python = root, home, users, python
        self.sock = root / "keyd.sock"
        self.group = users.group()
        self.alice = users.create()
        self.bob = users.create(supplementary=[self.group])
        self.carol = users.create()
        self.dave = users.create()

    def restart(self, roles: str | None = None) -> None:
        """Stop the daemon (if one runs) and start it again, with ``roles`` as its keyd.toml (None:
        none); the module's fixture stops the last one."""
        if getattr(self, "proc", None) is not None:
            stop(self.proc)
        toml = self.home / "keyd.toml"
        if roles is None:
            toml.unlink(missing_ok=True)
        else:
            toml.write_text(roles)
        self.proc = self.daemons.enter_context(keyd(self.home, self.sock))

    def encfs(self, user: UnixUser | None, *args: str, input: bytes = b"") -> Any:
        """`encfs ARGS --keyd SOCK` as ``user`` (None: root); stdout and stderr as bytes."""
        argv = [self.python.executable, "-m", "encfs", *args, "--keyd", str(self.sock)]
        env = self.python.env(ENCFS_HOME=str(self.root / "nohome"))
        if user is None:
            import subprocess

            return subprocess.run(argv, check=False, input=input, capture_output=True, env=env, timeout=120)
        return run_as(user, argv, env, input=input, text=False)

    def ok(self, user: UnixUser | None, *args: str, input: bytes = b"") -> bytes:
        proc = self.encfs(user, *args, input=input)
        assert proc.returncode == 0, (args, proc.stderr)
        return bytes(proc.stdout)

    def denied(self, user: UnixUser | None, *args: str, input: bytes = b"", why: str = "") -> str:
        proc = self.encfs(user, *args, input=input)
        err = proc.stderr.decode()
        assert proc.returncode == 77, (args, proc.returncode, err)
        assert err.count("\n") == 1 and "may not" in err and why in err, err
        return err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, user_python: Any) -> Iterator[World]:
    home = tmp_path_factory.mktemp("keyd-home") / "home"
    home_with_key(home, "local")
    root = Path(tempfile.mkdtemp(prefix="encfs-keyd-", dir="/tmp"))
    root.chmod(0o755)
    try:
        with temporary_users() as users, contextlib.ExitStack() as daemons:
            w = World(root, home, users, user_python)
            w.daemons = daemons
            w.restart()
            yield w
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _records(w: World) -> list[dict[str, Any]]:
    return list(json.loads(w.ok(None, "key", "audit", "--json"))["Records"])


def test_a_key_is_its_creators_and_no_one_elses(world: World) -> None:
    w = world
    key = w.ok(w.alice, "key", "create", "--alias", "alice1").decode().strip()
    blob = w.ok(w.alice, "key", "encrypt", "alice1", "--encryption-context", "app=a", input=b"alice's")
    assert w.ok(w.alice, "key", "decrypt", "--encryption-context", "app=a", input=blob) == b"alice's"
    err = w.denied(w.bob, "key", "decrypt", "--encryption-context", "app=a", input=blob)
    assert err == (f"encfs: uid {w.bob.uid} ({w.bob.name}) may not kms:Decrypt key {key}: "
                   f"no policy statement or grant allows it\n")
    w.denied(w.bob, "key", "disable", "alice1")
    w.denied(w.bob, "key", "get-policy", "alice1")
    policy = json.loads(w.ok(w.alice, "key", "get-policy", "alice1"))
    assert f"user:{w.alice.name}" in json.dumps(policy)
    # Root is no one special to the daemon: the PIN is the daemon's alone, and the key is alice's.
    w.denied(None, "key", "decrypt", "--encryption-context", "app=a", input=blob)
    denials = [r for r in _records(w) if r.get("Outcome") == "denied" and r.get("KeyId") == key]
    assert {(r["Principal"].get("Uid"), r["Operation"]) for r in denials} >= {
        (w.bob.uid, "Decrypt"), (w.bob.uid, "DisableKey"), (0, "Decrypt")}
    assert all("may not" in r["Error"] and r["Principal"]["Kind"] == "unix" for r in denials)
    allowed = [r for r in _records(w) if r.get("Operation") == "Decrypt" and r.get("KeyId") == key
               and r.get("Outcome") == "success"]
    assert allowed and all(r["Principal"]["Uid"] == w.alice.uid for r in allowed)


def test_a_grant_takes_effect_at_once_and_ends_when_retired_or_revoked(world: World) -> None:
    w = world
    w.ok(w.alice, "key", "create", "--alias", "alice2")
    blob_ab = w.ok(w.alice, "key", "encrypt", "alice2", "--encryption-context", "a=b", input=b"shared")
    blob_ac = w.ok(w.alice, "key", "encrypt", "alice2", "--encryption-context", "a=c", input=b"private")
    w.denied(w.bob, "key", "decrypt", "--encryption-context", "a=b", input=blob_ab)
    grant = w.ok(w.alice, "key", "grant", "create", "alice2", "--grantee", f"user:{w.bob.name}",
                 "--operations", "Decrypt", "--context-equals", "a=b",
                 "--retiring-principal", f"user:{w.carol.name}").decode().strip()
    assert w.ok(w.bob, "key", "decrypt", "--encryption-context", "a=b", input=blob_ab) == b"shared"
    w.denied(w.bob, "key", "decrypt", "--encryption-context", "a=c", input=blob_ac)  # outside the constraint
    assert grant in w.ok(w.alice, "key", "grant", "list", "alice2").decode()
    w.denied(w.bob, "key", "grant", "retire", "alice2", "--grant-id", grant)  # no RetireGrant in its operations
    w.ok(w.carol, "key", "grant", "retire", "alice2", "--grant-id", grant)  # the retiring principal
    w.denied(w.bob, "key", "decrypt", "--encryption-context", "a=b", input=blob_ab)
    grant = w.ok(w.alice, "key", "grant", "create", "alice2", "--grantee", f"user:{w.bob.name}",
                 "--operations", "Decrypt,RetireGrant").decode().strip()
    assert w.ok(w.bob, "key", "decrypt", "--encryption-context", "a=c", input=blob_ac) == b"private"
    w.denied(w.bob, "key", "grant", "revoke", "alice2", "--grant-id", grant)  # revoking is the admin's
    w.ok(w.alice, "key", "grant", "revoke", "alice2", "--grant-id", grant)
    w.denied(w.bob, "key", "decrypt", "--encryption-context", "a=c", input=blob_ac)
    ops = [(r["Operation"], r.get("Outcome")) for r in _records(w) if r.get("GrantId") == grant]
    assert ("CreateGrant", "success") in ops and ("RevokeGrant", "success") in ops


def test_a_policy_change_is_obeyed_by_the_next_request(world: World) -> None:
    w = world
    key = w.ok(w.alice, "key", "create", "--alias", "alice3").decode().strip()
    policy = json.loads(w.ok(w.alice, "key", "get-policy", "alice3"))
    w.denied(w.bob, "key", "encrypt", "alice3", input=b"x")
    wider = dict(policy, Statement=[*policy["Statement"], {
        "Sid": "GroupEncrypts", "Effect": "Allow", "Principal": {"Encfs": [f"group:{w.group.name}"]},
        "Action": ["kms:Encrypt"], "Resource": "*"}])
    w.ok(w.alice, "key", "put-policy", "alice3", input=json.dumps(wider).encode())
    w.ok(w.bob, "key", "encrypt", "alice3", input=b"x")  # bob is in the group
    w.denied(w.carol, "key", "encrypt", "alice3", input=b"x")  # carol is not
    w.ok(w.alice, "key", "put-policy", "alice3", input=json.dumps(policy).encode())
    w.denied(w.bob, "key", "encrypt", "alice3", input=b"x")
    bad = w.encfs(w.alice, "key", "put-policy", "alice3", input=b'{"Statement": [{"Effect": "Perhaps"}]}')
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1, bad.stderr
    assert any(r["Operation"] == "PutKeyPolicy" and r["KeyId"] == key and r["Principal"]["Uid"] == w.alice.uid
               for r in _records(w))


def test_secrets_have_stages_and_the_key_policy_decides_who_reads_them(world: World) -> None:
    w = world
    w.ok(w.alice, "key", "create", "--alias", "alice4")
    w.ok(w.alice, "secret", "put", "db/password", "--kms-key-id", "alice4", input=b"first")
    w.ok(w.alice, "secret", "put", "db/password", input=b"second")
    assert w.ok(w.alice, "secret", "get", "db/password") == b"second"
    assert w.ok(w.alice, "secret", "get", "db/password", "--version-stage", "AWSPREVIOUS") == b"first"
    w.ok(w.alice, "secret", "rotate", "db/password")
    rotated = w.ok(w.alice, "secret", "get", "db/password")
    assert rotated not in (b"first", b"second") and len(rotated) == 32
    assert w.ok(w.alice, "secret", "get", "db/password", "--version-stage", "AWSPREVIOUS") == b"second"
    w.denied(w.bob, "secret", "get", "db/password", why="secretsmanager:GetSecretValue")
    described = json.loads(w.ok(w.alice, "secret", "describe", "db/password", "--json"))
    assert sorted(s for stages in described["VersionIdsToStages"].values() for s in stages) == [
        "AWSCURRENT", "AWSPREVIOUS"]
    trail = json.dumps(_records(w))
    assert "second" not in trail and rotated.decode() not in trail
    assert any(r["Operation"] == "GetSecretValue" and r.get("Outcome") == "denied"
               and r["Principal"]["Uid"] == w.bob.uid for r in _records(w))


def test_roles_officers_manage_auditors_read_and_a_restart_keeps_everything(world: World) -> None:
    w = world
    w.ok(w.alice, "key", "create", "--alias", "alice5")
    blob = w.ok(w.alice, "key", "encrypt", "alice5", input=b"kept")
    w.ok(w.alice, "key", "grant", "create", "alice5", "--grantee", f"user:{w.bob.name}", "--operations", "Decrypt")
    w.ok(w.alice, "secret", "put", "kept", "--kms-key-id", "alice5", input=b"value")
    w.restart(f'[roles]\nofficers = ["user:{w.carol.name}"]\nusers = ["user:{w.alice.name}", "user:{w.bob.name}"]\n'
              f'auditors = ["user:{w.dave.name}"]\n')
    try:
        # What was acknowledged before the restart holds after it.
        assert w.ok(w.bob, "key", "decrypt", input=blob) == b"kept"
        assert w.ok(w.alice, "secret", "get", "kept") == b"value"
        # A crypto officer manages any key but never reads data.
        w.ok(w.carol, "key", "disable", "alice5")
        assert w.encfs(w.alice, "key", "encrypt", "alice5", input=b"x").returncode == 78  # disabled
        w.ok(w.carol, "key", "enable", "alice5")
        w.denied(w.carol, "key", "decrypt", input=blob, why="role crypto-officer has no data operations")
        w.denied(w.carol, "secret", "get", "kept")
        w.ok(w.carol, "key", "create", "--alias", "officers")
        # An auditor reads the trail and nothing else; no role, nothing at all.
        records = json.loads(w.ok(w.dave, "key", "audit", "--json"))["Records"]
        assert any(r.get("Principal", {}).get("Uid") == w.carol.uid for r in records)
        w.denied(w.dave, "key", "list")
        w.denied(w.alice, "key", "audit")
        w.denied(None, "key", "list", why="no role")
    finally:
        w.restart()  # no roles again, for the tests that run after this one


def test_no_plaintext_key_or_secret_value_reaches_the_daemons_log_or_the_trail(world: World) -> None:
    w = world
    w.ok(w.alice, "key", "create", "--alias", "alice6")
    marker = b"plaintext-marker-4f1d"
    blob = w.ok(w.alice, "key", "encrypt", "alice6", input=marker)
    w.ok(w.alice, "key", "decrypt", input=blob)
    w.ok(w.alice, "secret", "put", "marked", "--kms-key-id", "alice6", input=b"secret-marker-9a7c")
    w.ok(w.alice, "secret", "get", "marked")
    data_key = json.loads(w.ok(w.alice, "key", "generate-data-key", "alice6", "--json"))["Plaintext"]
    w.denied(w.bob, "key", "decrypt", input=blob)  # a denial is logged and audited too
    import base64

    for path in (w.sock.with_suffix(".log"), w.home / "audit.log"):
        text = path.read_bytes()
        for needle in (marker, b"secret-marker-9a7c", data_key.encode(), base64.b64decode(data_key),
                       base64.b64encode(marker)):
            assert needle not in text, (path, needle)
