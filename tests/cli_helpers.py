"""The ``encfs`` CLI run in subprocesses and checked, for test_cli_keys*.py and test_hsm_backup.py:
success (``ok``, ``ok_json``), the one-line error contract (``fails``, ``fail``), what a failed
command must leave alone (``state``), and ``shared_home``, a provisioned embedded home per module.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs

from encfs.keys.softhsm import softhsm_module

MODULE = softhsm_module()
HEADER_LEN = 45  # docs/FORMAT.md "Ciphertext blob v1"
EMPTY_CONTEXT = b"\x00\x00"
BINARY = bytes(range(256)) * 3 + b"\x00\x00\x00end\x00"


def ok(*args: str, home: Path, input: bytes = b"", env: dict[str, str] | None = None) -> bytes:
    """Run encfs, insist on success, return stdout."""
    proc = run_encfs(*args, home=home, input=input, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode(errors="replace"))
    assert b"Traceback" not in proc.stderr
    return proc.stdout


def ok_json(*args: str, home: Path, input: bytes = b"", env: dict[str, str] | None = None) -> Any:
    return json.loads(ok(*args, home=home, input=input, env=env))


def fails(proc: subprocess.CompletedProcess[bytes], *needles: str, exit_code: int | None = None) -> str:
    """Assert the one-line error contract; return the message (without 'encfs: ')."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"expected failure, got success; stdout={proc.stdout[:200]!r}"
    if exit_code is not None:
        assert proc.returncode == exit_code, (proc.returncode, err)
    assert "Traceback" not in err and b"Traceback" not in proc.stdout, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line: {err!r}"
    assert err.startswith("encfs: "), err
    assert "internal error" not in err, err
    msg = err[len("encfs: "):].rstrip("\n")
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


def fail(*args: str, home: Path, needles: tuple[str, ...] = (), input: bytes = b"",
         env: dict[str, str] | None = None, exit_code: int | None = None) -> str:
    return fails(run_encfs(*args, home=home, input=input, env=env), *needles, exit_code=exit_code)


def token_objects(tokendir: Path) -> list[str]:
    """Names of the token objects SoftHSM2 stores on disk (one file per object)."""
    return sorted(p.name for p in tokendir.glob("*/*.object") if p.name != "token.object")


def state(home: Path, tokendir: Path | None = None) -> tuple[bytes | None, list[str]]:
    """Everything a failed command must leave alone: key metadata and token objects."""
    keys = home / "keys.json"
    return (keys.read_bytes() if keys.exists() else None,
            token_objects(tokendir or home / "softhsm" / "tokens"))


def create_key(home: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    meta = ok_json("key", "create", "--json", *extra, home=home, env=env)
    return str(meta["KeyId"])


def blob_key_version(blob: bytes) -> tuple[str, int]:
    return str(uuid.UUID(bytes=blob[5:21])), int.from_bytes(blob[21:25], "big")


def audit_lines(home: Path) -> list[str]:
    return (home / "audit.log").read_text().splitlines()


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("shared") / "home"
    out = ok("hsm", "init", home=home).decode()
    assert "created" in out
    return home
