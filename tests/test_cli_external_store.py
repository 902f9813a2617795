"""A key store on a PKCS#11 module (issue #23): its metadata is made by `encfs hsm init` only.

With the embedded token, the token is the store; with a module (an external HSM: SoftHSM2 that
encfs did not provision stands in for one, as in test_cli_keys_vendor.py) the store is this home's
``keys.json``. A home without it (a mistyped --home, a config.toml in a new directory, lost
metadata) is refused in one line naming the path, exit 66, and nothing is created there.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs

from encfs.keys.softhsm import EmbeddedSoftHSM, softhsm_module

MODULE = softhsm_module()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    emb = EmbeddedSoftHSM(tmp_path_factory.mktemp("vendor"))
    assert emb.provision()
    return {"pin_file": str(emb.user_pin), "env": {"SOFTHSM2_CONF": str(emb.conf)}, "tokendir": emb.tokendir}


def config_home(path: Path, v: dict[str, Any]) -> Path:
    path.mkdir()
    (path / "config.toml").write_text(f'[hsm]\nmodule = "{MODULE}"\ntoken = "encfs"\npin-file = "{v["pin_file"]}"\n')
    return path


def encfs(*args: str, home: Path, v: dict[str, Any], input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return run_encfs(*args, home=home, env=v["env"], input=input)


def no_store(proc: subprocess.CompletedProcess[bytes], home: Path) -> None:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 66, (proc.returncode, err)
    assert err == f"encfs: no key store at {home} (run 'encfs hsm init' to create one)\n", err


def objects(tokendir: Path) -> list[str]:
    return sorted(p.name for p in tokendir.glob("*/*.object"))


def test_missing_metadata_is_refused_until_hsm_init_makes_it(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = config_home(tmp_path / "home", vendor)
    before = objects(vendor["tokendir"])
    for args in (("key", "list"), ("key", "create", "--alias", "a"), ("key", "audit"), ("hsm", "status"),
                 ("init", str(tmp_path / "cipher"), "--key", "a")):
        no_store(encfs(*args, home=home, v=vendor), home)
    assert [p.name for p in home.iterdir()] == ["config.toml"]  # no keys.json, no audit.log
    assert not (tmp_path / "cipher").exists() and objects(vendor["tokendir"]) == before
    # A mistyped --home with the module on the command line: not even the directory is made.
    typo = tmp_path / "hmoe"
    sel = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", vendor["pin_file"])
    no_store(encfs("key", "create", *sel, home=typo, v=vendor), typo)
    assert not typo.exists()

    out = encfs("hsm", "init", home=home, v=vendor)
    assert out.returncode == 0, out.stderr
    assert f"key metadata {home / 'keys.json'} created" in out.stdout.decode()
    assert stat.S_IMODE((home / "keys.json").stat().st_mode) == 0o600
    assert json.loads((home / "keys.json").read_bytes())["keys"] == {}
    assert not (home / "softhsm").exists()  # the module's token, not an embedded one
    assert encfs("key", "create", "--alias", "a", home=home, v=vendor).returncode == 0
    saved = (home / "keys.json").read_bytes()
    again = encfs("hsm", "init", "--json", home=home, v=vendor)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["MetadataFile"] == str(home / "keys.json")
    assert json.loads(again.stdout)["MetadataCreated"] is False
    assert (home / "keys.json").read_bytes() == saved

    # Lost metadata (keys.json and its copy): refused, rather than started empty beside the
    # token's keys; a restored keys.json works again.
    (home / "keys.json").unlink()
    (home / "keys.json.bak").unlink()
    no_store(encfs("key", "list", home=home, v=vendor), home)
    no_store(encfs("key", "encrypt", "a", home=home, v=vendor, input=b"x"), home)
    assert not (home / "keys.json").exists()
    init = encfs("hsm", "init", home=home, v=vendor)  # starts afresh, but says what the token holds
    assert init.returncode == 0 and "encfs key object(s)" in init.stderr.decode(), init.stderr
    (home / "keys.json").write_bytes(saved)  # restored from a backup
    assert encfs("key", "encrypt", "a", home=home, v=vendor, input=b"x").returncode == 0
