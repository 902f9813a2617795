"""`encfs mount --debug`: every FUSE request in the daemon's log by opcode name (issue #22),
on a real mount."""

from __future__ import annotations

from pathlib import Path

from fuse_helpers import Mount
from test_rekey_rewrap import home, ok  # noqa: F401  (home: the fixture)


def test_debug_logs_each_request_by_opcode_name_and_without_it_nothing(tmp_path: Path, home: Path) -> None:
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    traced, quiet = tmp_path / "traced.log", tmp_path / "quiet.log"
    with Mount(cipher, plain, home, "--debug", log=traced):
        (plain / "f").write_bytes(b"x")
        assert not (plain / "missing").exists()
    with Mount(cipher, plain, home, log=quiet):
        assert (plain / "f").read_bytes() == b"x"
    log = traced.read_text()
    for name in ("INIT unique=", "CREATE unique=", "WRITE unique=", "LOOKUP unique="):
        assert name in log, log[-3000:]
    assert "-> ENOENT" in log  # the lookup of "missing"
    assert "unique=" not in quiet.read_text()
