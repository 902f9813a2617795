"""The ``encfs:`` encryption-context prefix is reserved for encfs's own blobs (file headers,
filesystem secrets, volume keys): the public operations cannot mint one (issue #19 item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from encfs.errors import UsageError
from encfs.keys.service import KeyService
from tests.conftest import run_encfs


def test_service_refuses_reserved_context_keys(service: KeyService) -> None:
    key = service.create_key()["KeyId"]
    for ctx in ({"encfs:volume": "00" * 16}, {"encfs:fs": "ab", "encfs:file": "cd"}, {"x": "1", "encfs:": ""}):
        with pytest.raises(UsageError, match="reserved"):
            service.generate_data_key(key, ctx)
        with pytest.raises(UsageError, match="reserved"):
            service.generate_data_keys(key, [{"ok": "1"}, ctx])
        with pytest.raises(UsageError, match="reserved"):
            service.encrypt(key, b"x" * 32, ctx)
    blob = service.encrypt(key, b"x" * 32, {"app": "1"})
    with pytest.raises(UsageError, match="destination encryption context"):
        service.re_encrypt(blob, {"app": "1"}, key, {"encfs:volume": "00"})
    # encfs itself may, and anyone may open such a blob
    internal = service.generate_data_key(key, {"encfs:volume": "00"}, encfs_internal=True)
    assert service.decrypt(internal.ciphertext_blob, {"encfs:volume": "00"}).plaintext == internal.plaintext
    # moving it keeps its context by default: that would mint one too
    with pytest.raises(UsageError, match="reserved"):
        service.re_encrypt(internal.ciphertext_blob, {"encfs:volume": "00"}, key)
    # prefixes that are merely similar are the caller's
    service.encrypt(key, b"y", {"encfs": "1", "ENCFS:fs": "2", "my-encfs:x": "3"})
    refused = [r for r in service.audit.read() if r["outcome"] == "failure"]
    assert refused and all("reserved" in r["error"] for r in refused)


def test_cli_cannot_mint_a_volume_key(cli_home: Path) -> None:
    assert run_encfs("hsm", "init", home=cli_home).returncode == 0
    assert run_encfs("key", "create", "--alias", "k", home=cli_home).returncode == 0
    for args, stdin in ((["key", "generate-data-key", "k", "--context", "encfs:volume=00"], b""),
                        (["key", "encrypt", "k", "--context", "encfs:fs=00", "--context", "encfs:purpose=filesystem"],
                         b"k" * 32)):
        r = run_encfs(*args, input=stdin, home=cli_home)
        lines = r.stderr.decode().splitlines()
        assert r.returncode != 0 and r.stdout == b"" and len(lines) == 1 and "reserved" in lines[0], r.stderr
