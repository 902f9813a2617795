"""One consistent CLI (issue #23, docs/dev/cli.md), through the real CLI: every command takes
``--json`` and prints one object with PascalCase keys; KMS operations take AWS's flag names (today's
as aliases); ``--base64`` means the same everywhere.

Most command lines run in one process (tests/cli_tool.py: encfs.cli.main, as the ``encfs``
script runs it) to keep the suite's time: a Python start-up here costs most of a second. The
commands that start a daemon (mount, volume attach) run as their own processes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from keyd_rig import keyd

from encfs.cli import build_parser, iter_commands

TOOL = Path(__file__).with_name("cli_tool.py")
SKIP = {("bench",): "passes its arguments to benchmarks/bench.py untouched"}
PASCAL = re.compile(r"[A-Z][A-Za-z0-9]*")


PARSERS = dict(iter_commands(build_parser()))


def commands() -> list[tuple[str, ...]]:
    return list(PARSERS)


def command_of(argv: list[str]) -> tuple[str, ...]:
    """The command path an argv names (global options before it skipped)."""
    names = set(PARSERS)
    words = [a for a in argv if not a.startswith("-")]
    for n in (3, 2, 1):
        if tuple(words[:n]) in names:
            return tuple(words[:n])
    raise AssertionError(f"no command in {argv}")


def non_pascal(value: Any, where: str = "") -> list[str]:
    """Keys that are not PascalCase, at any depth (an encryption context's, mechanisms', algorithms' and
    a secret's version ids are data)."""
    bad: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if not PASCAL.fullmatch(k):
                bad.append(f"{where}.{k}")
            if not (k.endswith("Context") or k in ("Mechanisms", "Algorithms", "VersionIdsToStages",
                                                    "SecretVersionsToStages")):
                bad += non_pascal(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad += non_pascal(v, f"{where}[{i}]")
    return bad


class Cli:
    """encfs command lines in one process for one ENCFS_HOME; ``printed`` keeps each command's
    --json output."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        full = dict(os.environ, ENCFS_HOME=str(home), **env)
        full.pop("SOFTHSM2_CONF", None)
        self.proc = subprocess.Popen([sys.executable, str(TOOL)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=full, text=True)
        self.printed: dict[tuple[str, ...], dict[str, Any]] = {}

    def run(self, *argv: str | Path, stdin: bytes = b"") -> tuple[int, bytes, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv],
                                          "stdin": base64.b64encode(stdin).decode()}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["code"], base64.b64decode(answer["stdout"]), answer["stderr"]

    def ok(self, *argv: str | Path, stdin: bytes = b"") -> bytes:
        code, out, err = self.run(*argv, stdin=stdin)
        assert code == 0, f"encfs {' '.join(map(str, argv))}: {err}"
        assert "Traceback" not in err
        return out

    def json(self, *argv: str | Path, stdin: bytes = b"") -> dict[str, Any]:
        """Run with --json: exactly one JSON object on stdout, kept under its command."""
        args = [str(a) for a in argv]
        out = self.ok(*args, *([] if "--json" in args else ["--json"]), stdin=stdin)
        doc = json.loads(out)  # one document: trailing text would not parse
        assert isinstance(doc, dict), out
        self.printed.setdefault(command_of(args), doc)
        return doc

    def fails(self, *argv: str | Path, stdin: bytes = b"", code: int | None = None) -> str:
        got, _out, err = self.run(*argv, stdin=stdin)
        assert got != 0 and (code is None or got == code), (got, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("encfs: ") and "Traceback" not in err, err
        return lines[0]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def encfs_json(cli: Cli, *argv: str | Path) -> dict[str, Any]:
    """A command that starts a daemon: its own process (as a user runs it)."""
    p = run_encfs(*map(str, argv), "--json", home=cli.home, env=cli.env, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    doc = json.loads(p.stdout)
    cli.printed.setdefault(command_of([str(a) for a in argv]), doc)
    return dict(doc)


def wrap_for_import(params: dict[str, Any], material: bytes) -> bytes:
    pub = serialization.load_der_public_key(base64.b64decode(params["PublicKey"]))  # as AWS returns it
    return pub.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),  # type: ignore[union-attr]
                                              label=None))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every command run once with --json (but bench); their outputs by command."""
    tmp = tmp_path_factory.mktemp("cli-json")
    home = tmp / "home"
    env = {"ENCFS_RUN_DIR": str(tmp / "run"), "ENCFS_DEV_DIR": str(tmp / "dev")}
    cli = Cli(home, env)
    mounted: list[Path] = []
    attached: list[str] = []
    try:
        assert cli.json("hsm", "init")["Created"] is True
        (tmp / "pass").write_text("a passphrase for the test\n")
        assert cli.json("hsm", "protect-pin", "--passphrase-file", tmp / "pass")["PassphraseChanged"] is False
        assert "UserPinFile" in cli.json("hsm", "unprotect-pin", "--passphrase-file", tmp / "pass")
        cli.json("hsm", "status")
        a = cli.json("key", "create", "--alias", "a")["KeyId"]
        b = cli.json("key", "create", "--alias", "b")["KeyId"]
        cli.json("key", "list")
        cli.json("key", "describe", "--key-id", "a")
        assert cli.json("key", "alias", "c", a) == {"AliasName": "alias/c", "TargetKeyId": a}
        assert cli.json("key", "alias", "--alias-name", "alias/c", "--target-key-id", "b") == \
            {"AliasName": "alias/c", "TargetKeyId": b}  # AWS's update-alias spelling
        assert cli.json("key", "alias", "--alias-name", "c", a)["TargetKeyId"] == a  # the name by flag, KEY by place
        cli.json("key", "aliases")
        blob = base64.b64decode(cli.json("key", "encrypt", "a", "--encryption-context", "who=me")["CiphertextBlob"])
        assert base64.b64decode(cli.json("key", "decrypt", "--encryption-context", "who=me", stdin=blob)
                                ["Plaintext"]) == b""
        moved = cli.json("key", "re-encrypt", "--destination-key-id", "b", "--encryption-context", "who=me",
                         stdin=blob)
        assert (moved["SourceKeyId"], moved["KeyId"]) == (a, b)
        cli.json("key", "generate-data-key", "a")
        assert cli.json("secret", "put", "app/db", "--kms-key-id", "a", stdin=b"one")["KmsKeyId"] == a
        cli.json("secret", "create", "app/api", "--kms-key-id", "a", stdin=b"two")
        assert cli.json("secret", "get", "app/db")["SecretString"] == "one"
        rotated = cli.json("secret", "rotate", "app/db")["VersionId"]
        assert cli.json("secret", "describe", "app/db")["VersionIdsToStages"][rotated] == ["AWSCURRENT"]
        assert [s["Name"] for s in cli.json("secret", "list")["SecretList"]] == ["app/api", "app/db"]
        assert "DeletionDate" in cli.json("secret", "delete", "app/api")
        assert cli.json("secret", "restore", "app/api") == {"Name": "app/api"}
        with keyd(home, tmp / "keyd.sock", "--json") as daemon_proc:  # policies and grants are the daemon's
            ready = json.JSONDecoder().raw_decode((tmp / "keyd.log").read_text())[0]  # its first output
            cli.printed.setdefault(("keyd",), ready)
            assert ready["Socket"] == str(tmp / "keyd.sock") and daemon_proc.poll() is None
            by_daemon = ("--keyd", tmp / "keyd.sock")
            policy = cli.json("key", "get-policy", "a", *by_daemon)["Policy"]  # AWS's: the document as a string
            assert cli.json("key", "put-policy", "a", *by_daemon, stdin=policy.encode())["KeyId"] == "a"
            grant = cli.json("key", "grant", "create", "a", "--grantee", "user:nobody", "--operations", "Decrypt",
                             *by_daemon)["GrantId"]
            assert [g["GrantId"] for g in cli.json("key", "grant", "list", "a", *by_daemon)["Grants"]] == [grant]
            assert cli.json("key", "grant", "revoke", "a", "--grant-id", grant, *by_daemon)["Revoked"] is True
            grant = cli.json("key", "grant", "create", "a", "--grantee", "uid:0", "--operations", "Decrypt,RetireGrant",
                             *by_daemon)["GrantId"]
            cli.json("key", "grant", "retire", "a", "--grant-id", grant, *by_daemon)
        cli.ok("key", "create", "--alias", "d")
        for verb in ("disable", "enable", "rotate", "enable-rotation", "disable-rotation", "schedule-deletion",
                     "cancel-deletion"):
            cli.json("key", verb, "d")
        cli.json("key", "create", "--alias", "r")
        cli.json("key", "rotate", "r")
        cli.json("key", "retire-version", "r", "1")
        cli.json("key", "create", "--alias", "ext", "--origin", "external")
        params = cli.json("key", "get-parameters-for-import", "ext")  # no --public-key-out: PublicKey alone
        (tmp / "wrapped").write_bytes(base64.b64encode(wrap_for_import(params, os.urandom(32))))
        assert cli.json("key", "import", "ext", "--encrypted-key-material", tmp / "wrapped", "--base64",
                        "--import-token", params["ImportToken"])["KeyState"] == "Enabled"  # base64: a blob
        cli.json("key", "delete-imported-key-material", "ext")
        cli.json("key", "audit", "--tail", "50")

        cipher = tmp / "cipher"
        cli.json("init", cipher, "--key", "a")
        cli.json("info", cipher)
        cli.json("fsck", cipher)
        cli.json("rekey", cipher, "--key", "b")
        assert cli.json("recovery-key", "add", cipher, "--new-recovery-key", tmp / "fs.rk")["RecoveryKey"] is True
        assert cli.json("recovery-key", "remove", cipher)["Changed"] is True

        vol = tmp / "vol.img"
        cli.json("volume", "create", vol, "--size", "4M", "--key", "a")
        cli.json("volume", "info", vol)
        assert cli.json("recovery-key", "add", vol, "--new-recovery-key", tmp / "vol.rk")["RecoveryKey"] is True
        assert cli.json("recovery-key", "remove", vol)["Changed"] is True
        cli.json("volume", "resize", vol, "--size", "8M")
        sid = cli.json("snapshot", "create", vol)["SnapshotId"]
        cli.json("snapshot", "list", vol)
        cli.json("snapshot", "info", f"{vol}@{sid}")
        cli.json("snapshot", "restore", f"{vol}@{sid}", tmp / "restored.img")
        cli.json("snapshot", "copy", f"{vol}@{sid}", tmp / "copy.img", "--key", "b")
        cli.json("snapshot", "export", f"{vol}@{sid}", tmp / "export")
        cli.json("snapshot", "import", tmp / "export", tmp / "imported.img")
        cli.json("snapshot", "rollback", vol, sid)
        cli.json("snapshot", "delete", f"{vol}@{sid}")
        cli.json("volume", "rekey", vol)
        assert cli.json("volume", "upgrade", vol)["Changed"] is False
        cli.json("install-mount-helper", "--path", tmp / "mount.fuse.encfs")
        # A recovery key, not a passphrase: no scrypt, half a second less.
        assert cli.json("hsm", "backup", tmp / "keys.bak", "--new-recovery-key", tmp / "rk")["Files"] > 0
        assert cli.json("hsm", "restore", tmp / "keys.bak", "--recovery-key", tmp / "rk", "--home",
                        tmp / "home2")["StateDirectory"] == str(tmp / "home2")

        # The commands that start daemons, each in its own process; cleaned up below whatever happens.
        mp = tmp / "mnt"
        mp.mkdir()
        mounted.append(mp)
        assert encfs_json(cli, "mount", cipher, mp)["MountPoint"] == str(mp)
        cli.json("status")
        assert cli.json("completion", "bash")["Script"].startswith("# AUTOMATICALLY GENERATED by")
        assert cli.json("man")["Page"].startswith(".TH ENCFS")
        assert encfs_json(cli, "umount", mp) == {"MountPoint": str(mp), "Unmounted": True}
        mounted.remove(mp)
        attached.append(str(vol))
        device = encfs_json(cli, "volume", "attach", vol, "--name", "one")["Device"]
        assert cli.json("volume", "list")["Volumes"][0]["Device"] == device
        table = tmp / "volumes"
        table.write_text(f"one {vol}\n")
        assert encfs_json(cli, "volume", "attach-all", "--table", table)["Volumes"] == [
            {"Name": "one", "Image": str(vol), "Device": device, "State": "already-attached"}]
        assert cli.json("volume", "detach", vol)["Device"] == device
        attached.remove(str(vol))
        yield {"printed": cli.printed, "tmp": tmp, "a": a, "b": b, "cli": cli}
    finally:
        for image in attached:
            cli.run("volume", "detach", image)
        for mp in mounted:
            if os.path.ismount(mp):
                subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, timeout=60, check=False)
        cli.close()


@pytest.mark.parametrize("path", commands(), ids=" ".join)
def test_every_command_prints_one_pascalcase_object_with_json(path: tuple[str, ...], world: dict[str, Any]) -> None:
    if path in SKIP:
        pytest.skip(SKIP[path])
    parser = PARSERS[path]
    assert any("--json" in a.option_strings for a in parser._actions), f"encfs {' '.join(path)} has no --json"
    assert path in world["printed"], f"encfs {' '.join(path)} --json was not run"
    assert non_pascal(world["printed"][path]) == [], world["printed"][path]


def test_aws_names_where_aws_has_them(world: dict[str, Any]) -> None:
    printed = world["printed"]
    assert printed[("info",)]["FileSystemId"] and printed[("info",)]["CipherDir"]
    assert set(printed[("info",)]["Counts"]) >= {"Files", "Directories", "LongNames", "BackingBytes"}
    assert printed[("hsm", "status")]["Mechanisms"]["CKM_AES_GCM"] is True  # names of mechanisms: data
    records = printed[("key", "audit")]["Records"]
    encrypt = next(r for r in records if r["Operation"] == "Encrypt")
    assert encrypt["EncryptionContext"] == {"who": "me"} and encrypt["Principal"]["Uid"] == os.getuid()
    assert printed[("fsck",)]["ExitCode"] == 0 and printed[("fsck",)]["Damage"] == []
    assert printed[("volume", "create")]["Size"] == 4 << 20 and printed[("volume", "create")]["KeyId"] == world["a"]
    # The audit log itself keeps its format (docs/FORMAT.md §5): only the output is PascalCase.
    first = json.loads((world["tmp"] / "home" / "audit.log").read_text().splitlines()[0])
    assert "key_id" in first and "KeyId" not in first


def test_kms_flags_take_aws_names_and_keep_the_old_ones(world: dict[str, Any]) -> None:
    cli, a, b = world["cli"], world["a"], world["b"]
    blob = cli.ok("key", "encrypt", "--key-id", "a", "--encryption-context", "x=1,y=2,3", stdin=b"data")
    for ctx in (["--context", "x=1", "--context", "y=2,3"], ["--encryption-context", '{"x": "1", "y": "2,3"}'],
                ["--encryption-context", "y=2,3", "--encryption-context", "x=1"]):
        assert cli.ok("key", "decrypt", *ctx, "--key-id", a, stdin=blob) == b"data", ctx
    assert "context" in cli.fails("key", "decrypt", "--context", "x=1", stdin=blob)
    assert "twice" in cli.fails("key", "decrypt", "--encryption-context", "x=1,x=2", stdin=blob)
    assert "JSON" in cli.fails("key", "decrypt", "--encryption-context", '{"x": 1}', stdin=blob)
    assert b in cli.fails("key", "decrypt", "--key", b, "--context", "x=1", "--context", "y=2,3", stdin=blob)
    old = cli.ok("key", "re-encrypt", "--to", "b", "--context", "x=1,y=2,3", "--to-context", "z=9", stdin=blob)
    new = cli.ok("key", "re-encrypt", "--destination-key-id", "b", "--encryption-context", "x=1,y=2,3",
                 "--destination-encryption-context", "z=9", stdin=blob)
    for moved in (old, new):
        assert cli.json("key", "decrypt", "--encryption-context", "z=9", stdin=moved)["KeyId"] == b
    cli.ok("key", "create", "--alias", "flags")
    assert cli.json("key", "enable-rotation", "flags", "--rotation-period-in-days", "100")["RotationPeriodInDays"] == 100
    assert cli.json("key", "enable-rotation", "--key-id", "flags", "--period-days", "120")["RotationPeriodInDays"] == 120
    for flag, days in (("--pending-window-in-days", 7), ("--days", 8)):
        meta = cli.json("key", "schedule-deletion", "flags", flag, str(days))
        when = datetime.fromisoformat(meta["DeletionDate"]).timestamp()
        assert abs(when - time.time() - days * 86400) < 600, (flag, meta)
        cli.ok("key", "cancel-deletion", "flags")
        cli.ok("key", "enable", "flags")
    assert "twice" in cli.fails("key", "describe", "a", "--key-id", "b")
    assert "--key-id" in cli.fails("key", "describe")
    assert len(base64.b64decode(cli.json("key", "generate-data-key", "a", "--key-spec", "AES_128")["Plaintext"])) == 16
    assert "give one" in cli.fails("key", "generate-data-key", "a", "--key-spec", "AES_128", "--number-of-bytes", "32")
    help_text = cli.ok("key", "re-encrypt", "--help").decode()
    assert "--destination-key-id KEY, --to KEY" in help_text and "--encryption-context" in help_text


def test_base64_means_the_ciphertext_blob_everywhere(world: dict[str, Any]) -> None:
    cli, b = world["cli"], world["b"]
    secret = bytes(range(256))
    raw = cli.ok("key", "encrypt", "a", stdin=secret)
    text = cli.ok("key", "encrypt", "a", "--base64", stdin=secret)
    assert base64.b64decode(text.strip(), validate=True)[:4] == raw[:4] and text.endswith(b"\n")
    assert cli.ok("key", "decrypt", "--base64", stdin=text) == secret  # the blob in: base64; plaintext: raw
    assert cli.ok("key", "decrypt", stdin=raw) == secret
    assert base64.b64decode(cli.ok("key", "decrypt", "--base64", "--base64-out", stdin=text)) == secret
    assert base64.b64decode(cli.ok("key", "decrypt", "--base64-out", stdin=raw)) == secret
    moved = cli.ok("key", "re-encrypt", "--to", "b", "--base64", stdin=text)  # both blobs: base64
    assert cli.ok("key", "decrypt", "--base64", "--key-id", b, stdin=moved) == secret
    moved_raw = cli.ok("key", "re-encrypt", "--to", "b", "--base64-in", stdin=text)  # only stdin
    assert cli.ok("key", "decrypt", stdin=moved_raw) == secret
    moved_b64 = cli.ok("key", "re-encrypt", "--to", "b", "--base64-out", stdin=raw)  # only stdout (as before)
    assert cli.ok("key", "decrypt", "--base64", stdin=moved_b64) == secret
    from_text = cli.ok("key", "encrypt", "a", "--base64-in", stdin=base64.b64encode(secret))
    assert cli.ok("key", "decrypt", stdin=from_text) == secret
    assert "base64" in cli.fails("key", "decrypt", "--base64", stdin=b"not base64!")
    out = cli.json("key", "encrypt", "a", stdin=secret)
    assert cli.ok("key", "decrypt", stdin=base64.b64decode(out["CiphertextBlob"])) == secret
    assert "CiphertextBlob" in json.loads(cli.ok("key", "generate-data-key", "a", "--base64"))
    for command in (["encrypt"], ["decrypt"], ["re-encrypt"], ["import"]):  # import: in `world`
        assert "--base64" in cli.ok("key", *command, "--help").decode()


def test_json_before_the_command(world: dict[str, Any]) -> None:
    cli = world["cli"]
    for argv in (["--json", "volume", "list"], ["--json", "status"], ["--json", "key", "aliases"]):
        assert non_pascal(json.loads(cli.ok(*argv))) == [], argv
